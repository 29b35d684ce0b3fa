"""Durability as a user feels it: a real server process, SIGKILL right after an ack, SIGTERM mid-run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.server import ServerProcess, start_server
from tests.web import receive_until

pytestmark = pytest.mark.slow


def _replies(page: dict[str, Any]) -> list[str]:
    return [
        e["content"] for e in page["messages"] if e["type"] == "TextMessage" and e["source"] == "assistant"
    ]


async def _chat(server: ServerProcess, session: str, text: str, msg_id: str) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{server.ws_url}?session_id={session}") as ws,
    ):
        hello = await ws.receive_json()
        await ws.send_json({"type": "TextMessage", "content": text, "client_msg_id": msg_id})
        frames = await receive_until(
            ws, lambda f: f.get("type") == "run_completed" and f["seq"] > hello["last_seq"]
        )
        return frames


async def _wait_for_reply(server: ServerProcess, session: str, count: int) -> dict[str, Any]:
    """Follow SSE until the session has ``count`` assistant replies; then the whole log."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/sessions/{session}/events?after=0") as events:
            done = 0
            async for line in events.content:
                if line.startswith(b"data: ") and b'"type":"run_completed"' in line:
                    done += 1
                    if done == count:
                        break
        async with http.get(f"{server.url}/sessions/{session}/messages?limit=1000") as response:
            page: dict[str, Any] = await response.json()
            return page


async def test_sigkill_right_after_ack_loses_nothing(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--lease-s", "2", "--heartbeat-s", "0.5")
    try:
        await _chat(server, "k1", "my name is Ada", "m1")
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{server.ws_url}?session_id=k1") as ws:
            await ws.receive_json()
            await ws.send_json(
                {"type": "TextMessage", "content": "[[sleep:1]] what is my name?", "client_msg_id": "m2"}
            )
            ack = await receive_until(ws, lambda f: f.get("type") == "ack")
            server.kill()  # right after the ack: the message must survive
        assert ack[-1]["client_msg_id"] == "m2"
        server.restart()
        page = await _wait_for_reply(server, "k1", 2)
        users = [e for e in page["messages"] if e["source"] == "user"]
        assert [u["client_msg_id"] for u in users] == ["m1", "m2"]  # exactly once
        replies = _replies(page)
        assert len(replies) == 2 and "what is my name?" in replies[1]
        assert replies[1].endswith("[context: 2]")  # the agents still remember the first turn
        seqs = [e["seq"] for e in page["messages"]]
        assert seqs == list(range(1, len(seqs) + 1))
        assert server.stop() == 0
    finally:
        server.kill()


async def test_sigterm_mid_run_releases_and_restart_finishes(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--grace-s", "0.2")
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{server.ws_url}?session_id=t1") as ws:
            await ws.receive_json()
            await ws.send_json({"type": "TextMessage", "content": "[[sleep:5]] slow", "client_msg_id": "m1"})
            await receive_until(ws, lambda f: f.get("type") == "run_started")
        assert server.stop() == 0  # graceful: exit 0 after putting the run back
        assert "listening on" in server.output()
        server.start()
        page = await _wait_for_reply(server, "t1", 1)
        types = [e["type"] for e in page["messages"]]
        assert "run_interrupted" in types
        started = [e for e in page["messages"] if e["type"] == "run_started"]
        assert [s["attempt"] for s in started] == [1, 2]
        assert len(_replies(page)) == 1
    finally:
        server.kill()


async def test_sigterm_with_live_streams_exits_promptly(tmp_path: Path) -> None:
    """Open WebSocket and SSE clients do not hold the shutdown for its timeout: both are ended, exit code 0."""
    server = start_server(tmp_path, "--grace-s", "30")
    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"{server.ws_url}?session_id=live")
            await ws.receive_json()
            events = await http.get(f"{server.url}/sessions/live/events")
            assert events.status == 200
            assert server.stop(timeout_s=10) == 0  # well inside grace_s + 5, the handlers' shutdown timeout
            closing = await ws.receive()
            assert closing.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.CLOSING,
            )
            assert await events.content.read() == b""  # the stream ended cleanly (no event was pending)
            await ws.close()
            events.close()
    finally:
        server.kill()
