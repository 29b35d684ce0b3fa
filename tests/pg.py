"""A throwaway PostgreSQL database per test (this machine runs PostgreSQL on 127.0.0.1:5432, trust auth).

Tests that need it are skipped only when no server is reachable; CI starts one first (.ci/run).

The admin statements run on a short-lived asyncpg connection in a fresh event loop on a worker thread, so
``pg_database()`` works the same from sync and async fixtures (it never touches the caller's loop)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from service.queue import safe_url

ADMIN_DSN = os.environ.get("SERVICE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
_CONNECT_TIMEOUT_S = 5.0
# Set once the server was found unreachable, so later tests skip at once instead of waiting again.
_unreachable: list[str] = []


class _Unreachable(Exception):
    pass


async def _run(sql: str) -> None:
    try:
        conn = await asyncpg.connect(ADMIN_DSN, timeout=_CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, asyncpg.CannotConnectNowError) as exc:
        raise _Unreachable(f"no PostgreSQL server at {safe_url(ADMIN_DSN)}: {exc}") from exc
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _admin(sql: str) -> None:
    # A fresh loop in another thread: the caller may already be inside a running loop (async fixtures).
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, _run(sql)).result()


def database_url(name: str) -> str:
    """The admin DSN pointing at database ``name`` instead."""
    parts = urlsplit(ADMIN_DSN)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@contextmanager
def pg_database() -> Iterator[str]:
    """Create an empty database with a unique name, yield its URL, drop it (even if still connected) after."""
    if _unreachable:
        pytest.skip(_unreachable[0])
    name = "t_" + uuid.uuid4().hex[:16]
    try:
        # template0 accepts no connections, so a concurrent session can never block the copy.
        _admin(f'CREATE DATABASE "{name}" TEMPLATE template0')
    except _Unreachable as exc:
        _unreachable.append(str(exc))
        pytest.skip(str(exc))
    try:
        yield database_url(name)
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
