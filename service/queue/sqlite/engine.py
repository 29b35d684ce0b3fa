"""SQLite connections: the store's two threads, ONE writer that group-commits and a reader, and the file lock
that keeps one service process per file.

Why threads and plain sqlite3 instead of aiosqlite: aiosqlite hops threads once per statement, and an enqueue
is five statements. Measured on this machine (4,000 enqueue-shaped jobs, synchronous=FULL, WAL): one commit
per job 3,758 jobs/s with sqlite3 in a thread vs 1,177 with aiosqlite; 64 jobs per commit 68,226 vs 2,164.
Here a whole batch of jobs is ONE hop to the writer thread.

Group commit: the writer task takes every write job waiting in its queue, runs them in one ``BEGIN IMMEDIATE
... COMMIT`` (a job that raises is rolled back alone, see ``_commit_batch``), and only after the COMMIT
resolves the callers' futures. A failed COMMIT fails every job of the batch: nothing is acknowledged
that is not durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from service.errors import ServiceError, StoreUnavailable
from service.queue.batches import Batches, fail
from service.queue.sqlite.errors import translate
from service.queue.sqlite.schema import BUSY_TIMEOUT_MS, connect, prepare, read_pragmas

T = TypeVar("T")
Job = Callable[[sqlite3.Cursor], Any]
MAX_BATCH = 512  # bounds how long one transaction holds the write lock (and the latency of its first caller)
WAL_CHECK_S = (
    10.0  # how often the writer checks the WAL's size (README "Storage": back under the bound in < 1 min)
)


@dataclass(slots=True)
class _Pending:
    job: Job
    future: asyncio.Future[Any]


@dataclass(slots=True)
class _Outcome:
    ok: bool
    value: Any


class Engine:
    """The writer (group-committed jobs) and the reader of one SqliteStore, each on its own connection."""

    def __init__(
        self, path: str, *, synchronous: str, wal_limit_bytes: int, wal_check_s: float = WAL_CHECK_S
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self.wal_limit_bytes = wal_limit_bytes
        self.writer = Writer("sqlite-writer", path, wal_limit_bytes=wal_limit_bytes, wal_check_s=wal_check_s)
        self.reader = Reader("sqlite-reader", path)

    @property
    def commits(self) -> int:
        """Write transactions committed so far (group commit makes this far smaller than the writes)."""
        return self.writer.commits

    async def open(self) -> None:
        """Connect the writer, migrate the file and check it takes writes (schema.prepare), connect the reader,
        then start the writer. On failure both connections are closed again."""
        try:
            writer = await self.writer.open(
                lambda: connect(
                    self.path, synchronous=self.synchronous, writer=True, wal_limit_bytes=self.wal_limit_bytes
                )
            )
            await self.writer.call(prepare, writer, self.path)
            await self.reader.open(lambda: connect(self.path, synchronous=self.synchronous, writer=False))
        except BaseException:
            await self.close()
            raise
        self.writer.start()

    async def close(self) -> None:
        await self.writer.close()
        await self.reader.close()

    async def write(self, job: Callable[[sqlite3.Cursor], T]) -> T:
        """Run ``job`` in the writer's next group commit; returns once that commit is durable."""
        return await self.writer.write(job)

    async def read(self, job: Callable[[sqlite3.Cursor], T]) -> T:
        """Run ``job`` on the reader, in one read transaction (a consistent WAL snapshot)."""
        return await self.reader.read(job)

    async def pragmas(self) -> dict[str, Any]:
        """The write connection's settings as SQLite reports them."""
        conn = self.writer.conn
        if conn is None:
            raise StoreUnavailable("the store is closed")
        return await self.writer.call(read_pragmas, conn)


class Thread:
    """One connection confined to one dedicated thread."""

    def __init__(self, name: str, path: str) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)
        self.conn: sqlite3.Connection | None = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self, factory: Callable[[], sqlite3.Connection]) -> sqlite3.Connection:
        self.conn = await self.call(factory)
        return self.conn

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await self.call(conn.close)
        self._executor.shutdown(wait=True)


class Reader(Thread):
    async def read(self, job: Callable[[sqlite3.Cursor], T]) -> T:
        """Run ``job`` in one read transaction (a consistent WAL snapshot)."""
        conn = self.conn
        if conn is None:
            raise StoreUnavailable("the store is closed")
        return await self.call(_read, conn, job, self.path)


def _read(conn: sqlite3.Connection, job: Callable[[sqlite3.Cursor], T], path: str) -> T:
    try:
        conn.execute("BEGIN")
        try:
            return job(conn.cursor())
        finally:
            conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise translate(exc, path) from exc


class Writer(Thread):
    def __init__(
        self, name: str, path: str, *, wal_limit_bytes: int | None = None, wal_check_s: float = WAL_CHECK_S
    ) -> None:
        """``wal_limit_bytes``: every ``wal_check_s`` (idle or busy) a WAL larger than this is checkpointed and
        truncated, unless a reader still holds it (then the next check tries again). None: never."""
        super().__init__(name, path)
        self._batches: Batches[_Pending] = Batches(MAX_BATCH)
        self.wal_limit_bytes = wal_limit_bytes
        self.wal_check_s = wal_check_s
        self._next_wal_check = time.monotonic() + wal_check_s
        self.wal_checked = asyncio.Event()  # set after every periodic check (tests wait on it)
        self._task: asyncio.Task[None] | None = None
        self.commits = 0  # transactions committed: group commit makes this much smaller than the jobs run
        self.jobs = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._batches.serve(self._run, every_s=self._wal_every_s(), tick=self._maybe_bound_wal),
            name="sqlite-writer",
        )

    async def write(self, job: Callable[[sqlite3.Cursor], T]) -> T:
        """Run ``job`` in the next group commit; returns once that commit is durable."""
        if self._batches.closing or self.conn is None or self._task is None or self._task.done():
            raise StoreUnavailable("the store is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._batches.add(_Pending(job, future))
        return await future

    async def close(self) -> None:
        """Stop taking jobs, commit (or fail) those already queued, then close the connection."""
        if self._batches.closing:
            return
        self._batches.close()
        if self._task is not None:
            await self._task
        await super().close()

    def _wal_every_s(self) -> float | None:
        """The writer wakes up by itself this often so the WAL is bounded on an idle service too."""
        return self.wal_check_s if self.wal_limit_bytes is not None else None

    async def _maybe_bound_wal(self) -> None:
        if self.wal_limit_bytes is None or time.monotonic() < self._next_wal_check:
            return
        self._next_wal_check = time.monotonic() + self.wal_check_s
        await self.bound_wal()
        self.wal_checked.set()

    async def bound_wal(self) -> int:
        """Checkpoint and truncate the WAL when it is over the limit (never waits for readers); its size after."""
        conn = self.conn
        if conn is None or self.wal_limit_bytes is None:
            return 0
        return await self.call(_bound_wal, conn, self.path, self.wal_limit_bytes)

    async def _run(self, batch: list[_Pending]) -> None:
        conn = self.conn
        assert conn is not None
        try:
            outcomes, committed = await self.call(_commit_batch, conn, [p.job for p in batch], self.path)
        except asyncio.CancelledError:
            # The outcome is unknown, so nobody is told their write happened (a client that retries with its
            # client_msg_id is deduplicated if it did).
            fail(batch, StoreUnavailable("the SQLite writer was cancelled mid-commit"))
            raise
        except Exception as exc:  # a bug, not a driver error (those are outcomes): fail the batch, keep going
            fail(batch, StoreUnavailable(f"the SQLite writer failed: {exc!r}"))
            await self.call(_rollback, conn)
            return
        if committed:
            self.commits += 1
        self.jobs += len(batch)
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.future.done():  # the caller was cancelled; its job may still have committed
                continue
            if outcome.ok:
                pending.future.set_result(outcome.value)
            else:
                pending.future.set_exception(outcome.value)


def wal_size(path: str) -> int:
    try:
        return os.path.getsize(path + "-wal")
    except OSError:
        return 0


def _bound_wal(conn: sqlite3.Connection, path: str, limit: int) -> int:
    """Runs on the writer thread, between transactions. A WAL grows without bound while a reader holds an old
    snapshot (a backup, a long query): SQLite's automatic checkpoints can copy nothing that reader may still
    read, and even once they catch up the file keeps its size. When it is over ``limit``: a TRUNCATE checkpoint
    with no busy wait (a reader still there makes it give up at once, and the next check tries again), which
    copies every frame back into the database and empties the file. ``journal_size_limit`` (set at connect)
    also trims it whenever SQLite restarts the log by itself."""
    size = wal_size(path)
    if size <= limit:
        return size
    try:
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    except sqlite3.Error:
        pass  # busy or failing: the writes themselves report real trouble; the next check tries again
    return wal_size(path)


def _commit_batch(conn: sqlite3.Connection, jobs: list[Job], path: str) -> tuple[list[_Outcome], bool]:
    """Runs on the writer thread: all jobs in one transaction.

    Fast path: the jobs run back to back. If one raises, the whole transaction is rolled back and the batch is
    replayed with one SAVEPOINT per job, so only the failing job is undone (its partial writes included) and the
    others commit. Jobs only touch the connection (no outside side effects), so replaying them is safe; failures
    (Conflict, QueueFull, LeaseLost) are rare, and the two statements a savepoint costs per job are not (about 15%
    of the writer's time on the queue benchmark)."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        outcomes, failure = _run_fast(conn.cursor(), jobs)
        if outcomes is None:
            if not conn.in_transaction:  # SQLite rolled back by itself (disk full, I/O error): all jobs fail
                driver_error = failure if isinstance(failure, sqlite3.Error) else None
                return _all_failed(len(jobs), path, driver_error), False
            conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
            outcomes = []
            for job in jobs:
                outcome = _run_job(conn, job, path)
                if outcome is None:  # the transaction itself is gone: every job fails, none is acknowledged
                    _rollback(conn)
                    return _all_failed(len(jobs), path, None), False
                outcomes.append(outcome)
    except sqlite3.Error as exc:
        _rollback(conn)
        return _all_failed(len(jobs), path, exc), False
    try:
        conn.execute("COMMIT")
    except (
        sqlite3.Error
    ) as exc:  # disk full, I/O error, a deferred constraint: nothing of the batch is stored
        _rollback(conn)
        return _all_failed(len(jobs), path, exc, commit=True), False
    return outcomes, True


def _run_fast(cursor: sqlite3.Cursor, jobs: list[Job]) -> tuple[list[_Outcome] | None, Exception | None]:
    """Every job without savepoints; stops at the first that raises (the caller replays the batch)."""
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(_Outcome(True, job(cursor)))
        except Exception as exc:
            return None, exc
    return outcomes, None


def _run_job(conn: sqlite3.Connection, job: Job, path: str) -> _Outcome | None:
    """One job inside its own savepoint. A driver error that took the whole transaction with it propagates (the
    batch fails); None when a non-driver error did (should not happen)."""
    conn.execute("SAVEPOINT job")
    try:
        value = job(conn.cursor())
    except Exception as exc:
        # Domain errors (Conflict, QueueFull, LeaseLost, NotFound), constraint errors, bugs: this job only.
        if not conn.in_transaction:
            if isinstance(exc, sqlite3.Error):
                raise
            return None
        conn.execute("ROLLBACK TO job")
        conn.execute("RELEASE job")
        error: BaseException = exc
        if isinstance(exc, sqlite3.Error):
            error = translate(exc, path)
            error.__cause__ = exc
        return _Outcome(False, error)
    conn.execute("RELEASE job")
    return _Outcome(True, value)


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        # SQLite may already have rolled back by itself (disk full, I/O error).
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _all_failed(count: int, path: str, exc: sqlite3.Error | None, *, commit: bool = False) -> list[_Outcome]:
    """One fresh error per job (each caller gets its own traceback), all ``from`` the driver error."""
    outcomes = []
    for _ in range(count):
        error: ServiceError
        if exc is None:
            error = StoreUnavailable(
                f"SQLite lost the transaction on {path}; nothing of this batch was stored"
            )
        elif commit:
            error = StoreUnavailable(f"the commit to {path} failed; nothing of this batch was stored ({exc})")
        else:
            error = translate(exc, path)
        error.__cause__ = exc
        outcomes.append(_Outcome(False, error))
    return outcomes


class FileLock:
    """An exclusive OS lock (flock) held for the life of a store: one service process per SQLite file.

    The kernel drops it when the process dies, even on SIGKILL, so a restart never waits for a stale lock."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def take(cls, path: str) -> FileLock:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StoreUnavailable(
                f"the SQLite database {path.removesuffix('.lock')} is in use by another service process; "
                "SQLite serves one process: use PostgreSQL to run several instances"
            ) from exc
        return cls(fd)

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
