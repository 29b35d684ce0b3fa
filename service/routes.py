"""The route table, nothing else."""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

from service import handlers, health, openapi, sse, ws
from service.errors import NotFound

STATIC = Path(__file__).parent / "static"


_STATIC_NAME = re.compile(r"[A-Za-z0-9_-]+\.(?:html|js|css|svg|png|ico)")
# no-cache: after an upgrade the page's ES modules must not come stale from a browser cache.
_NO_CACHE = {"Cache-Control": "no-cache"}


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers=_NO_CACHE)


async def static_file(request: web.Request) -> web.FileResponse:
    """The page's files (a flat folder); anything else is the canonical 404."""
    name = request.match_info["name"]
    path = STATIC / name
    if not _STATIC_NAME.fullmatch(name) or not path.is_file():
        raise NotFound(f"no file {name[:80]}")
    return web.FileResponse(path, headers=_NO_CACHE)


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static_file)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/metrics", health.metrics_handler)
    app.router.add_get("/openapi.json", openapi.spec_handler)
    app.router.add_post("/sessions", handlers.create_session)
    app.router.add_get("/sessions", handlers.list_sessions)
    app.router.add_get("/sessions/{session_id}", handlers.get_session)
    app.router.add_delete("/sessions/{session_id}", handlers.delete_session)
    app.router.add_get("/sessions/{session_id}/messages", handlers.read_messages)
    app.router.add_post("/sessions/{session_id}/messages", handlers.post_message)
    app.router.add_post("/sessions/{session_id}/cancel", handlers.cancel)
    app.router.add_post("/sessions/{session_id}/reset", handlers.reset)
    app.router.add_get("/sessions/{session_id}/cursors/{client_id}", handlers.get_cursor)
    app.router.add_put("/sessions/{session_id}/cursors/{client_id}", handlers.put_cursor)
    app.router.add_get("/sessions/{session_id}/events", sse.events)
    app.router.add_get("/ws/chat/queue", ws.chat_queue)
