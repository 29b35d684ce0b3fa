"""PostgreSQL connections: a pool for reads, and ``writers`` writer connections that group-commit.

Group commit (README "Deploying on PostgreSQL"): every write verb is one call ``{"op": ..., ...}`` of an SQL
function. The writer takes every call waiting, puts them in the one lock order (``lock_order``: so batches of
several writers and instances never deadlock each other), and runs them in ONE statement, ``svc_batch``: one round trip, one
transaction, one WAL flush. Each caller is answered only after that statement returned, i.e. after COMMIT:
nothing is acknowledged before it is durable. A verb that breaks a rule answers ``{"err": ...}`` and writes
nothing; if the statement fails for another reason (a value the database refuses, a deadlock), nothing of it
was committed and the batch is run again one call per statement, so only the failing call fails. A lost
connection fails the whole batch with StoreUnavailable; the next batch reconnects.

Several writers (``pg_writers``, default 1): each takes its share of the calls waiting when it is free, and
the database works on their batches at once (one process per connection). The lock order is what makes that
safe: batches of two writers are no different from batches of two instances. A caller has one call in flight at
a time, so one caller's calls still commit in the order it made them. Measured (bench/queue.py, README
"Benchmarks"): two writers make more, smaller commits, which costs the database 35-60% more CPU per write, so they
only pay on a database server with idle cores.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from service.errors import BadRequest, ServiceError, StoreUnavailable
from service.queue.batches import Batches, fail
from service.queue.postgres import statements as q
from service.queue.postgres.errors import (
    CONNECT_TIMEOUT_S,
    DRIVER_ERRORS,
    close_connection,
    connection_lost,
    translate,
)
from service.queue.postgres.schema import init_connection

Offset = Callable[[], float]  # seconds added to the database's clock (0 in production; tests move it)
MAX_BATCH = 256  # bounds one transaction's locks and the wait of its first caller
DEFAULT_WRITERS = 1


@dataclass(slots=True)
class _Call:
    session: str | None  # the session the call names (its lock), None for a claim (it picks one)
    body: bytes  # the call as JSON
    future: asyncio.Future[Any]


class Engine:
    """The pool (reads) and the writer (group-committed verb calls) of one PostgresStore."""

    def __init__(
        self,
        dsn: str,
        offset: Offset,
        *,
        min_size: int = 1,
        max_size: int = 10,
        writers: int = DEFAULT_WRITERS,
        server_settings: dict[str, str] | None = None,
    ) -> None:
        """``writers``: connections that run batches at once (at least 1)."""
        self.dsn = dsn
        # Connection settings of every connection that writes (svc.webhook_url, migration 0010).
        self.server_settings = server_settings or {}
        self.offset = offset
        self._min_size = min_size
        self._max_size = max_size
        self._pool: Any = None
        self._conns: list[Any] = [None] * max(1, writers)  # the writers' connections
        self._batches: Batches[_Call] = Batches(MAX_BATCH)
        self._tasks: list[asyncio.Task[None]] = []
        self.batches = 0  # statements the writer ran (commits, when they succeed)
        self.calls = 0

    @property
    def commits(self) -> int:
        """Write transactions so far (group commit makes this far smaller than the verb calls)."""
        return self.batches

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=self._min_size,
            max_size=self._max_size,
            init=init_connection,
            timeout=CONNECT_TIMEOUT_S,
            server_settings=self.server_settings,
        )
        for n in range(
            len(self._conns)
        ):  # one by one into place, so close() closes those opened if one fails
            self._conns[n] = await self._connect()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._batches.serve(functools.partial(self._run, n)), name=f"pg-writer-{n}")
            for n in range(len(self._conns))
        ]

    async def close(self) -> None:
        """Stop taking calls, run (or fail) those already waiting, then close every connection."""
        self._batches.close()
        tasks, self._tasks = self._tasks, []
        await asyncio.gather(*tasks)
        conns, self._conns = self._conns, [None] * len(self._conns)
        for conn in conns:
            await close_connection(conn)
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), CONNECT_TIMEOUT_S)
            except DRIVER_ERRORS:
                pool.terminate()

    # --- reads --------------------------------------------------------------------------------------------------
    @asynccontextmanager
    async def conn(self) -> AsyncIterator[Any]:
        """A pool connection; driver errors leave as the service's errors (errors.translate)."""
        if self._pool is None:
            raise StoreUnavailable("the PostgreSQL store is not open")
        try:
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn:
                yield conn
        except DRIVER_ERRORS as exc:
            raise translate(exc) from exc

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Any]:
        """A read-only transaction on one snapshot (a page and its last_seq agree)."""
        async with self.conn() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            yield conn

    async def notify(self, channels: list[str], payloads: list[str]) -> None:
        async with self.conn() as conn:
            await conn.execute(q.NOTIFY_MANY, channels, payloads)

    # --- writes -------------------------------------------------------------------------------------------------
    async def call(self, op: dict[str, Any]) -> Any:
        """Run one verb call in the next group commit; its answer once that commit is durable."""
        if self._batches.closing or not self._tasks or all(task.done() for task in self._tasks):
            raise StoreUnavailable("the store is closed")
        try:  # here, so a value JSON cannot carry fails this call only
            body = orjson.dumps(op)
        except orjson.JSONEncodeError as exc:
            raise BadRequest(f"the database cannot store this value: {exc}") from exc
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._batches.add(_Call(op.get("session"), body, future))
        return await future

    async def _connect(self) -> Any:
        conn = await asyncpg.connect(
            self.dsn, timeout=CONNECT_TIMEOUT_S, server_settings=self.server_settings
        )
        try:
            await init_connection(conn)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _run(self, writer: int, batch: list[_Call]) -> None:
        batch.sort(key=lock_order)  # stable: one session's calls keep their order
        try:
            answers = await self._execute(writer, batch)
        except asyncio.CancelledError:
            fail(batch, StoreUnavailable("the PostgreSQL writer was cancelled mid-commit"))
            raise
        except Exception as exc:  # a bug, not a driver error (those are outcomes): fail the batch, keep going
            fail(batch, StoreUnavailable(f"the PostgreSQL writer failed: {exc!r}"))
            return
        self.batches += 1
        self.calls += len(batch)
        for call, answer in zip(batch, answers, strict=True):
            if call.future.done():  # the caller was cancelled; its call may still have committed
                continue
            if isinstance(answer, BaseException):
                call.future.set_exception(answer)
            else:
                call.future.set_result(answer)

    async def _execute(self, writer: int, batch: list[_Call]) -> list[Any]:
        """The answers of one batch on connection ``writer`` (an exception in place of a failed call's answer)."""
        try:
            conn = await self._writer_conn(writer)
            calls = b"[" + b",".join(c.body for c in batch) + b"]"
            answers: list[Any] = await conn.fetchval(q.BATCH, calls.decode(), self.offset())
            return answers
        except DRIVER_ERRORS as exc:
            if connection_lost(exc) or len(batch) == 1:
                self._drop_if_broken(writer)
                return [_error(exc) for _ in batch]
        # The statement was refused and nothing of it committed: one call per statement, so only the failing
        # call fails.
        out: list[Any] = []
        for call in batch:
            try:
                conn = await self._writer_conn(writer)
                [answer] = await conn.fetchval(q.BATCH, "[" + call.body.decode() + "]", self.offset())
                out.append(answer)
            except DRIVER_ERRORS as exc:
                self._drop_if_broken(writer)
                out.append(_error(exc))
        return out

    async def _writer_conn(self, writer: int) -> Any:
        conn = self._conns[writer]
        if conn is None or conn.is_closed():
            self._conns[writer] = None
            self._conns[writer] = conn = await self._connect()
        return conn

    def _drop_if_broken(self, writer: int) -> None:
        conn = self._conns[writer]
        if conn is not None and conn.is_closed():
            self._conns[writer] = None


def lock_order(call: _Call) -> tuple[bool, str]:
    """The one order in which every batch takes its session locks: calls naming a session by session id, then
    the calls that name none (a claim locks the session it picks, with SKIP LOCKED, so it never waits).

    Why it cannot deadlock: every verb locks its session's row before any other row of that session (migration
    0012), so a batch only ever waits while taking the named sessions, in ascending order, holding only smaller
    ones; a claim's lock is taken after those and never waited for. Two batches waiting on each
    other would each hold a session smaller than the one it waits for, which the other holds: impossible. (With
    claims first, a claim could hold a session a later call of its batch and another batch both wanted.)"""
    return (call.session is None, call.session or "")


def _error(exc: BaseException) -> ServiceError:
    error = translate(exc)
    error.__cause__ = exc
    return error
