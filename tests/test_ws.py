"""WebSocket /ws/chat/queue with a running worker pool: replay, live, resume, cursors, bad frames."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from service.app import create_app
from tests.web import durable, make_config, receive_until

Client = TestClient[Any, web.Application]


def completed(frame: dict[str, Any]) -> bool:
    return frame.get("type") == "run_completed"


@pytest.fixture
async def client(database_url: str, aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    return await aiohttp_client(create_app(make_config(database_url, max_frame_bytes=1000)))


async def test_chat_streams_chunks_then_durable_reply(client: Client) -> None:
    ws = await client.ws_connect("/ws/chat/queue?session_id=s1&client_id=tab")
    hello = await ws.receive_json()
    assert hello == {"type": "session", "session_id": "s1", "status": "idle", "last_seq": 0, "replay_from": 0}
    await ws.send_json({"type": "TextMessage", "content": "hello world", "client_msg_id": "m1"})
    frames = await receive_until(ws, completed)
    acks = [f for f in frames if f.get("type") == "ack"]
    assert acks == [{"type": "ack", "client_msg_id": "m1", "seq": 1}]
    seqs = [f["seq"] for f in durable(frames)]
    assert seqs == list(range(1, len(seqs) + 1))
    chunks = [f for f in frames if f.get("seq") is None and f.get("type") == "ModelClientStreamingChunkEvent"]
    reply = next(f for f in durable(frames) if f["type"] == "TextMessage" and f["source"] == "assistant")
    assert chunks and "".join(c["content"] for c in chunks) == reply["content"]
    assert "hello world" in reply["content"] and reply["content"].endswith("[context: 1]")
    assert chunks[0]["full_message_id"] == reply["metadata"]["id"]
    await ws.close()


async def test_resume_mid_stream_has_no_gap_and_no_duplicate(client: Client) -> None:
    ws = await client.ws_connect("/ws/chat/queue?session_id=r1")
    await ws.receive_json()
    await ws.send_json({"type": "TextMessage", "content": "first"})
    before = await receive_until(ws, completed)
    await ws.send_json({"type": "TextMessage", "content": "a long answer please " * 20})
    during = await receive_until(ws, lambda f: f.get("seq") is None)  # a chunk: the run is mid-stream
    seen = [f["seq"] for f in durable(before + during)]
    await ws.close()  # disconnecting never cancels the run
    ws2 = await client.ws_connect(f"/ws/chat/queue?session_id=r1&after={seen[-1]}")
    hello = await ws2.receive_json()
    assert hello["replay_from"] == seen[-1]
    rest = await receive_until(ws2, completed)
    all_seqs = seen + [f["seq"] for f in durable(rest)]
    assert all_seqs == list(range(1, all_seqs[-1] + 1))
    reply = [f for f in durable(rest) if f["type"] == "TextMessage" and f["source"] == "assistant"]
    assert reply and reply[-1]["content"].endswith("[context: 2]")
    await ws2.close()


async def test_stored_cursor_per_client_and_two_clients(client: Client) -> None:
    a = await client.ws_connect("/ws/chat/queue?session_id=c1&client_id=phone")
    b = await client.ws_connect("/ws/chat/queue?session_id=c1&client_id=laptop")
    await a.receive_json()
    await b.receive_json()
    await a.send_json({"type": "TextMessage", "content": "from phone"})
    frames_a = await receive_until(a, completed)
    frames_b = await receive_until(b, completed)
    assert [f["seq"] for f in durable(frames_a)] == [f["seq"] for f in durable(frames_b)]
    last = durable(frames_a)[-1]["seq"]
    await a.send_json({"type": "ack", "seq": 2})
    await a.send_json({"type": "ping"})
    assert (await receive_until(a, lambda f: f.get("type") == "pong"))[-1] == {"type": "pong"}
    await a.close()
    await b.close()
    cursor = await (await client.get("/sessions/c1/cursors/phone")).json()
    assert cursor == {"seq": 2}
    again = await client.ws_connect("/ws/chat/queue?session_id=c1&client_id=phone")
    hello = await again.receive_json()
    assert hello["replay_from"] == 2 and hello["last_seq"] == last
    replayed = [(await again.receive_json())["seq"] for _ in range(last - 2)]
    assert replayed == list(range(3, last + 1))
    fresh = await client.ws_connect("/ws/chat/queue?session_id=c1&client_id=new-tab")
    assert (await fresh.receive_json())["replay_from"] == 0  # no cursor: the whole log
    assert (await fresh.receive_json())["seq"] == 1
    await again.close()
    await fresh.close()


async def test_bad_frames_get_errors_and_the_connection_stays(client: Client) -> None:
    ws = await client.ws_connect("/ws/chat/queue?session_id=b1")
    await ws.receive_json()
    bad: list[tuple[Any, str]] = [
        ("not json", "bad_request"),
        ("[1,2]", "bad_request"),
        ('"text"', "bad_request"),
        ('{"type": "Shout"}', "bad_request"),
        ('{"type": "TextMessage"}', "bad_request"),
        ('{"type": "TextMessage", "content": 42}', "bad_request"),
        ('{"no": "type"}', "bad_request"),
        ('{"type": "ack", "seq": "x"}', "bad_request"),
        ('{"type": "TextMessage", "content": "' + "x" * 1200 + '"}', "too_large"),
        (b"\x00\x01binary", "bad_request"),
    ]
    for frame, code in bad:
        if isinstance(frame, bytes):
            await ws.send_bytes(frame)
        else:
            await ws.send_str(frame)
        answer = await ws.receive_json()
        assert answer["type"] == "error" and answer["code"] == code and answer["message"], (frame, answer)
    await ws.send_json({"type": "TextMessage", "content": "", "client_msg_id": "empty1"})
    refused = await ws.receive_json()
    assert (
        refused["code"] == "bad_request" and refused["client_msg_id"] == "empty1"
    )  # names the refused message
    await ws.send_json({"type": "TextMessage", "content": "still here", "client_msg_id": "ok1"})
    frames = await receive_until(ws, completed)
    assert {"type": "ack", "client_msg_id": "ok1", "seq": 1} in frames
    assert (await (await client.get("/sessions/b1/messages")).json())["messages"][0][
        "content"
    ] == "still here"
    await ws.close()


async def test_repeated_client_msg_id_is_acked_with_the_first_seq(client: Client) -> None:
    ws = await client.ws_connect("/ws/chat/queue?session_id=d1")
    await ws.receive_json()
    await ws.send_json({"type": "TextMessage", "content": "once", "client_msg_id": "same"})
    first = await receive_until(ws, lambda f: f.get("type") == "ack")
    await ws.send_json({"type": "TextMessage", "content": "once", "client_msg_id": "same"})
    second = await receive_until(ws, lambda f: f.get("type") == "ack")
    assert first[-1]["seq"] == second[-1]["seq"] == 1
    await receive_until(ws, completed)
    page = await (await client.get("/sessions/d1/messages")).json()
    assert [e["content"] for e in page["messages"] if e["source"] == "user"] == ["once"]
    await ws.close()


async def test_no_session_id_creates_one_and_cancel_works(client: Client) -> None:
    ws = await client.ws_connect("/ws/chat/queue")
    hello = await ws.receive_json()
    sid = hello["session_id"]
    assert sid.startswith("s_") and hello["last_seq"] == 0
    await ws.send_json({"type": "TextMessage", "content": "[[sleep:30]] slow one"})
    await receive_until(ws, lambda f: f.get("type") == "run_started")
    await ws.send_json({"type": "cancel"})
    frames = await receive_until(ws, lambda f: f.get("type") in ("run_cancelled", "run_completed"))
    assert frames[-1]["type"] == "run_cancelled"
    session = await (await client.get(f"/sessions/{sid}")).json()
    assert session["status"] == "idle"
    await ws.close()


async def test_deleting_a_session_ends_its_streams(client: Client) -> None:
    ws = await client.ws_connect("/ws/chat/queue?session_id=gone")
    await ws.receive_json()
    await ws.send_json({"type": "TextMessage", "content": "hello"})
    await receive_until(ws, completed)
    events = await client.get("/sessions/gone/events")
    assert (await client.delete("/sessions/gone")).status == 204
    closing = await ws.receive()
    assert closing.type == WSMsgType.CLOSE and closing.data == 4404  # deleted: do not reconnect to it
    assert await events.content.read() != b"" and events.content.at_eof()  # replayed, then ended
    # A new session of the same id starts at seq 1 for new readers; the old cursors meant nothing.
    again = await client.ws_connect("/ws/chat/queue?session_id=gone")
    assert (await again.receive_json())["last_seq"] == 0
    await again.close()
    events.close()


async def test_chunk_frames_have_the_entry_shape(client: Client) -> None:
    ws = await client.ws_connect("/ws/chat/queue?session_id=shape")
    await ws.receive_json()
    await ws.send_json({"type": "TextMessage", "content": "shape"})
    frames = await receive_until(ws, completed)
    entry_keys = set(durable(frames)[0])
    chunk = next(f for f in frames if f.get("seq") is None and "created_at" in f)
    assert set(chunk) == entry_keys | {"full_message_id", "offset"}
    assert chunk["run_id"] == durable(frames)[-1]["run_id"] and chunk["created_at"].endswith("Z")
    assert len(chunk["created_at"]) == len("2026-11-24T10:00:00.123Z")
    await ws.close()
