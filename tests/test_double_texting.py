"""Double-texting (README "Double-texting"): what a message does when it arrives while a run works, through the
HTTP and WebSocket API with a running worker pool, on every backend (memory, SQLite, PostgreSQL)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from service.app import create_app
from tests.server import start_server
from tests.web import durable, make_config, receive_until

Client = TestClient[Any, web.Application]
Frame = dict[str, Any]


@pytest.fixture
async def client(database_url: str, aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    return await aiohttp_client(create_app(make_config(database_url)))


async def post(client: Client, sid: str, content: str, **fields: Any) -> tuple[int, dict[str, Any]]:
    response = await client.post(f"/sessions/{sid}/messages", json={"content": content, **fields})
    return response.status, await response.json()


async def log(client: Client, sid: str) -> list[Frame]:
    page: dict[str, Any] = await (await client.get(f"/sessions/{sid}/messages?limit=1000")).json()
    messages: list[Frame] = page["messages"]
    return messages


def is_type(kind: str, count: int = 1) -> Callable[[Frame], bool]:
    seen = {"n": 0}

    def match(frame: Frame) -> bool:
        if frame.get("type") == kind and frame.get("seq") is not None:
            seen["n"] += 1
        return seen["n"] >= count

    return match


def replies(entries: list[Frame]) -> list[str]:
    return [e["content"] for e in entries if e["type"] == "TextMessage" and e["source"] == "assistant"]


async def follow(client: Client, sid: str) -> Any:
    ws = await client.ws_connect(f"/ws/chat/queue?session_id={sid}")
    assert (await ws.receive_json())["type"] == "session"
    return ws


async def test_reject_refuses_while_a_run_works_and_writes_nothing(client: Client) -> None:
    ws = await follow(client, "s1")
    assert (await post(client, "s1", "[[sleep:30]] long one"))[0] == 202
    await receive_until(ws, is_type("run_started"))
    before = await log(client, "s1")
    status, body = await post(client, "s1", "me too", client_msg_id="m2", multitask_strategy="reject")
    assert status == 409 and body["error"]["code"] == "conflict"
    await ws.send_json(
        {"type": "TextMessage", "content": "again", "client_msg_id": "m3", "multitask_strategy": "reject"}
    )
    error = (await receive_until(ws, lambda f: f.get("type") == "error"))[-1]
    assert error["code"] == "conflict" and error["client_msg_id"] == "m3"
    assert await log(client, "s1") == before  # nothing written
    await client.post("/sessions/s1/cancel")
    await receive_until(ws, is_type("run_cancelled"))
    assert (await post(client, "s1", "now", multitask_strategy="reject"))[0] == 202  # idle: accepted
    await receive_until(ws, is_type("run_completed"))
    await ws.close()


async def test_a_sessions_default_strategy_applies_and_a_question_still_takes_its_answer(
    client: Client,
) -> None:
    created = await client.post("/sessions", json={"session_id": "s2", "multitask_strategy": "reject"})
    assert created.status == 201 and (await created.json())["multitask_strategy"] == "reject"
    bad = await client.post("/sessions", json={"session_id": "s3", "multitask_strategy": "sometimes"})
    assert bad.status == 400
    ws = await follow(client, "s2")
    assert (await post(client, "s2", "[[ask]] plan a trip"))[0] == 202
    await receive_until(ws, is_type("UserInputRequestedEvent"))
    # Waiting for a human with nothing queued: the message is the answer, not a second run.
    assert (await post(client, "s2", "Lisbon please"))[0] == 202
    frames = await receive_until(ws, is_type("run_completed"))
    assert any("Lisbon please" in r for r in replies(durable(frames)))
    await ws.close()


@pytest.mark.parametrize("strategy", ["interrupt", "rollback"])
async def test_interrupt_and_rollback_stop_the_run_and_the_new_message_runs(
    client: Client, strategy: str
) -> None:
    sid = f"s-{strategy}"
    ws = await follow(client, sid)
    assert (await post(client, sid, "first message"))[0] == 202
    await receive_until(ws, is_type("run_completed"))
    assert (await post(client, sid, "[[sleep:30]] the long one"))[0] == 202
    await receive_until(ws, is_type("run_started"))  # counted from here: the long one's
    status, _ = await post(client, sid, "the new one", multitask_strategy=strategy)
    assert status == 202
    frames = await receive_until(ws, is_type("run_completed"))
    entries = durable(frames)
    cancelled = [e for e in entries if e["type"] == "run_cancelled"]
    assert (
        len(cancelled) == 1 and cancelled[0]["input_seq"] == 5
    )  # the long one (1 msg, 2 start, 3 reply, 4 done)
    assert cancelled[0].get("rolled_back", False) is (strategy == "rollback")
    reply = replies(entries)[-1]
    assert "the new one" in reply
    # interrupt: the agents remember the interrupted message (3 user messages); rollback: as if it never happened.
    assert reply.endswith("[context: 3]" if strategy == "interrupt" else "[context: 2]")
    await ws.close()


async def test_interrupt_while_the_run_waits_for_a_human_is_not_taken_as_the_answer(client: Client) -> None:
    ws = await follow(client, "s4")
    assert (await post(client, "s4", "[[ask]] plan a trip"))[0] == 202
    await receive_until(ws, is_type("UserInputRequestedEvent"))
    status, queued = await post(client, "s4", "forget it, a new topic", multitask_strategy="interrupt")
    assert status == 202
    frames = await receive_until(ws, is_type("run_completed"))
    entries = durable(frames)
    assert [e["type"] for e in entries if e["source"] == "system"][:2] == ["run_cancelled", "run_started"]
    started = next(e for e in entries if e["type"] == "run_started")
    assert started["input_seq"] == queued["seq"]  # the new message runs as its own input
    assert "forget it, a new topic" in replies(entries)[-1]
    session = await (await client.get("/sessions/s4")).json()
    assert session["status"] == "idle"
    await ws.close()


async def test_a_cancel_aimed_at_one_run_never_stops_the_next(client: Client) -> None:
    """A Cancel clicked twice: the second click, aimed at the run that already ended, leaves the next alone."""
    ws = await follow(client, "s5")
    _, first = await post(client, "s5", "[[sleep:30]] first")
    _, second = await post(client, "s5", "[[sleep:30]] second")
    await receive_until(ws, is_type("run_started"))
    response = await client.post("/sessions/s5/cancel", json={"input_seq": first["seq"]})
    assert (await response.json()) == {"cancelled": True}
    await receive_until(ws, is_type("run_started"))  # the second message's run
    again = await client.post("/sessions/s5/cancel", json={"input_seq": first["seq"]})
    assert (await again.json()) == {"cancelled": False}
    await ws.send_json({"type": "cancel", "input_seq": first["seq"]})
    reply = (await receive_until(ws, lambda f: f.get("type") == "cancelled"))[-1]
    assert reply == {"type": "cancelled", "cancelled": False, "input_seq": first["seq"]}
    session = await (await client.get("/sessions/s5")).json()
    assert session["status"] == "running"  # the second run goes on
    await ws.send_json({"type": "cancel", "input_seq": second["seq"]})
    frames = await receive_until(ws, is_type("run_cancelled"))
    assert [f["input_seq"] for f in durable(frames) if f["type"] == "run_cancelled"] == [second["seq"]]
    bad = await client.post("/sessions/s5/cancel", json={"input_seq": -1})
    assert bad.status == 400
    await ws.close()


@pytest.mark.slow
async def test_double_texting_against_a_real_server_process_and_a_restart(tmp_path: Any) -> None:
    """A real `python -m service serve` (SQLite file): rollback stops the run, survives a SIGKILL right after its
    202, and the message then runs as if the rolled-back turn never happened."""
    server = start_server(tmp_path)
    try:
        async with aiohttp.ClientSession() as http:

            async def post_real(content: str, **fields: Any) -> dict[str, Any]:
                body = {"content": content, **fields}
                async with http.post(f"{server.url}/sessions/p/messages", json=body) as response:
                    assert response.status == 202
                    answer: dict[str, Any] = await response.json()
                    return answer

            async def entries() -> list[Frame]:
                async with http.get(f"{server.url}/sessions/p/messages?limit=1000") as response:
                    page: dict[str, Any] = await response.json()
                    return list(page["messages"])

            async def until(check: Callable[[list[Frame]], bool]) -> list[Frame]:
                async with http.ws_connect(server.ws_url + "?session_id=p") as ws:
                    async for _ in ws:  # every frame is a reason to look again (no polling interval)
                        log_now = await entries()
                        if check(log_now):
                            return log_now
                raise AssertionError("the socket closed first")

            await post_real("first")
            await until(lambda log: [e["type"] for e in log].count("run_completed") == 1)
            await post_real("[[sleep:30]] the long one")
            await until(lambda log: [e["type"] for e in log].count("run_started") == 2)
            queued = await post_real("the new one", multitask_strategy="rollback")
            server.restart()  # SIGKILL right after the 202: the rollback message is durable
            log = await until(lambda log: [e["type"] for e in log].count("run_completed") == 2)
        ends = [e for e in log if e["type"] in ("run_cancelled", "run_completed")]
        assert ends[-1]["input_seq"] == queued["seq"]
        [cancelled] = [e for e in ends if e["type"] == "run_cancelled"]
        assert cancelled["rolled_back"] is True  # written by the run, or by recovery after the SIGKILL
        assert "the new one" in replies(log)[-1] and replies(log)[-1].endswith("[context: 2]")
        assert all(
            e["input_seq"] != 5 or e["type"] != "run_completed" for e in ends
        )  # the long one never completes
    finally:
        server.stop()
