"""PostgreSQL connection setup and migrations for PostgresStore."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from service.errors import BadRequest, Conflict, ServiceError, StoreUnavailable
from service.queue.migrate import Migration, load_migrations, pending

# Any two instances migrating at once serialise on this session-level lock (an arbitrary fixed key).
MIGRATION_LOCK_KEY = 7_240_911_305_112
CONNECT_TIMEOUT_S = 10.0
# What a lost, refused or broken connection looks like from asyncpg.
DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # e.g. a connection that died in the middle of an operation
    OSError,
    asyncio.TimeoutError,
)

# A value PostgreSQL cannot store (a NUL character in a text column, a number out of range): the caller's input,
# not an outage, so it is a 400 rather than a 503 that invites retrying. Checked before DRIVER_ERRORS.
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,  # SQLSTATE class 22, from the server
    asyncpg.exceptions._base.DataError,  # refused by asyncpg before sending
)


def translate(exc: BaseException) -> ServiceError:
    """A driver error as the service's own error (the vocabulary of service/errors.py, as SQLite's)."""
    if isinstance(exc, asyncpg.UniqueViolationError):
        return Conflict(f"conflict: {exc}")
    if isinstance(exc, BAD_INPUT_ERRORS):
        return BadRequest(f"the database cannot store this value: {exc}")
    return StoreUnavailable(f"PostgreSQL: {type(exc).__name__}: {exc}")


CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL)"""


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def init_connection(conn: Any) -> None:
    """JSON columns in and out as Python values, through orjson."""
    for type_name in ("jsonb", "json"):
        await conn.set_type_codec(
            type_name, encoder=_dumps, decoder=orjson.loads, schema="pg_catalog", format="text"
        )


async def applied_versions(conn: Any) -> set[int]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return set()
    return {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}


async def migrate(conn: Any, now: datetime, known: list[Migration] | None = None) -> list[int]:
    """Apply pending migrations, each in its own transaction, under an advisory lock so instances starting at
    once apply each migration exactly once. Returns the versions this call applied."""
    known = load_migrations("postgres") if known is None else known
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(CREATE_MIGRATIONS_TABLE)
        done: list[int] = []
        for migration in pending(known, await applied_versions(conn)):
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    now,
                )
            done.append(migration.version)
        return done
    finally:
        if not conn.is_closed():
            # A lost connection has released its session lock already.
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
