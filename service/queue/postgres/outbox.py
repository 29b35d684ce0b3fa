"""The sending side of PostgresStore's NOTIFY doorbells, batched after commit.

Why not ``pg_notify`` inside the writing transaction: PostgreSQL serialises the commits of every transaction
that issued a NOTIFY (a database-wide lock held until the commit record is flushed), so all durable writes of
all instances would queue behind one another's fsyncs. Instead a committed transaction posts its doorbells here
and one background task sends everything pending in one short NOTIFY-only transaction (no WAL flush).

The cost: a process that dies between a commit and the flush loses those doorbells. Nothing durable is lost;
other instances' workers still find the work by polling, and readers catch up at their next doorbell or
reconnect (they always re-read the store from their cursor).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from service.errors import ServiceError
from service.queue.postgres.statements import LOG_CHANNEL

log = logging.getLogger(__name__)

# send(channels, payloads): one round trip for the whole batch.
Send = Callable[[list[str], list[str]], Awaitable[None]]


class Outbox:
    def __init__(self, send: Send, instance_id: str) -> None:
        self._send = send
        self._instance_id = instance_id
        # (channel, session_id) -> last_seq (0 for work doorbells): a batch carries each session once, newest seq.
        self._pending: dict[tuple[str, str], int] = {}
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def post(self, notes: list[tuple[str, str, int]]) -> None:
        """Queue doorbells of a committed transaction: (channel, session_id, last_seq)."""
        for channel, session_id, last_seq in notes:
            key = (channel, session_id)
            self._pending[key] = max(self._pending.get(key, 0), last_seq)
        if notes:
            self._ready.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pg-notify-outbox")

    async def stop(self) -> None:
        """Send what is pending, then stop."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self._flush()

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            await self._flush()

    async def _flush(self) -> None:
        batch, self._pending = self._pending, {}
        if not batch:
            return
        channels, payloads = [], []
        for (channel, session_id), last_seq in batch.items():
            fields = [session_id, str(last_seq)] if channel == LOG_CHANNEL else [session_id]
            channels.append(channel)
            payloads.append(" ".join([*fields, self._instance_id]))
        try:
            await self._send(channels, payloads)
        except asyncio.CancelledError:
            self.post([(channel, session_id, seq) for (channel, session_id), seq in batch.items()])
            raise
        except ServiceError as exc:
            log.warning("could not send %d NOTIFY doorbell(s): %s", len(channels), exc)
