"""LISTEN/NOTIFY for PostgresStore: one dedicated listening connection (outside the pool) per instance.

* ``service_work`` notifications from other instances wake ``wait_for_work``; local commits wake it directly.
* ``service_log`` notifications from other instances are handed to the registered commit listeners, in order,
  coalesced per session (only the highest last_seq matters: readers re-read the store from their cursor).
* When the connection is lost it is re-opened with backoff. Notifications sent meanwhile are gone, so after
  reconnecting the listeners are called for every session written since shortly before the loss (readers
  re-read the store from their own cursor, so a spurious call costs one read), and ``wait_for_work`` wakes.
  "Since" is the database's clock, read on this connection at every keepalive (README "Deploying on
  PostgreSQL"): an instance whose own clock is off neither misses sessions nor catches up on too many.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from service.errors import StoreUnavailable
from service.queue.postgres.errors import CONNECT_TIMEOUT_S, DRIVER_ERRORS, close_connection
from service.queue.postgres.statements import DB_NOW, LOG_CHANNEL, WORK_CHANNEL
from service.queue.store import CommitListener

# What a reconnect may meet: the driver's errors, and the store's (the catch-up reads through its pool).
_RECONNECT_ERRORS: tuple[type[BaseException], ...] = (*DRIVER_ERRORS, StoreUnavailable)

log = logging.getLogger(__name__)

# The listening connection's application_name (pg_stat_activity shows it; tests find it by this name).
LISTEN_APPLICATION = "service-listen"

# (since) -> [(session_id, last_seq)] of sessions written since then.
CatchUp = Callable[[datetime], Awaitable[list[tuple[str, int]]]]


class Notifier:
    def __init__(
        self,
        dsn: str,
        instance_id: str,
        offset: Callable[[], float],
        catch_up: CatchUp,
        *,
        keepalive_s: float = 10.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self._instance_id = instance_id
        self._offset = offset
        self._db_now: datetime | None = None  # the database's clock at the last sign of life
        self._catch_up = catch_up
        self._keepalive_s = keepalive_s
        self._max_backoff_s = max_backoff_s
        self._listeners: list[CommitListener] = []
        self._work = asyncio.Event()  # replaced on every wake, so each wake reaches every current waiter
        self._pending: dict[str, int] = {}
        self._pending_ready = asyncio.Event()
        self._lost = asyncio.Event()
        self._conn: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self.reconnects = 0

    # --- local side -----------------------------------------------------------------------------------------
    def add_listener(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    def work_event(self) -> asyncio.Event:
        """The event the next ``wake_work`` sets (take it before looking for work, so no wake-up is missed)."""
        return self._work

    def wake_work(self) -> None:
        self._work.set()
        self._work = asyncio.Event()

    def server_pid(self) -> int | None:
        """The listening connection's backend pid (tests terminate it to simulate a lost connection)."""
        return None if self._conn is None or self._conn.is_closed() else int(self._conn.get_server_pid())

    # --- lifetime -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._connect()
        self._tasks = [
            asyncio.create_task(self._supervise(), name="pg-listen-supervisor"),
            asyncio.create_task(self._dispatch(), name="pg-listen-dispatch"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._drop()
        self.wake_work()

    # --- the listening connection ---------------------------------------------------------------------------
    async def _connect(self) -> None:
        self._lost = asyncio.Event()
        lost = self._lost
        conn = await asyncpg.connect(
            self._dsn, timeout=CONNECT_TIMEOUT_S, server_settings={"application_name": LISTEN_APPLICATION}
        )
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(WORK_CHANNEL, self._on_notify)
            await conn.add_listener(LOG_CHANNEL, self._on_notify)
            self._db_now = await conn.fetchval(DB_NOW, self._offset())
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        await close_connection(conn)

    def _on_notify(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        parts = payload.split(" ")
        if parts[-1] == self._instance_id:
            return  # our own commit: local waiters were woken directly
        if channel == WORK_CHANNEL:
            self.wake_work()
        elif channel == LOG_CHANNEL and len(parts) == 3 and parts[1].isdigit() and self._listeners:
            session_id, last_seq = parts[0], int(parts[1])
            self._pending[session_id] = max(self._pending.get(session_id, 0), last_seq)
            self._pending_ready.set()

    async def _alive(self) -> bool:
        if self._conn is None or self._conn.is_closed():
            return False
        try:
            self._db_now = await asyncio.wait_for(
                self._conn.fetchval(DB_NOW, self._offset()), CONNECT_TIMEOUT_S
            )
        except DRIVER_ERRORS:
            return False
        return True

    async def _supervise(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), self._keepalive_s)
            except TimeoutError:
                if await self._alive():
                    continue
            # Notifications may have been lost since the last sign of life (and a transaction that committed
            # after it may have stamped its rows up to a ping timeout before it): look back from there.
            assert self._db_now is not None  # read when the connection was opened
            since = self._db_now - timedelta(seconds=2 * CONNECT_TIMEOUT_S)
            log.warning("lost the PostgreSQL LISTEN connection; reconnecting")
            await self._drop()
            self.wake_work()  # workers re-check the store while we are deaf
            await self._reconnect(since)
            self.reconnects += 1
            self.wake_work()

    async def _reconnect(self, since: datetime) -> None:
        backoff_s = 0.05
        while True:
            try:
                await self._connect()
                # LISTEN is active again: anything committed from now on is notified; catch up on the rest.
                for session_id, last_seq in await self._catch_up(since):
                    self._pending[session_id] = max(self._pending.get(session_id, 0), last_seq)
                self._pending_ready.set()
                return
            except _RECONNECT_ERRORS as exc:
                log.warning("PostgreSQL LISTEN reconnect failed (%s); retrying in %.2fs", exc, backoff_s)
                await self._drop()
                await asyncio.sleep(backoff_s)
                backoff_s = min(self._max_backoff_s, backoff_s * 2)

    async def _dispatch(self) -> None:
        while True:
            await self._pending_ready.wait()
            self._pending_ready.clear()
            batch, self._pending = self._pending, {}
            for session_id, last_seq in batch.items():
                for listener in list(self._listeners):
                    try:
                        await listener(session_id, last_seq)
                    except Exception:
                        log.exception("commit listener failed for %s", session_id)
