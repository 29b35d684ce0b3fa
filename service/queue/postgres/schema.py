"""PostgreSQL connection setup and migrations (``migrations/postgres/``)."""

from __future__ import annotations

from typing import Any

import orjson

from service.queue.migrate import Migration, load_migrations, pending

# Any two instances migrating at once serialise on this session-level lock (an arbitrary fixed key).
MIGRATION_LOCK_KEY = 7_240_911_305_112

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


async def migrate(conn: Any, known: list[Migration] | None = None) -> list[int]:
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
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, now())",
                    migration.version,
                    migration.name,
                )
            done.append(migration.version)
        return done
    finally:
        if not conn.is_closed():
            # A lost connection has released its session lock already.
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
