"""Server-Sent Events: replay then live, id: = seq, Last-Event-ID wins over ?after=."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from service.app import create_app
from tests.web import make_config

Client = TestClient[Any, web.Application]


@pytest.fixture
async def client(database_url: str, aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    return await aiohttp_client(create_app(make_config(database_url)))


async def read_events(response: ClientResponse, until: str) -> list[tuple[str | None, dict[str, Any]]]:
    """(id, data) pairs up to the first event whose data has type ``until``."""
    events: list[tuple[str | None, dict[str, Any]]] = []
    event_id: str | None = None
    while True:
        line = (await response.content.readline()).decode().rstrip("\n")
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data = orjson.loads(line[6:])
            events.append((event_id, data))
            event_id = None
            if data.get("type") == until:
                return events


async def test_replay_then_live(client: Client) -> None:
    await client.post("/sessions/e1/messages", json={"content": "before anyone listens"})
    response = await client.get("/sessions/e1/events?after=0")
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    first = await read_events(response, until="run_completed")
    await client.post("/sessions/e1/messages", json={"content": "while listening"})
    second = await read_events(response, until="run_completed")
    durable = [(i, d) for i, d in first + second if d["seq"] is not None]
    assert [int(i or 0) for i, _ in durable] == [d["seq"] for _, d in durable]
    assert [d["seq"] for _, d in durable] == list(range(1, len(durable) + 1))
    assert all(i is None for i, d in first + second if d["seq"] is None)  # chunks never move the resume point
    response.close()


async def test_last_event_id_wins_over_after(client: Client) -> None:
    await client.post("/sessions/e2/messages", json={"content": "one"})
    response = await client.get("/sessions/e2/events?after=0")
    events = await read_events(response, until="run_completed")
    response.close()
    last = max(d["seq"] for _, d in events if d["seq"] is not None)
    resumed = await client.get("/sessions/e2/events?after=0", headers={"Last-Event-ID": str(last)})
    await client.post("/sessions/e2/messages", json={"content": "two"})
    more = await read_events(resumed, until="run_completed")
    assert min(d["seq"] for _, d in more if d["seq"] is not None) == last + 1
    resumed.close()


async def test_a_cursor_beyond_the_log_resumes_at_its_end(client: Client) -> None:
    await client.post("/sessions/e3/messages", json={"content": "one"})
    first = await client.get("/sessions/e3/events?after=0")
    await read_events(first, until="run_completed")
    first.close()
    beyond = await client.get("/sessions/e3/events", headers={"Last-Event-ID": "100000"})
    await client.post("/sessions/e3/messages", json={"content": "two"})
    more = await read_events(beyond, until="run_completed")  # as on the WebSocket: not silence forever
    assert any(d.get("content") == "two" for _, d in more)
    beyond.close()
