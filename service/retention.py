"""Retention (README "Configuration": ``session_ttl_days``): a periodic sweep deletes sessions idle longer than
the TTL, in batches, and ends their open streams as a ``DELETE`` would. Safe with several instances on one
PostgreSQL database: each expired session is deleted by exactly one of them (``Store.expire_sessions``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from service import keys
from service.errors import ServiceError

log = logging.getLogger("service.retention")
SWEEP_BATCH = 100  # sessions per store call: each call is one short transaction, so writes interleave


async def sweep(app: web.Application) -> int:
    """One sweep: delete every expired session now, batch by batch; how many were deleted."""
    config = app[keys.CONFIG]
    if config.session_ttl_days <= 0:
        return 0
    store, hub = app[keys.STORE], app[keys.HUB]
    idle_s = config.session_ttl_days * 86400.0
    deleted = 0
    while ids := await store.expire_sessions(idle_s, SWEEP_BATCH):
        for sid in ids:
            hub.close_session(sid)  # open WebSocket streams close with 4404, SSE streams end
        deleted += len(ids)
        await asyncio.sleep(0)  # let other work run between batches
    return deleted


async def _sweeper(app: web.Application) -> None:
    interval = app[keys.CONFIG].sweep_interval_s
    while True:
        try:
            if deleted := await sweep(app):
                log.info("retention: deleted %d expired sessions", deleted)
        except ServiceError as exc:  # the database is away: try again next time
            log.warning("retention sweep failed: %s", exc.message)
        except Exception:
            log.exception("retention sweep failed")
        await asyncio.sleep(interval)


async def sweeper_ctx(app: web.Application) -> AsyncIterator[None]:
    """Runs the sweep every ``sweep_interval_s`` while the app runs (only when ``session_ttl_days`` > 0)."""
    task = None
    if app[keys.CONFIG].session_ttl_days > 0:
        task = asyncio.get_running_loop().create_task(_sweeper(app), name="retention-sweeper")
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
