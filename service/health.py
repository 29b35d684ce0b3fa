"""Liveness and readiness probes, and the Prometheus scrape."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import keys
from service.errors import StoreUnavailable, error_body
from service.respond import json_response


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the database answers with every migration applied and the worker pool is alive."""
    try:
        ready = await request.app[keys.STORE].ping()
    except StoreUnavailable:
        ready = False
    if not ready:
        return json_response(
            error_body("unavailable", "the database is unreachable or not migrated"), status=503
        )
    failed = request.app[keys.POOL].failed
    if failed is not None:
        # The cause is in the server's log (the pool logs it loudly); it may name files or hosts.
        return json_response(
            error_body("unavailable", "the worker pool stopped (see the server log)"), status=503
        )
    return json_response({"status": "ready"})


async def metrics_handler(request: web.Request) -> web.Response:
    metrics = request.app[keys.METRICS]
    counts = await request.app[keys.STORE].counts()
    metrics.inputs_queued.set(counts.get("queued", 0))
    return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
