"""SQLite connections: pragmas, driver-error translation and migrations (all synchronous; run on the store's
threads, never on the event loop)."""

from __future__ import annotations

import fcntl
import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.errors import Conflict, IncompatibleDatabase, ServiceError, StoreUnavailable
from service.models import utcnow
from service.queue.migrate import Migration, load_migrations, pending, split_statements

SYNCHRONOUS_MODES = {"FULL": 2, "NORMAL": 1}
BUSY_TIMEOUT_MS = 5000
# UPSERT (cursors) needs 3.24. RETURNING (3.35) is deliberately not used: the single writer holds the write
# lock for its whole transaction, so SELECT-then-UPDATE is race-free on any SQLite Python ships with.
MIN_SQLITE = (3, 24, 0)

_CREATE_MIGRATIONS = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"""


def stamp(ts: datetime) -> str:
    """Fixed-width ISO 8601 UTC with microseconds (``2026-11-24T10:00:00.123000+00:00``): sorts and compares as
    text, round-trips exactly. isoformat, not strftime: it is 3x cheaper, and this runs for every write."""
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def check_synchronous(value: str) -> str:
    mode = value.upper()
    if mode not in SYNCHRONOUS_MODES:
        raise ValueError(f"sqlite synchronous must be FULL or NORMAL, not {value!r}")
    return mode


def connect(
    path: str, *, synchronous: str, writer: bool, wal_limit_bytes: int | None = None
) -> sqlite3.Connection:
    """A connection with the store's pragmas. ``path`` may be a ``file:`` URI (e.g. ``?mode=ro``)."""
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise StoreUnavailable(f"SQLite {sqlite3.sqlite_version} is too old: the store needs 3.24 or newer")
    uri = path.startswith("file:")
    if not uri and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves. The connection is confined to one thread (the
        # writer's or the reader's), which is what check_same_thread would enforce; False lets close() run
        # there too without ceremony.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, uri=uri)
    except sqlite3.Error as exc:
        raise translate(exc, path) from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreUnavailable(f"{path}: could not switch to WAL journal mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        if wal_limit_bytes is not None:
            # Whenever SQLite restarts the log from its beginning, it truncates the file to this size.
            conn.execute(f"PRAGMA journal_size_limit = {int(wal_limit_bytes)}")
        if not writer:
            conn.execute("PRAGMA query_only = ON")  # the read connection must never write by accident
    except sqlite3.Error as exc:
        conn.close()
        raise translate(exc, path) from exc
    except ServiceError:
        conn.close()
        raise
    return conn


def translate(exc: sqlite3.Error, path: str) -> ServiceError:
    """A driver error as the service's own error, with a message an operator can act on."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if isinstance(exc, sqlite3.IntegrityError):
        return Conflict(f"conflict: {text}")
    if name == "SQLITE_NOTADB" or "not a database" in text:
        return StoreUnavailable(f"{path} is not a SQLite database ({text})")
    if name.startswith("SQLITE_READONLY") or "readonly" in text or "read-only" in text:
        return StoreUnavailable(f"{path} is read-only; the service needs to write to it ({text})")
    if name == "SQLITE_FULL" or "disk is full" in text:
        return StoreUnavailable(f"the disk holding {path} is full ({text})")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return StoreUnavailable(f"{path} is locked by another connection ({text})")
    if name.startswith("SQLITE_CANTOPEN") or "unable to open" in text:
        return StoreUnavailable(f"cannot open {path} ({text})")
    return StoreUnavailable(f"SQLite error on {path}: {text}")


def read_pragmas(conn: sqlite3.Connection) -> dict[str, Any]:
    names = ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
    return {name: conn.execute(f"PRAGMA {name}").fetchone()[0] for name in names}


def applied_versions(conn: sqlite3.Connection) -> set[int]:
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    if exists is None:
        return set()
    return {int(v) for (v,) in conn.execute("SELECT version FROM schema_migrations")}


def migrate(conn: sqlite3.Connection, known: list[Migration] | None = None) -> list[int]:
    """Apply pending migrations, each file in its own transaction together with its schema_migrations row.
    Returns the versions applied. A database that is up to date is only read (no write transaction at all), so
    this also works on a read-only file; one with unknown versions raises IncompatibleDatabase untouched."""
    known = load_migrations("sqlite") if known is None else known
    todo = pending(known, applied_versions(conn))
    done: list[int] = []
    for migration in todo:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_CREATE_MIGRATIONS)
            # Another process may have applied it between our read and our write lock.
            again = pending(known, applied_versions(conn))
            if migration in again:
                for statement in split_statements(migration.sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, stamp(utcnow())),
                )
                done.append(migration.version)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return done


def prepare(conn: sqlite3.Connection, path: str) -> None:
    """Migrate, then check the file is writable; driver errors become StoreUnavailable."""
    try:
        migrate(conn)
        probe_write(conn)
    except sqlite3.Error as exc:
        raise translate(exc, path) from exc


PROBE_WRITE = (
    "UPDATE schema_migrations SET name = name WHERE version = (SELECT max(version) FROM schema_migrations)"
)


def probe_write_in_transaction(db: sqlite3.Cursor) -> None:
    """Readiness: a write (a row rewritten with its own value) in the writer's transaction; it commits nothing new."""
    db.execute(PROBE_WRITE)


def probe_write(conn: sqlite3.Connection) -> None:
    """Fail at open, with a clear message, when the file cannot be written (read-only file, ``mode=ro``): SQLite
    itself only notices at the first real write, and BEGIN IMMEDIATE alone succeeds on a read-only file. The
    probe rewrites a row with its own value and rolls back, so nothing changes."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(PROBE_WRITE)
    finally:
        conn.execute("ROLLBACK")


def migrations_pending(conn: sqlite3.Connection) -> bool:
    try:
        return bool(pending(load_migrations("sqlite"), applied_versions(conn)))
    except IncompatibleDatabase:
        return True


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
