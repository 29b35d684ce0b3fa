"""PostgreSQL driver errors and their translation into the service's one error vocabulary (service/errors.py),
the same words the SQLite dialect uses (README "The one contract")."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from service.errors import BadRequest, Conflict, ServiceError, StoreUnavailable

CONNECT_TIMEOUT_S = 10.0

# What a lost, refused or broken connection, or a refused statement, looks like from asyncpg.
DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # e.g. a connection that died in the middle of an operation
    OSError,
    asyncio.TimeoutError,
)

# A value PostgreSQL cannot store (a NUL character in a text column, a number out of range): the caller's input,
# not an outage, so it is a 400 rather than a 503 that invites retrying.
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,  # SQLSTATE class 22, from the server
    asyncpg.exceptions._base.DataError,  # refused by asyncpg before sending
)


def translate(exc: BaseException) -> ServiceError:
    """A driver error as the service's own error: unique violation -> Conflict (409), refused value ->
    BadRequest (400), anything else -> StoreUnavailable (503)."""
    if isinstance(exc, asyncpg.UniqueViolationError):
        return Conflict(f"conflict: {exc}")
    if isinstance(exc, BAD_INPUT_ERRORS):
        return BadRequest(f"the database cannot store this value: {exc}")
    return StoreUnavailable(f"PostgreSQL: {type(exc).__name__}: {exc}")


def connection_lost(exc: BaseException) -> bool:
    """True when ``exc`` says the connection itself is gone (as opposed to one statement being refused)."""
    return not isinstance(exc, asyncpg.PostgresError) or isinstance(
        exc, asyncpg.PostgresConnectionError | asyncpg.AdminShutdownError | asyncpg.CannotConnectNowError
    )


async def close_connection(conn: Any) -> None:
    """Close a connection within CONNECT_TIMEOUT_S, else drop it (a dead peer must not hold anyone up)."""
    if conn is None or conn.is_closed():
        return
    try:
        await asyncio.wait_for(conn.close(), CONNECT_TIMEOUT_S)
    except DRIVER_ERRORS:
        conn.terminate()
    except asyncio.CancelledError:
        conn.terminate()
        raise
