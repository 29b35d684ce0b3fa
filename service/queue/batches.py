"""The group-commit queue both SQL writers share (README "Storage and durability"): callers add calls, one
task hands them over in batches of at most ``max_batch``, and a closing queue finishes what was added first.
What a batch does (one SQLite transaction, one PostgreSQL statement) is the writer's own ``run``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Generic, Protocol, TypeVar

from service.errors import StoreUnavailable


class _HasFuture(Protocol):
    future: asyncio.Future[Any]


C = TypeVar("C", bound=_HasFuture)


class Batches(Generic[C]):
    """A plain list and an Event rather than an asyncio.Queue: the writer takes everything at once anyway, and
    this is on the path of every write."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.pending: list[C] = []
        self.closing = False
        self._wake = asyncio.Event()

    def add(self, call: C) -> None:
        self.pending.append(call)
        self._wake.set()

    def close(self) -> None:
        """Take no more calls; ``serve`` returns once those already added are run."""
        self.closing = True
        self._wake.set()

    async def serve(
        self,
        run: Callable[[list[C]], Awaitable[None]],
        *,
        every_s: float | None = None,
        tick: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Run batches until closed. ``tick`` (housekeeping between transactions) runs after every batch and,
        with ``every_s``, also when nothing was written for that long."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every_s):
                    await self._wake.wait()
            self._wake.clear()
            while self.pending:
                batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
                await run(batch)
                if tick is not None:
                    await tick()
            if self.closing:
                return
            if tick is not None:
                await tick()


def fail(batch: Iterable[_HasFuture], error: StoreUnavailable) -> None:
    """Tell every caller of ``batch`` still waiting that its write failed (a fresh error each)."""
    for call in batch:
        if not call.future.done():
            with contextlib.suppress(asyncio.InvalidStateError):
                call.future.set_exception(StoreUnavailable(error.message))
