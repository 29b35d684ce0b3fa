"""The durable queue: ``open_store(url)`` picks a backend behind the one Store contract (store.py)."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

from service.errors import BadRequest
from service.models import DEFAULT_MAX_INTERRUPTIONS, utcnow
from service.queue.store import Clock, Store


def safe_url(url: str) -> str:
    """A database URL without its password, for messages and logs (file paths come back unchanged)."""
    if "://" not in url or "@" not in url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit((parts.scheme, f"{user}{host}{port}", parts.path, "", ""))


def open_store(
    url: str,
    *,
    clock: Clock = utcnow,
    sqlite_synchronous: str = "FULL",
    exclusive: bool = False,
    max_interruptions: int = DEFAULT_MAX_INTERRUPTIONS,
    sqlite_wal_limit_mb: int = 64,
    db_clock_offset: Callable[[], float] | None = None,
    webhook_url: str | None = None,
    pg_writers: int = 1,
) -> Store:
    """A store (not yet opened) for ``url``: ``memory://``, ``sqlite:///path``, a plain file path, or
    ``postgresql://...``. ``exclusive``: this process is a SQLite file's only service (see SqliteStore).
    ``max_interruptions``: deaths of the process while running one input before recovery ends it (0: no cap).
    ``db_clock_offset``: PostgreSQL judges time by the database's clock (README "Deploying on PostgreSQL");
    tests that drive ``clock`` by hand pass the seconds to add to it (None: none).
    ``webhook_url``: the server default webhook URL for sessions without their own (README "Webhooks").
    ``pg_writers``: PostgreSQL connections that group-commit at once (README "Deploying on PostgreSQL")."""
    if url.startswith("memory://"):
        from service.queue.memory import MemoryStore

        return MemoryStore(clock=clock, max_interruptions=max_interruptions, webhook_url=webhook_url)
    if url.startswith(("postgresql://", "postgres://")):
        from service.queue.postgres import PostgresStore

        return PostgresStore(
            url,
            clock=clock,
            db_clock_offset=db_clock_offset,
            max_interruptions=max_interruptions,
            webhook_url=webhook_url,
            writers=pg_writers,
        )
    if url.startswith("sqlite://"):
        # As in SQLAlchemy: sqlite:///rel/path is relative, sqlite:////abs/path is absolute.
        path = url.removeprefix("sqlite://").removeprefix("/")
    elif "://" in url:
        raise BadRequest(
            f"unsupported database URL {url!r}: use a file path, sqlite:///path, memory:// or postgresql://"
        )
    else:
        path = url
    from service.queue.sqlite import SqliteStore

    return SqliteStore(
        path,
        synchronous=sqlite_synchronous,
        clock=clock,
        exclusive=exclusive,
        max_interruptions=max_interruptions,
        wal_limit_bytes=sqlite_wal_limit_mb * 1024 * 1024,
        webhook_url=webhook_url,
    )


__all__ = ["Store", "open_store", "safe_url"]
