"""Retention over the API (README "Configuration": ``session_ttl_days``): a sweep deletes sessions idle longer
than the TTL; an expired session answers the ordinary 404 and its open streams end as for a deleted one. The
sweep is called directly (its timer only calls it); time moves with the fake clock, on every backend."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from service import retention
from service.app import create_app
from service.queue import open_store
from tests.conftest import FakeClock
from tests.web import make_config, receive_until

Client = TestClient[Any, web.Application]
DAY_S = 86400.0


async def test_expired_session_is_swept_404s_and_its_streams_end(
    database_url: str, clock: FakeClock, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    store = open_store(database_url, clock=clock, db_clock_offset=clock.db_offset)
    config = make_config(database_url, session_ttl_days=1.0, sweep_interval_s=3600.0)
    client = await aiohttp_client(create_app(config, store=store))
    assert client.app is not None
    ws = await client.ws_connect("/ws/chat/queue?session_id=old")
    await ws.receive_json()
    await ws.send_json({"type": "TextMessage", "content": "hello"})
    await receive_until(ws, lambda f: f.get("type") == "run_completed")
    events = await client.get("/sessions/old/events")
    assert await retention.sweep(client.app) == 0  # not idle for a day yet

    clock.advance(2 * DAY_S)
    assert (await client.post("/sessions", json={"session_id": "new"})).status == 201
    assert await retention.sweep(client.app) == 1

    closing = await ws.receive()
    assert closing.type == WSMsgType.CLOSE and closing.data == 4404  # as for a deleted session
    assert await events.content.read() != b"" and events.content.at_eof()
    answer = await client.get("/sessions/old")
    assert answer.status == 404 and (await answer.json())["error"]["code"] == "not_found"
    assert (await client.get("/sessions/old/messages")).status == 404
    assert (await client.get("/sessions/new")).status == 200
    events.close()


async def test_no_ttl_sweeps_nothing(
    clock: FakeClock, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    store = open_store("memory://", clock=clock)
    client = await aiohttp_client(create_app(make_config("memory://"), store=store))
    assert client.app is not None
    assert (await client.post("/sessions", json={"session_id": "kept"})).status == 201
    clock.advance(10_000 * DAY_S)
    assert await retention.sweep(client.app) == 0
    assert (await client.get("/sessions/kept")).status == 200
