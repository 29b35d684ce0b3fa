"""PostgresBase: connections, lifetime, sessions, the log and cursors of PostgresStore (postgres.py has the
queue verbs and the design notes)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

from service.errors import Conflict, ServiceError, StoreUnavailable
from service.models import (
    DEFAULT_MAX_INTERRUPTIONS,
    Entry,
    NewEntry,
    Page,
    Session,
    SessionStatus,
    new_session_id,
    utcnow,
)
from service.queue import postgres_sql as q
from service.queue import rules, safe_url
from service.queue.migrate import load_migrations, pending
from service.queue.postgres_notify import Notifier
from service.queue.postgres_outbox import Outbox
from service.queue.postgres_schema import (
    CONNECT_TIMEOUT_S,
    DRIVER_ERRORS,
    applied_versions,
    init_connection,
    migrate,
    translate,
)
from service.queue.store import DEFAULT_PAGE, Clock, CommitListener


class PostgresBase:
    def __init__(
        self,
        dsn: str,
        *,
        clock: Clock = utcnow,
        min_size: int = 1,
        max_size: int = 10,
        max_interruptions: int = DEFAULT_MAX_INTERRUPTIONS,
    ) -> None:
        self._dsn = dsn
        self._clock = clock
        self._max_interruptions = max_interruptions
        self._min_size = min_size
        self._max_size = max_size
        self._pool: Any = None
        self.instance_id = uuid.uuid4().hex[:12]
        self.notifier = Notifier(dsn, self.instance_id, clock, self._recent_sessions)
        self._outbox = Outbox(self._send_doorbells, self.instance_id)
        self._doorbells: dict[int, list[tuple[str, str, int]]] = {}  # id(connection) -> this transaction's

    # --- lifetime -------------------------------------------------------------------------------------------
    async def open(self) -> None:
        where = safe_url(self._dsn)
        try:
            conn = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT_S)
            try:
                await migrate(conn, self._clock())
            finally:
                await conn.close()
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                init=init_connection,
                timeout=CONNECT_TIMEOUT_S,
            )
            await self.notifier.start()
            self._outbox.start()
        except DRIVER_ERRORS as exc:
            await self.close()
            raise StoreUnavailable(f"cannot open the PostgreSQL database {where}: {exc}") from exc
        except ServiceError:
            await self.close()
            raise

    async def close(self) -> None:
        await self._outbox.stop()
        await self.notifier.stop()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await pool.close()
            except DRIVER_ERRORS:
                pool.terminate()

    async def ping(self) -> bool:
        try:
            async with self._conn() as conn:
                await conn.fetchval("SELECT 1")
                return not pending(load_migrations("postgres"), await applied_versions(conn))
        except ServiceError:
            return False

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        if self._pool is None:
            raise StoreUnavailable("the PostgreSQL store is not open")
        try:
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn:
                yield conn
        except DRIVER_ERRORS as exc:
            raise translate(exc) from exc

    @asynccontextmanager
    async def _tx(self, **options: Any) -> AsyncIterator[Any]:
        """A transaction; the doorbells it rang (``_notify``) are sent once it committed, never on rollback."""
        async with self._conn() as conn:
            self._doorbells[id(conn)] = []
            try:
                async with conn.transaction(**options):
                    yield conn
            finally:
                doorbells = self._doorbells.pop(id(conn))
            self._outbox.post(doorbells)

    def _notify(self, conn: Any, channel: str, session_id: str, last_seq: int = 0) -> None:
        self._doorbells[id(conn)].append((channel, session_id, last_seq))

    async def _send_doorbells(self, channels: list[str], payloads: list[str]) -> None:
        async with self._conn() as conn:
            await conn.execute(q.NOTIFY_MANY, channels, payloads)

    # --- sessions, log, cursors -----------------------------------------------------------------------------
    async def create_session(
        self, owner: str, session_id: str | None, team: str, title: str | None
    ) -> Session:
        rules.check_labels(session_id=session_id, title=title)
        sid = session_id if session_id is not None else new_session_id()
        async with self._tx() as conn:
            row = await conn.fetchrow(q.INSERT_SESSION, sid, owner, team, title, self._clock())
        if row is None:
            raise Conflict(f"session {sid!r} already exists")
        return q.session_of(row)

    async def get_session(self, owner: str, session_id: str) -> Session | None:
        rules.check_labels(session_id=session_id)
        async with self._conn() as conn:
            row = await conn.fetchrow(q.GET_SESSION, session_id, owner)
        return None if row is None else q.session_of(row)

    async def list_sessions(self, owner: str) -> list[Session]:
        async with self._conn() as conn:
            return [q.session_of(row) for row in await conn.fetch(q.LIST_SESSIONS, owner)]

    async def delete_session(self, owner: str, session_id: str) -> bool:
        rules.check_labels(session_id=session_id)
        async with self._tx() as conn:
            deleted = await conn.fetchval(q.DELETE_SESSION, session_id, owner) is not None
            if deleted:
                # Seq 0: every instance's readers re-read the log, find it shorter than their cursor, and end.
                self._notify(conn, q.LOG_CHANNEL, session_id, 0)
            return deleted

    async def read_log(
        self,
        session_id: str,
        *,
        after: int | None = None,
        before: int | None = None,
        limit: int = DEFAULT_PAGE,
    ) -> Page:
        rules.check_labels(session_id=session_id)
        limit = max(0, limit)  # callers clamp to 1..MAX_PAGE
        # One snapshot: last_seq and the page agree.
        async with self._tx(isolation="repeatable_read", readonly=True) as conn:
            last_seq = await conn.fetchval(q.LAST_SEQ, session_id) or 0
            if before is not None:
                rows = list(
                    reversed(await conn.fetch(q.READ_BEFORE, session_id, before, after or 0, limit + 1))
                )
                has_more = len(rows) > limit
                rows = rows[1:] if has_more else rows
            else:
                rows = await conn.fetch(q.READ_AFTER, session_id, after or 0, limit + 1)
                has_more = len(rows) > limit
                rows = rows[:limit]
        return Page(session_id, [q.entry_of(r) for r in rows], last_seq, has_more)

    async def get_cursor(self, session_id: str, client_id: str) -> int | None:
        rules.check_labels(session_id=session_id, client_id=client_id)
        async with self._conn() as conn:
            value = await conn.fetchval(q.GET_CURSOR, session_id, client_id)
        return None if value is None else int(value)

    async def set_cursor(self, session_id: str, client_id: str, seq: int) -> int:
        rules.check_labels(session_id=session_id, client_id=client_id)
        async with self._tx() as conn:
            value = await conn.fetchval(q.SET_CURSOR, session_id, client_id, seq)
        return 0 if value is None else int(value)

    async def load_team_state(self, session_id: str) -> dict[str, Any] | None:
        rules.check_labels(session_id=session_id)
        async with self._conn() as conn:
            state: dict[str, Any] | None = await conn.fetchval(q.LOAD_STATE, session_id)
        return state

    async def listen(self, listener: CommitListener) -> None:
        self.notifier.add_listener(listener)

    async def _recent_sessions(self, since: datetime) -> list[tuple[str, int]]:
        async with self._conn() as conn:
            return [(r["session_id"], r["last_seq"]) for r in await conn.fetch(q.RECENT_SESSIONS, since)]

    async def _append(
        self,
        conn: Any,
        session_id: str,
        items: Sequence[NewEntry],
        *,
        now: datetime,
        run_id: str | None,
        client_msg_id: str | None = None,
        status: SessionStatus | None = None,
    ) -> list[Entry]:
        """Allocate seqs and insert entries; the caller holds the session row lock."""
        last = await conn.fetchval(
            q.ALLOCATE_SEQS, session_id, len(items), now, None if status is None else status.value
        )
        first = last - len(items) + 1
        entries = [
            Entry(first + i, session_id, e.type, e.source, e.content, now, run_id, client_msg_id, e.metadata)
            for i, e in enumerate(items)
        ]
        if entries:
            await conn.executemany(
                q.INSERT_ENTRY,
                [
                    (
                        session_id,
                        e.seq,
                        e.type,
                        e.source,
                        e.content,
                        e.run_id,
                        e.client_msg_id,
                        e.metadata,
                        now,
                    )
                    for e in entries
                ],
            )
            self._notify(conn, q.LOG_CHANNEL, session_id, last)
        return entries
