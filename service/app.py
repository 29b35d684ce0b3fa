"""``create_app(config)``: the store, hub, teams and worker pool wired with cleanup contexts."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from aiohttp import WSCloseCode, web

from service import keys, middleware, retention, tracing, webhooks
from service.config import Config
from service.hub import Hub
from service.metrics import Metrics
from service.queue import Store, open_store
from service.queue.retry import RetryPolicy
from service.routes import setup_routes
from service.worker.pool import WorkerPool
from service.worker.teams import TeamRegistry

CLOSE_TIMEOUT_S = 5.0
TOOL_THREADS = 64  # threads for synchronous tools (the default executor), see _pool_ctx


def create_app(config: Config, *, store: Store | None = None, start_workers: bool = True) -> web.Application:
    """The aiohttp application. ``store`` overrides ``config.database`` (tests); ``start_workers=False`` leaves
    the pool stopped so a test can drive it with ``run_until_idle()``."""
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[*([middleware.traced] if tracing.enabled() else []), middleware.errors, middleware.auth],
    )
    app[keys.CONFIG] = config
    app[keys.STORE] = store or open_store(
        config.database,
        sqlite_synchronous=config.sqlite_synchronous,
        exclusive=True,
        max_interruptions=config.max_interruptions,
        sqlite_wal_limit_mb=config.sqlite_wal_limit_mb,
        webhook_url=config.webhook_url or None,
        pg_writers=config.pg_writers,
    )
    app[keys.METRICS] = Metrics()
    app[keys.HUB] = Hub(buffer_size=config.send_buffer, on_publish=app[keys.METRICS].entries_appended.inc)
    app[keys.TEAMS] = TeamRegistry.from_config(config.teams)  # validated now: bad team configs stop the start
    app[keys.SOCKETS] = weakref.WeakSet()
    app[keys.STREAMS] = set()
    app[keys.SHUTTING_DOWN] = asyncio.Event()
    app[keys.POOL] = WorkerPool(
        app[keys.STORE],
        app[keys.HUB],
        app[keys.TEAMS],
        workers=config.workers,
        lease_s=config.lease_s,
        heartbeat_s=config.heartbeat_s,
        poll_interval_s=config.poll_interval_s,
        grace_s=config.grace_s,
        retry=RetryPolicy(config.max_attempts, config.retry_base_delay_s, config.retry_max_delay_s),
        stop_timeout_s=config.stop_timeout_s,
        stall_timeout_s=config.stall_timeout_s,
        draft_interval_s=config.draft_interval_s,
        live_teams=config.live_teams,
        metrics=app[keys.METRICS],
    )
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(retention.sweeper_ctx)
    app.cleanup_ctx.append(webhooks.deliverer_ctx)
    if start_workers:
        app.cleanup_ctx.append(_pool_ctx)
    app.on_shutdown.append(_close_sockets)
    setup_routes(app)
    return app


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[keys.STORE]
    await store.open()
    hub = app[keys.HUB]

    async def on_remote_commit(session_id: str, last_seq: int) -> None:
        hub.notify_commit(session_id, last_seq)

    await store.listen(on_remote_commit)
    yield
    await store.close()


async def _pool_ctx(app: web.Application) -> AsyncIterator[None]:
    # AutoGen runs synchronous tools in the default executor. A cancelled run's sync tool keeps its thread until
    # it returns (nothing can stop a thread): give the executor room, so such tools cannot starve other runs.
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=TOOL_THREADS, thread_name_prefix="tool"))
    pool = app[keys.POOL]
    await pool.start()
    yield
    # Graceful: stop claiming, give runs grace_s to finish, put the rest back in the queue.
    await pool.stop()


async def _close_sockets(app: web.Application) -> None:
    app[keys.SHUTTING_DOWN].set()
    sockets = app[keys.SOCKETS]
    closing = [ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down") for ws in list(sockets)]
    # Together and bounded: a peer that never answers the close (a sleeping laptop) must not hold the shutdown.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), CLOSE_TIMEOUT_S)
    streams = app[keys.STREAMS]
    for task in list(streams):
        task.cancel()  # an SSE client reconnects elsewhere with Last-Event-ID
