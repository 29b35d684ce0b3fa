"""The route table, nothing else."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from service import handlers, health, openapi, sse, ws

STATIC = Path(__file__).parent / "static"


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC, append_version=False)
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
    app.router.add_get("/sessions/{session_id}/cursors/{client_id}", handlers.get_cursor)
    app.router.add_put("/sessions/{session_id}/cursors/{client_id}", handlers.put_cursor)
    app.router.add_get("/sessions/{session_id}/events", sse.events)
    app.router.add_get("/ws/chat/queue", ws.chat_queue)
