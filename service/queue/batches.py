"""The group-commit queue both SQL writers share (README "Storage and durability"): callers add calls, the
serving tasks hand them over in batches of at most ``max_batch``, and a closing queue finishes what was added
first. What a batch does (one SQLite transaction, one PostgreSQL statement) is the writer's own ``run``.

Several tasks may serve one queue (PostgreSQL's ``pg_writers``): calls that arrive together are then shared
among the tasks that are free, oldest first (so no call waits behind later ones however busy the queue is), and
the database works on the batches at once instead of one task taking everything while the others idle. Each
writer puts its own batch in lock order.
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
        self._servers = 0  # tasks serving this queue
        self._running = 0  # of which are running a batch

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
        self._servers += 1
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(every_s):
                        await self._wake.wait()
                self._wake.clear()
                while self.pending:
                    batch = self._take()
                    self._running += 1
                    try:
                        await run(batch)
                    finally:
                        self._running -= 1
                    if tick is not None:
                        await tick()
                if self.closing:
                    return
                if tick is not None:
                    await tick()
        finally:
            self._servers -= 1

    def _take(self) -> list[C]:
        """This task's share of the calls waiting, oldest first: an equal part for every free task, at most
        ``max_batch``. A lone task takes everything (up to ``max_batch``)."""
        free = max(1, self._servers - self._running)
        size = min(self.max_batch, -(-len(self.pending) // free))
        batch, self.pending = self.pending[:size], self.pending[size:]
        return batch


def fail(batch: Iterable[_HasFuture], error: StoreUnavailable) -> None:
    """Tell every caller of ``batch`` still waiting that its write failed (a fresh error each)."""
    for call in batch:
        if not call.future.done():
            with contextlib.suppress(asyncio.InvalidStateError):
                call.future.set_exception(StoreUnavailable(error.message))
