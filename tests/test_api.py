"""The HTTP API on memory and SQLite stores, with the worker pool driven by run_until_idle()."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from service.app import create_app
from service.config import Config
from tests.web import make_config, run_until_idle

Client = TestClient[Any, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
async def client(database_url: str, aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(create_app(make_config(database_url), start_workers=False))


async def test_session_lifecycle(client: Client) -> None:
    created = await client.post("/sessions", json={"session_id": "s1", "title": "First"})
    assert created.status == 201
    body = await created.json()
    assert body["session_id"] == "s1" and body["team"] == "default" and body["status"] == "idle"
    assert body["title"] == "First" and body["last_seq"] == 0 and body["created_at"].endswith("Z")
    assert (await client.post("/sessions", json={"session_id": "s1"})).status == 409
    generated = await (await client.post("/sessions", json={})).json()
    assert generated["session_id"].startswith("s_")
    await client.post("/sessions/s1/messages", json={"content": "hi"})
    listed = await (await client.get("/sessions")).json()
    assert next(s["session_id"] for s in listed["sessions"]) == "s1"  # newest activity first
    assert (await client.get("/sessions/s1")).status == 200
    assert (await client.delete("/sessions/s1")).status == 204
    assert (await client.get("/sessions/s1")).status == 404
    assert (await client.get("/sessions/s1/messages")).status == 404
    assert (await client.delete("/sessions/s1")).status == 404


async def test_same_answers_on_every_backend(client: Client) -> None:
    """Control characters in ids and titles are 400 everywhere; content keeps them; a duplicate is 409."""
    bad_title = await client.post("/sessions", json={"session_id": "t1", "title": "a\x00b"})
    assert bad_title.status == 400
    assert (await bad_title.json())["error"]["code"] == "bad_request"
    assert (await client.get("/sessions/t1")).status == 404
    bad_id = await client.post("/sessions/t1/messages", json={"content": "hi", "client_msg_id": "m\x00"})
    assert bad_id.status == 400
    assert (await client.get("/sessions/t1")).status == 404  # nothing was created
    kept = await client.post(
        "/sessions/t1/messages", json={"content": "nul \x00 bell \x07", "client_msg_id": "m1"}
    )
    assert kept.status == 202
    page = await (await client.get("/sessions/t1/messages")).json()
    assert page["messages"][0]["content"] == "nul \x00 bell \x07"
    again = await client.post("/sessions", json={"session_id": "t1"})
    assert again.status == 409
    assert (await again.json())["error"]["code"] == "conflict"


async def test_conversation_over_http(client: Client) -> None:
    for i, text in enumerate(["one", "two", "three"], start=1):
        queued = await client.post(
            "/sessions/chat/messages", json={"content": text, "client_msg_id": f"m{i}"}
        )
        assert queued.status == 202
        await run_until_idle(client)
    page = await (await client.get("/sessions/chat/messages?after=0&limit=1000")).json()
    seqs = [e["seq"] for e in page["messages"]]
    assert (
        seqs == list(range(1, len(seqs) + 1)) and page["last_seq"] == seqs[-1] and page["has_more"] is False
    )
    replies = [
        e["content"] for e in page["messages"] if e["type"] == "TextMessage" and e["source"] == "assistant"
    ]
    assert [r.endswith(f"[context: {n}]") for n, r in enumerate(replies, start=1)] == [True, True, True]
    starts = [e for e in page["messages"] if e["type"] == "run_started"]
    assert starts[0]["attempt"] == 1 and starts[0]["input_seq"] == 1
    session = await (await client.get("/sessions/chat")).json()
    assert session["status"] == "idle" and session["last_seq"] == seqs[-1]


async def test_enqueue_is_idempotent_by_client_msg_id(client: Client) -> None:
    first = await (
        await client.post("/sessions/s/messages", json={"content": "x", "client_msg_id": "a"})
    ).json()
    again = await client.post("/sessions/s/messages", json={"content": "x", "client_msg_id": "a"})
    assert again.status == 202 and await again.json() == first == {
        "seq": 1,
        "client_msg_id": "a",
        "status": "queued",
    }
    page = await (await client.get("/sessions/s/messages")).json()
    assert [e["seq"] for e in page["messages"]] == [1]


async def test_paging_after_and_before(client: Client) -> None:
    for i in range(5):
        await client.post("/sessions/p/messages", json={"content": f"m{i}"})
    page = await (await client.get("/sessions/p/messages?after=1&limit=2")).json()
    assert [e["seq"] for e in page["messages"]] == [2, 3] and page["has_more"] is True
    tail = await (await client.get("/sessions/p/messages?before=6&limit=2")).json()
    assert [e["seq"] for e in tail["messages"]] == [4, 5] and tail["has_more"] is True
    head = await (await client.get("/sessions/p/messages?before=3&limit=10")).json()
    assert [e["seq"] for e in head["messages"]] == [1, 2] and head["has_more"] is False
    for huge in ("100000", "99999999999999999999999"):
        clamped = await (await client.get(f"/sessions/p/messages?limit={huge}")).json()
        assert len(clamped["messages"]) == 5  # clamped to max_page, not refused
    zero = await (await client.get("/sessions/p/messages?limit=0")).json()
    assert len(zero["messages"]) == 1  # at least one entry
    for bad in (
        "limit=-1",
        "limit=abc",
        "after=-3",
        "before=x",
        "limit=%2B5",
        "limit=%201",
        "limit=1_0",
        "after=%D9%A1%D9%A2",
        "after=99999999999999999999999",
    ):
        response = await client.get(f"/sessions/p/messages?{bad}")
        assert response.status == 400, bad


async def test_cursors_never_move_backwards(client: Client) -> None:
    for i in range(3):
        await client.post("/sessions/c/messages", json={"content": f"m{i}"})
    assert await (await client.get("/sessions/c/cursors/tab1")).json() == {"seq": 0}
    assert await (await client.put("/sessions/c/cursors/tab1", json={"seq": 2})).json() == {"seq": 2}
    assert await (await client.put("/sessions/c/cursors/tab1", json={"seq": 1})).json() == {"seq": 2}
    assert await (await client.put("/sessions/c/cursors/tab1", json={"seq": 99})).json() == {"seq": 3}
    assert await (await client.get("/sessions/c/cursors/tab2")).json() == {"seq": 0}


async def test_queue_full_and_limits(tmp_path: Path, aiohttp_client: MakeClient) -> None:
    config = make_config("memory://", max_queued_per_session=2, max_message_chars=10, max_body_bytes=2000)
    client = await aiohttp_client(create_app(config, start_workers=False))
    for i in range(3):
        await client.post("/sessions/q/messages", json={"content": f"m{i}"})
    full = await client.post("/sessions/q/messages", json={"content": "one more"})
    assert full.status == 429 and (await full.json())["error"]["code"] == "queue_full"
    long = await client.post("/sessions/r/messages", json={"content": "x" * 11})
    assert long.status == 413 and (await long.json())["error"]["code"] == "too_large"
    huge = await client.post(
        "/sessions/r/messages",
        data=b'{"content": "' + b"x" * 5000 + b'"}',
        headers={"Content-Type": "application/json"},
    )
    assert huge.status == 413 and (await huge.json())["error"]["code"] == "too_large"
    assert (await client.get("/sessions/r")).status == 404  # nothing was created by the refused writes


async def test_every_error_has_the_canonical_shape(client: Client) -> None:
    cases: list[tuple[str, str, Any, int, str]] = [
        ("POST", "/sessions", b"not json", 400, "bad_request"),
        ("POST", "/sessions", b"[1, 2]", 400, "bad_request"),
        ("POST", "/sessions", {"session_id": "bad id!"}, 400, "bad_request"),
        ("POST", "/sessions", {"session_id": 5}, 400, "bad_request"),
        ("POST", "/sessions", {"team": "nope"}, 400, "bad_request"),
        ("POST", "/sessions", {"title": 3}, 400, "bad_request"),
        ("POST", "/sessions", {"session_id": "nl\n"}, 400, "bad_request"),
        ("POST", "/sessions/nl%0A/messages", {"content": "x"}, 400, "bad_request"),
        ("GET", "/ws/chat/queue?session_id=plain", None, 400, "bad_request"),
        ("GET", "/static/nope.js", None, 404, "not_found"),
        ("GET", "/static/..%2Fapp.py", None, 404, "not_found"),
        ("GET", "/sessions/missing", None, 404, "not_found"),
        ("GET", "/sessions/bad%20id", None, 400, "bad_request"),
        ("DELETE", "/sessions/missing", None, 404, "not_found"),
        ("GET", "/sessions/missing/messages", None, 404, "not_found"),
        ("POST", "/sessions/x/messages", {}, 400, "bad_request"),
        ("POST", "/sessions/x/messages", {"content": 3}, 400, "bad_request"),
        ("POST", "/sessions/x/messages", {"content": "  "}, 400, "bad_request"),
        ("POST", "/sessions/x/messages", {"content": "a", "client_msg_id": 7}, 400, "bad_request"),
        ("POST", "/sessions/missing/cancel", None, 404, "not_found"),
        ("GET", "/sessions/missing/cursors/c1", None, 404, "not_found"),
        ("PUT", "/sessions/missing/cursors/c1", {"seq": 1}, 404, "not_found"),
        ("GET", "/sessions/missing/events", None, 404, "not_found"),
        ("GET", "/nowhere", None, 404, "not_found"),
        ("PATCH", "/sessions", None, 405, "bad_request"),
    ]
    await client.post("/sessions", json={"session_id": "have"})
    cases += [
        ("PUT", "/sessions/have/cursors/c1", {"seq": -1}, 400, "bad_request"),
        ("PUT", "/sessions/have/cursors/c1", {"seq": "1"}, 400, "bad_request"),
        ("PUT", "/sessions/have/cursors/bad%20client", {"seq": 1}, 400, "bad_request"),
        ("PUT", "/sessions/have/cursors/tab%0A", {"seq": 1}, 400, "bad_request"),
        ("GET", "/sessions/have/messages?after=1&before=2", None, 400, "bad_request"),
        ("GET", "/sessions/have/events?after=-1", None, 400, "bad_request"),
    ]
    for method, path, payload, status, code in cases:
        kwargs: dict[str, Any] = {}
        if isinstance(payload, bytes):
            kwargs = {"data": payload, "headers": {"Content-Type": "application/json"}}
        elif payload is not None:
            kwargs = {"json": payload}
        response = await client.request(method, path, **kwargs)
        assert response.status == status, (method, path, await response.text())
        body = await response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
        assert body["error"]["code"] == code and body["error"]["message"], (method, path, body)
    # The message names the field at fault.
    refused = await client.post("/sessions/have/cancel", json={"input_seq": "x"})
    assert refused.status == 400
    assert (await refused.json())["error"]["message"].startswith("input_seq must be an integer")
    # The server still works after all of that, and the refused requests created nothing.
    assert (await client.get("/sessions/have")).status == 200
    assert (await client.get("/sessions/plain")).status == 404
    listed = await (await client.get("/sessions")).json()
    assert [s["session_id"] for s in listed["sessions"]] == ["have"]
    not_allowed = await client.patch("/sessions")
    assert "GET" in not_allowed.headers["Allow"] and "POST" in not_allowed.headers["Allow"]
    broken = await client.post(
        "/sessions/x/messages",
        data=b'{"content": "x"}',
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip", "Connection": "close"},
    )
    assert broken.status == 400 and (await broken.json())["error"]["code"] == "bad_request"
    page_file = await client.get("/static/app.js")
    assert page_file.status == 200 and page_file.headers["Cache-Control"] == "no-cache"


async def test_health_ready_metrics_openapi_and_page(client: Client) -> None:
    assert await (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status == 200
    await client.post("/sessions/m/messages", json={"content": "count me"})
    await run_until_idle(client)
    metrics = await (await client.get("/metrics")).text()
    for name in (
        "service_inputs_enqueued_total 1.0",
        'service_runs_total{outcome="completed",team="default"} 1.0',
        "service_run_duration_seconds_count 1.0",
        "service_inputs_queued 0.0",
        "service_websocket_connections",
        "service_entries_appended_total",
    ):
        assert name in metrics, name
    spec = await (await client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.") and "/sessions/{session_id}/messages" in spec["paths"]
    page = await client.get("/")
    assert page.status == 200 and "text/html" in page.headers["Content-Type"]


async def test_a_store_failure_never_shows_the_database_path(tmp_path: Path) -> None:
    """503 answers say what happened, not where: the file path stays in the server's log (README "HTTP")."""
    db = tmp_path / "secret-place" / "service.db"
    app = create_app(Config(database=str(db)), start_workers=False)
    async with TestClient(TestServer(app)) as client:
        with closing(sqlite3.connect(db, isolation_level=None)) as holder:
            holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock past busy_timeout
            response = await client.post("/sessions/s1/messages", json={"content": "hi"})
            holder.execute("ROLLBACK")
        assert response.status == 503
        body = await response.json()
        assert body["error"]["code"] == "unavailable"
        assert "secret-place" not in body["error"]["message"] and "service.db" not in body["error"]["message"]
        assert (await client.post("/sessions/s1/messages", json={"content": "hi"})).status == 202


def test_run_failure_texts_leave_store_details_to_the_log() -> None:
    """What a run_failed entry shows of a store failure: what happened, not the file behind it."""
    from service.errors import StoreUnavailable
    from service.worker.logs import public_error_line

    exc = StoreUnavailable("/srv/secret/service.db is read-only; the service needs to write to it")
    assert public_error_line(exc) == "StoreUnavailable: The database is unavailable; nothing was stored."
    assert public_error_line(ValueError("a model said no")) == "ValueError: a model said no"
