"""The auth matrix: no token, bad signature, expired, other owner (404 on every path: HTTP, WS and SSE)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from service.app import create_app
from tests.web import make_config, receive_until

Client = TestClient[Any, web.Application]
SECRET = "test-secret-0123456789abcdef0123456789"


def token(sub: str, secret: str = SECRET, exp_in_s: float = 3600) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + exp_in_s)}, secret, algorithm="HS256")


def bearer(sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub)}"}


@pytest.fixture
async def client(aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    config = make_config("memory://", auth="jwt", jwt_secret=SECRET)
    return await aiohttp_client(create_app(config, start_workers=False))


async def test_tokens_are_required_and_checked(client: Client) -> None:
    bad_tokens = {
        "none": {},
        "bad signature": {
            "Authorization": f"Bearer {token('alice', secret='another-secret-0123456789abcdef-xyz')}"
        },
        "expired": {"Authorization": f"Bearer {token('alice', exp_in_s=-60)}"},
        "garbage": {"Authorization": "Bearer not.a.token"},
        "no sub": {"Authorization": "Bearer " + jwt.encode({"exp": int(time.time()) + 60}, SECRET, "HS256")},
        "no exp": {"Authorization": "Bearer " + jwt.encode({"sub": "alice"}, SECRET, "HS256")},
    }
    for name, headers in bad_tokens.items():
        for method, path in (
            ("GET", "/sessions"),
            ("POST", "/sessions"),
            ("GET", "/sessions/x/events"),
            ("GET", "/ws/chat/queue"),
        ):
            response = await client.request(method, path, headers=headers)
            assert response.status == 401, (name, path)
            assert (await response.json())["error"]["code"] == "unauthorized"
    assert (await client.get("/healthz")).status == 200  # probes stay public
    assert (await client.get("/sessions", headers=bearer("alice"))).status == 200
    assert (await client.get(f"/sessions?token={token('alice')}")).status == 200


async def test_another_owners_session_is_404_everywhere(client: Client) -> None:
    alice, bob = bearer("alice"), bearer("bob")
    assert (
        await client.post("/sessions/a1/messages", json={"content": "secret"}, headers=alice)
    ).status == 202
    paths = [
        ("GET", "/sessions/a1", None),
        ("DELETE", "/sessions/a1", None),
        ("GET", "/sessions/a1/messages", None),
        ("POST", "/sessions/a1/messages", {"content": "x"}),
        ("POST", "/sessions/a1/cancel", None),
        ("GET", "/sessions/a1/cursors/c", None),
        ("PUT", "/sessions/a1/cursors/c", {"seq": 1}),
        ("GET", "/sessions/a1/events", None),
    ]
    for method, path, payload in paths:
        response = await client.request(method, path, json=payload, headers=bob)
        assert response.status == 404, (method, path)
        assert (await response.json())["error"]["code"] == "not_found"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(f"/ws/chat/queue?session_id=a1&token={token('bob')}")
    assert refused.value.status == 404
    assert (await (await client.get("/sessions", headers=bob)).json())["sessions"] == []
    page = await (await client.get("/sessions/a1/messages", headers=alice)).json()
    assert [e["content"] for e in page["messages"]] == ["secret"]  # bob changed nothing
    ws = await client.ws_connect(f"/ws/chat/queue?session_id=a1&token={token('alice')}")
    assert (await ws.receive_json())["type"] == "session"
    await ws.close()


async def test_deleting_another_users_session_leaves_its_run_alone(
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    config = make_config("memory://", auth="jwt", jwt_secret=SECRET)
    client = await aiohttp_client(create_app(config))
    ws = await client.ws_connect(f"/ws/chat/queue?session_id=mine&token={token('alice')}")
    await ws.receive_json()
    await ws.send_json({"type": "TextMessage", "content": "[[sleep:0.5]] keep going"})
    await receive_until(ws, lambda f: f.get("type") == "run_started")
    assert (await client.delete("/sessions/mine", headers=bearer("bob"))).status == 404
    ended = await receive_until(ws, lambda f: f.get("type") in ("run_completed", "run_cancelled"))
    assert ended[-1]["type"] == "run_completed"  # bob's request changed nothing
    await ws.close()
