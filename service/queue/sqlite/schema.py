"""SQLite connection setup (pragmas) and migrations (``migrations/sqlite/``). All synchronous: they run on the
store's threads (engine.py), never on the event loop."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from service.errors import IncompatibleDatabase, ServiceError, StoreUnavailable
from service.models import utcnow
from service.queue.migrate import Migration, load_migrations, pending, split_statements
from service.queue.sqlite.errors import translate
from service.queue.sqlite.statements import stamp

SYNCHRONOUS_MODES = {"FULL": 2, "NORMAL": 1}
BUSY_TIMEOUT_MS = 5000
# UPSERT (cursors) needs 3.24. RETURNING (3.35) is deliberately not used: the single writer holds the write
# lock for its whole transaction, so SELECT-then-UPDATE is race-free on any SQLite Python ships with.
MIN_SQLITE = (3, 24, 0)

CREATE_MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"""


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
            conn.execute(CREATE_MIGRATIONS_TABLE)
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
