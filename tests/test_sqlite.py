"""What only the SQLite backend has: group commit, job isolation inside a batch, pragmas, migrations, and the
driver errors a real file can produce (not a database, read-only). Real files in tmp_path, no mocks."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from service.errors import Conflict, IncompatibleDatabase, LeaseLost, NotFound, QueueFull, StoreUnavailable
from service.models import Claim, NewEntry
from service.queue.migrate import Migration, load_migrations
from service.queue.sqlite import SqliteStore
from service.queue.sqlite.engine import Writer
from service.queue.sqlite.schema import connect, migrate
from tests.conftest import FakeClock


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "service.db")


@pytest.fixture
async def sqlite_store(db_path: str, clock: FakeClock) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(db_path, clock=clock)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def schema_snapshot(path: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        master = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        applied = conn.execute(
            "SELECT version, name, applied_at FROM schema_migrations ORDER BY version"
        ).fetchall()
    conn.close()
    return [*master, *applied]


# --- group commit -----------------------------------------------------------------------------------------------
async def test_concurrent_enqueues_share_commits(sqlite_store: SqliteStore) -> None:
    before = sqlite_store.commits
    results = await asyncio.gather(
        *(sqlite_store.enqueue("alice", f"s{i % 8}", f"m{i}", f"c{i}") for i in range(200))
    )
    commits = sqlite_store.commits - before
    assert 1 <= commits <= 20, commits  # one transaction per batch, not one per enqueue
    for session in range(8):
        seqs = sorted(r.seq for r in results if r.session_id == f"s{session}")
        assert seqs == list(range(1, 26))  # contiguous per session whatever the batching
    assert (await sqlite_store.counts())["queued"] == 200


async def test_a_failing_job_does_not_fail_its_batch(sqlite_store: SqliteStore, db_path: str) -> None:
    await sqlite_store.create_session("alice", "taken", "default", None)
    await sqlite_store.create_session("bob", "bobs", "default", None)
    bogus = Claim(999, "taken", "alice", "default", 1, "x", 1, "r_x", "no-such-token", "w")
    before = sqlite_store.commits
    # gather starts every call before the writer task runs again, so all of them land in ONE batch.
    results = await asyncio.gather(
        sqlite_store.enqueue("alice", "ok1", "first", None),
        sqlite_store.create_session("alice", "taken", "default", None),  # Conflict
        # Creates session "fresh" and THEN fails on max_queued=0: its savepoint must undo the session too.
        sqlite_store.enqueue("alice", "fresh", "too many", None, max_queued=0),
        sqlite_store.enqueue("alice", "bobs", "not yours", None),  # NotFound
        sqlite_store.append(bogus, [NewEntry("TextMessage", "assistant", "hi")]),  # LeaseLost
        sqlite_store.enqueue("alice", "ok2", "second", None),
        return_exceptions=True,
    )
    assert sqlite_store.commits - before == 1
    ok1, conflict, full, not_found, lost, ok2 = results
    assert isinstance(conflict, Conflict)
    assert isinstance(full, QueueFull)
    assert isinstance(not_found, NotFound)
    assert isinstance(lost, LeaseLost)
    assert not isinstance(ok1, BaseException) and ok1.seq == 1
    assert not isinstance(ok2, BaseException) and ok2.seq == 1
    assert await sqlite_store.get_session("alice", "fresh") is None
    assert (await sqlite_store.read_log("taken")).last_seq == 0
    with sqlite3.connect(db_path) as raw:  # what is on disk, not what the store says
        sessions = {row[0] for row in raw.execute("SELECT session_id FROM sessions")}
    raw.close()
    assert sessions == {"taken", "bobs", "ok1", "ok2"}


async def test_close_drains_queued_writes(db_path: str, clock: FakeClock) -> None:
    store = SqliteStore(db_path, clock=clock)
    await store.open()
    # Tasks run in creation order: every enqueue is in the writer's queue before close() stops taking jobs.
    writes = [asyncio.create_task(store.enqueue("alice", "s1", f"m{i}", None)) for i in range(50)]
    closer = asyncio.create_task(store.close())
    done = await asyncio.gather(*writes)
    await closer
    await store.close()  # idempotent
    assert [d.seq for d in done] == list(range(1, 51))
    with pytest.raises(StoreUnavailable):
        await store.enqueue("alice", "s1", "late", None)
    reopened = SqliteStore(db_path, clock=clock)
    await reopened.open()
    try:
        assert (await reopened.read_log("s1")).last_seq == 50
    finally:
        await reopened.close()


# --- connection settings ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "code"), [("FULL", 2), ("NORMAL", 1), ("normal", 1)])
async def test_synchronous_is_honoured(db_path: str, mode: str, code: int) -> None:
    store = SqliteStore(db_path, synchronous=mode)
    await store.open()
    try:
        pragmas = await store.pragmas()
    finally:
        await store.close()
    assert pragmas == {"journal_mode": "wal", "synchronous": code, "foreign_keys": 1, "busy_timeout": 5000}


def test_synchronous_is_validated(db_path: str) -> None:
    with pytest.raises(ValueError, match="FULL or NORMAL"):
        SqliteStore(db_path, synchronous="OFF")


async def test_parent_directories_are_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "service.db"
    store = SqliteStore(str(path))
    await store.open()
    await store.close()
    assert path.is_file()


# --- driver errors ----------------------------------------------------------------------------------------------
@pytest.fixture
def not_a_database(db_path: str) -> str:
    Path(db_path).write_bytes(b"this is a text file, not SQLite\n" * 200)
    return db_path


async def test_not_a_database(not_a_database: str) -> None:
    store = SqliteStore(not_a_database)
    with pytest.raises(StoreUnavailable, match="is not a SQLite database") as caught:
        await store.open()
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)
    await store.close()


@contextmanager
def read_only(path: str) -> Iterator[None]:
    """Make ``path`` really read-only. As root, permission bits do not stop writes; the immutable attribute
    (chattr +i) does. Skipped where neither is possible."""
    if os.geteuid() != 0:
        os.chmod(path, 0o444)
        try:
            yield
        finally:
            os.chmod(path, 0o644)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", path], check=False).returncode != 0:
        pytest.skip("running as root and this filesystem has no immutable attribute")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", path], check=True)


async def test_read_only_file_is_unavailable_at_open(db_path: str) -> None:
    store = SqliteStore(db_path)
    await store.open()
    await store.enqueue("alice", "s1", "kept", None)
    await store.close()
    with read_only(db_path):
        ro = SqliteStore(db_path)
        with pytest.raises(StoreUnavailable, match="is read-only") as caught:
            await ro.open()
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
        await ro.close()
    store = SqliteStore(db_path)  # writable again: nothing was lost or changed
    await store.open()
    try:
        assert [e.content for e in (await store.read_log("s1")).messages] == ["kept"]
    finally:
        await store.close()


async def test_read_only_uri_is_unavailable_at_open(db_path: str) -> None:
    """The same path through SQLite's own read-only mode (a file: URI), which holds whoever runs the tests."""
    store = SqliteStore(db_path)
    await store.open()
    await store.close()
    ro = SqliteStore(f"file:{db_path}?mode=ro")
    with pytest.raises(StoreUnavailable, match="is read-only"):
        await ro.open()
    await ro.close()


# --- migrations -------------------------------------------------------------------------------------------------
async def test_migrations_apply_once(db_path: str) -> None:
    store = SqliteStore(db_path)
    await store.open()
    assert await store.ping()
    await store.close()
    first = schema_snapshot(db_path)
    assert [row[:2] for row in first if isinstance(row[0], int)] == [
        (1, "initial"),
        (2, "input_failures"),
        (3, "answers_and_interruptions"),
        (4, "drafts"),
        (5, "verb_functions"),
        (6, "state_pieces"),
        (8, "multitask_strategy"),
        (9, "trace_context"),
        (10, "webhooks"),
        (11, "cached_plans"),
        (12, "session_lock_first"),
        (13, "cheaper_writes"),
        (14, "claim_held_state"),
    ]
    store = SqliteStore(db_path)
    await store.open()  # second open: nothing to apply, nothing changes
    await store.close()
    assert schema_snapshot(db_path) == first


async def test_an_older_database_is_upgraded_with_its_data(db_path: str) -> None:
    store = SqliteStore(db_path)
    await store.open()
    await store.enqueue("local", "s1", "queued before the upgrade", "m1")
    await store.close()
    with sqlite3.connect(db_path) as raw:  # as the previous version left it: migration 1 only
        raw.execute("ALTER TABLE inputs DROP COLUMN failures")
        raw.execute("DELETE FROM schema_migrations WHERE version = 2")
    store = SqliteStore(db_path)
    await store.open()
    try:
        claim = await store.claim("w", 30)
        assert claim is not None and (claim.content, claim.failures) == ("queued before the upgrade", 0)
        assert (await store.enqueue("local", "s1", "again", "m1")).duplicate  # idempotency kept
    finally:
        await store.close()


async def test_unknown_migration_is_incompatible(db_path: str) -> None:
    store = SqliteStore(db_path)
    await store.open()
    await store.close()
    with sqlite3.connect(db_path) as raw:
        raw.execute(
            "INSERT INTO schema_migrations VALUES (9999, 'from_the_future', '2030-01-01T00:00:00.000000Z')"
        )
    raw.close()
    before = schema_snapshot(db_path)
    newer = SqliteStore(db_path)
    with pytest.raises(IncompatibleDatabase, match=r"\[9999\].*newer version"):
        await newer.open()
    await newer.close()
    assert schema_snapshot(db_path) == before


def test_a_failing_migration_leaves_nothing_behind(db_path: str) -> None:
    good = load_migrations("sqlite")
    broken = Migration(99, "broken", "CREATE TABLE half_done (x INTEGER);\nTHIS IS NOT SQL;\n")
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError):
            migrate(conn, [*good, broken])
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations")]
        assert "half_done" not in tables and "sessions" in tables  # the good ones committed, 0099 rolled back
        assert versions == [m.version for m in good]
        assert migrate(conn, good) == []  # running again applies nothing
    finally:
        conn.close()


async def test_ping_is_false_when_a_migration_is_pending(sqlite_store: SqliteStore, db_path: str) -> None:
    assert await sqlite_store.ping()
    with sqlite3.connect(db_path) as raw:
        raw.execute("DELETE FROM schema_migrations")
    raw.close()
    assert not await sqlite_store.ping()


# --- the writer on its own: failures SQLite really produces ------------------------------------------------------
@pytest.fixture
async def writer(db_path: str) -> AsyncIterator[Writer]:
    w = Writer("test-writer", db_path)
    conn = await w.open(lambda: connect(db_path, synchronous="FULL", writer=True))
    await w.call(
        conn.executescript,
        "CREATE TABLE parent (id INTEGER PRIMARY KEY);"
        "CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES parent (id), blob BLOB);"
        "INSERT INTO parent (id) VALUES (1);",
    )
    w.start()
    try:
        yield w
    finally:
        await w.close()


def insert_child(child_id: int, parent_id: int = 1) -> Callable[[sqlite3.Cursor], int]:
    def job(conn: sqlite3.Cursor) -> int:
        conn.execute("INSERT INTO child (id, parent_id) VALUES (?, ?)", (child_id, parent_id))
        return child_id

    return job


def orphan_checked_at_commit(conn: sqlite3.Cursor) -> None:
    # A deferred foreign key is only checked by COMMIT: the job succeeds, the commit of its batch fails.
    conn.execute("PRAGMA defer_foreign_keys = ON")
    conn.execute("INSERT INTO child (id, parent_id) VALUES (100, 999)")


def child_ids(path: str) -> list[int]:
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT id FROM child ORDER BY id")]
    finally:
        conn.close()


async def test_a_failed_commit_fails_every_job_of_the_batch(writer: Writer, db_path: str) -> None:
    before = writer.commits
    results = await asyncio.gather(
        writer.write(insert_child(1)),
        writer.write(orphan_checked_at_commit),
        writer.write(insert_child(2)),
        return_exceptions=True,
    )
    assert all(isinstance(r, StoreUnavailable) and "commit" in r.message for r in results), results
    assert all(
        isinstance(r, BaseException) and isinstance(r.__cause__, sqlite3.IntegrityError) for r in results
    )
    assert writer.commits == before
    assert child_ids(db_path) == []  # nothing of the batch is on disk
    assert await writer.write(insert_child(3)) == 3  # and the writer goes on
    assert child_ids(db_path) == [3]


async def test_disk_full_is_unavailable(writer: Writer, db_path: str) -> None:
    def fill(conn: sqlite3.Cursor) -> None:
        # SQLite's own page limit gives the real SQLITE_FULL error without filling a real disk.
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        conn.execute(f"PRAGMA max_page_count = {pages}")
        conn.execute("INSERT INTO child (id, parent_id, blob) VALUES (7, 1, zeroblob(1000000))")

    ok, full = await asyncio.gather(writer.write(insert_child(1)), writer.write(fill), return_exceptions=True)
    assert isinstance(full, StoreUnavailable) and "is full" in full.message
    assert ok == 1 or isinstance(ok, StoreUnavailable)  # SQLite may roll back the whole transaction on FULL
    assert 7 not in child_ids(db_path)


async def test_exclusive_store_locks_the_file_and_requeues_orphans_at_once(tmp_path: Path) -> None:
    """The server's SQLite store: one process per file, and a restart re-queues a dead run without waiting."""
    path = str(tmp_path / "x.db")
    first = SqliteStore(path, exclusive=True)
    await first.open()
    await first.enqueue("local", "s1", "hello", "m1")
    claim = await first.claim("dead-worker", lease_s=3600)
    assert claim is not None
    second = SqliteStore(path, exclusive=True)
    with pytest.raises(StoreUnavailable, match="in use by another service process"):
        await second.open()
    await first.close()  # like a crash: the run never finished, its lease is still an hour long
    third = SqliteStore(path, exclusive=True)
    await third.open()
    try:
        page = await third.read_log("s1")
        assert [e.type for e in page.messages] == ["TextMessage", "run_started", "run_interrupted"]
        again = await third.claim("new-worker", lease_s=30)
        assert again is not None and again.attempt == 2 and again.input_seq == 1
    finally:
        await third.close()


async def test_a_version_2_database_is_upgraded_with_a_waiting_question(db_path: str) -> None:
    """Migration 0003 on a database the previous version wrote: a run that was waiting for an answer when that
    version died is re-queued, takes the answer queued meanwhile, and the answer stays bound to it (a retry gets
    it again)."""
    with closing(sqlite3.connect(db_path, isolation_level=None)) as raw:
        migrate(raw, load_migrations("sqlite")[:2])
        now = "2026-11-24T10:00:00.000000+00:00"
        raw.executescript(
            f"""
            INSERT INTO sessions VALUES ('s1', 'local', 'default', NULL, 'awaiting_input', 4, '{now}', '{now}');
            INSERT INTO entries VALUES ('s1', 1, 'TextMessage', 'user', '"[[ask]] trip"', NULL, 'm1', '{{}}', '{now}');
            INSERT INTO entries VALUES ('s1', 2, 'run_started', 'system', '"Run started."', 'r_old', NULL,
                '{{"input_seq": 1, "attempt": 1}}', '{now}');
            INSERT INTO entries VALUES ('s1', 3, 'UserInputRequestedEvent', 'user', '""', 'r_old', NULL, '{{}}',
                '{now}');
            INSERT INTO entries VALUES ('s1', 4, 'TextMessage', 'user', '"Lisbon"', NULL, 'm2', '{{}}', '{now}');
            INSERT INTO inputs (session_id, input_seq, content, status, attempt, not_before, lease_token,
                lease_expires_at, worker_id, run_id, created_at)
                VALUES ('s1', 1, '[[ask]] trip', 'running', 1, 0, 'tok', 1, 'w_old', 'r_old', '{now}');
            INSERT INTO inputs (session_id, input_seq, content, status, attempt, not_before, created_at)
                VALUES ('s1', 4, 'Lisbon', 'queued', 1, 0, '{now}');
            """
        )
    store = SqliteStore(
        db_path, exclusive=True
    )  # the one process of this file: recovers the dead run at once
    await store.open()
    try:
        claim = await store.claim("w", 30)
        assert claim is not None and (claim.input_seq, claim.attempt) == (1, 2)
        answer = await store.take_answer(claim, 0)
        assert answer is not None and (answer.seq, answer.content) == (4, "Lisbon")
        await store.release(claim, NewEntry("run_interrupted", "system", "stopped"))
        again = await store.claim("w", 30)
        assert again is not None and again.input_seq == 1
        assert await store.take_answer(again, 0) == answer
        assert await store.counts() == {"queued": 0, "running": 1}
        assert (await store.enqueue("local", "s1", "dup", "m2")).duplicate  # idempotency kept
    finally:
        await store.close()


async def test_readiness_says_no_while_another_process_holds_the_write_lock(db_path: str) -> None:
    """ping() (GET /readyz) answers within its probe bound and is False while the file cannot take a write."""
    store = SqliteStore(db_path)
    await store.open()
    try:
        assert await store.ping()
        with closing(sqlite3.connect(db_path, isolation_level=None)) as holder:
            holder.execute("BEGIN IMMEDIATE")  # another process's long write transaction
            assert not await store.ping()
            holder.execute("ROLLBACK")
        assert await store.ping()
        await store.enqueue("local", "s1", "after the lock", None)  # the probe left the writer working
    finally:
        await store.close()
