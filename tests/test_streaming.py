"""Streaming that survives (README "Streaming"), in-process with the real worker pool: a reader connecting in the
middle of a streamed answer gets the whole text exactly once; a cancel mid-answer leaves the text streamed so far
as a durable partial entry that the team remembers; emoji split across provider deltas arrive whole; frames and
bodies with lone surrogate escapes are repaired, not refused.

The default team's demo model streams one word per chunk every 0.03 s, so a ~150-word message gives a ~5 s
answer. Waits are for frames or conditions, bounded by ``WAIT_S`` (a hang guard, never a timing assertion)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.teams import RoundRobinGroupChat
from autogen_ext.models.openai import OpenAIChatCompletionClient

from service import keys
from service.app import create_app
from tests.conftest import backend_url
from tests.web import durable, make_config

Client = TestClient[Any, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
Frame = dict[str, Any]
Predicate = Callable[[list[Frame]], bool]

WAIT_S = 30.0
CHUNK = "ModelClientStreamingChunkEvent"
LONG = " ".join(f"w{i}" for i in range(150))  # the demo model's answer repeats it: ~150 chunks, ~5 s
LONG_ANSWER = f"You said: {LONG} [context: 1]"
MID_ANSWER_CHUNKS = 20  # chunks a first reader sees before "the middle of the answer" starts


# --- readers ----------------------------------------------------------------------------------------------------
class Reader:
    """The frames of one live reader, collected in the background so that no wait can miss one."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.ended = False  # the server ended the stream (WebSocket closed, SSE body ended)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _start(self, reading: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await reading
            finally:
                self.ended = True
                self._changed.set()

        self._task = asyncio.ensure_future(run())

    def _add(self, frame: Frame) -> None:
        self.frames.append(frame)
        self._changed.set()

    async def wait(self, done: Predicate) -> None:
        async with asyncio.timeout(WAIT_S):
            while not done(self.frames):
                assert not self.ended, f"the stream ended early: {self.frames[-5:]}"
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class WsReader(Reader):
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        super().__init__()
        self.ws = ws
        self._start(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                self._add(orjson.loads(message.data))

    async def close(self) -> None:
        await self.ws.close()
        await super().close()


class SseReader(Reader):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        super().__init__()
        assert response.status == 200, response.status
        self.response = response
        self._start(self._read())

    async def _read(self) -> None:
        while line := await self.response.content.readline():
            if line.startswith(b"data: "):
                self._add(orjson.loads(line[6:]))

    async def close(self) -> None:
        self.response.close()
        await super().close()


async def ws_reader(client: Client, query: str) -> WsReader:
    reader = WsReader(await client.ws_connect(f"/ws/chat/queue?{query}"))
    await reader.wait(lambda frames: any(f.get("type") == "session" for f in frames))
    return reader


async def sse_reader(client: Client, session_id: str) -> SseReader:
    return SseReader(await client.get(f"/sessions/{session_id}/events?after=0"))


# --- predicates and checks --------------------------------------------------------------------------------------
def chunks(frames: list[Frame], message_id: str | None = None) -> list[Frame]:
    return [
        f
        for f in frames
        if f.get("type") == CHUNK and f.get("seq") is None and message_id in (None, f.get("full_message_id"))
    ]


def count(kind: str, n: int = 1) -> Predicate:
    return lambda frames: sum(1 for f in durable(frames) if f["type"] == kind) >= n


def at_least_chunks(n: int) -> Predicate:
    return lambda frames: len(chunks(frames)) >= n


def streamed_text(frames: list[Frame], message_id: str) -> str:
    """The text of a message as one reader got it in chunks; every chunk must start where the previous one
    ended (``offset``), so a piece sent twice or a piece missing fails here already."""
    text = ""
    for frame in chunks(frames, message_id):
        assert frame["offset"] == len(text), (frame, text[-40:])
        text += frame["content"]
    return text


def assert_in_order(frames: list[Frame], message: Frame) -> None:
    """The durable entries one reader got are the log, seq after seq, and the message's chunks come before it."""
    entries = durable(frames)
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    position = next(i for i, f in enumerate(frames) if f.get("seq") == message["seq"])
    assert all(frames.index(c) < position for c in chunks(frames, message["metadata"]["id"]))


async def read_log(client: Client, session_id: str) -> list[Frame]:
    response = await client.get(f"/sessions/{session_id}/messages?after=0&limit=1000")
    assert response.status == 200
    page = await response.json()
    assert not page["has_more"]
    messages: list[Frame] = page["messages"]
    return messages


def assistant_texts(log: list[Frame]) -> list[Frame]:
    return [e for e in log if e["type"] == "TextMessage" and e["source"] == "assistant"]


def strings(value: Any) -> Iterator[str]:
    """Every string in JSON-like data."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


# --- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(params=["memory", "sqlite"])
async def client(
    request: pytest.FixtureRequest, tmp_path: Path, aiohttp_client: MakeClient
) -> AsyncIterator[Client]:
    """The app with its real worker pool and the default team (the demo model at its normal chunk speed)."""
    with backend_url(request.param, tmp_path) as url:
        yield await aiohttp_client(create_app(make_config(url)))


# --- 1. a reader connecting mid-answer gets the whole text once -------------------------------------------------
@pytest.mark.parametrize("late_kind", ["ws", "sse"])
async def test_a_reader_connecting_mid_answer_gets_the_whole_text_exactly_once(
    client: Client, late_kind: str
) -> None:
    early = await ws_reader(client, "session_id=mid&client_id=early")
    late: Reader | None = None
    try:
        await early.ws.send_json({"type": "TextMessage", "content": LONG, "client_msg_id": "m1"})
        await early.wait(at_least_chunks(MID_ANSWER_CHUNKS))
        late = (
            await ws_reader(client, "session_id=mid")
            if late_kind == "ws"
            else await sse_reader(client, "mid")
        )
        await late.wait(count("run_completed"))
        await early.wait(count("run_completed"))
    finally:
        await early.close()
        if late is not None:
            await late.close()

    assert late is not None
    log = await read_log(client, "mid")
    [reply] = assistant_texts(log)
    assert reply["content"] == LONG_ANSWER
    message_id = reply["metadata"]["id"]
    for reader in (early, late):
        assert durable(reader.frames) == log
        assert streamed_text(reader.frames, message_id) == reply["content"]
        assert_in_order(reader.frames, reply)
    assert not [f for f in chunks(early.frames) if f.get("resumed")]
    # The late reader caught up with ONE frame holding the text so far, then took the live chunks.
    first, *rest = chunks(late.frames, message_id)
    assert first.get("resumed") is True and first["offset"] == 0
    assert len(first["content"].split()) >= MID_ANSWER_CHUNKS and first["content"] != reply["content"]
    assert rest and not [f for f in rest if f.get("resumed")]
    assert chunks(late.frames) == chunks(late.frames, message_id)  # no chunk of any other message


# --- 3. a cancel mid-answer leaves what was streamed as a durable partial entry ---------------------------------
async def test_a_cancel_mid_answer_keeps_the_streamed_text_as_a_partial_entry_the_team_remembers(
    client: Client,
) -> None:
    reader = await ws_reader(client, "session_id=cut&client_id=tab")
    try:
        await reader.ws.send_json({"type": "TextMessage", "content": LONG, "client_msg_id": "m1"})
        await reader.wait(at_least_chunks(MID_ANSWER_CHUNKS))
        await reader.ws.send_json({"type": "cancel"})
        await reader.wait(count("run_cancelled"))
        seen = list(reader.frames)
        await reader.ws.send_json(
            {"type": "TextMessage", "content": "what did you say?", "client_msg_id": "m2"}
        )
        await reader.wait(count("run_completed"))
    finally:
        await reader.close()

    log = await read_log(client, "cut")
    assert durable(reader.frames) == log
    first_run = [e for e in log if e["seq"] <= durable(seen)[-1]["seq"]]
    assert [(e["type"], e["source"]) for e in first_run] == [
        ("TextMessage", "user"),
        ("run_started", "system"),
        ("TextMessage", "assistant"),
        ("run_cancelled", "system"),
    ]
    cut = first_run[2]
    [message_id] = {f["full_message_id"] for f in chunks(seen)}
    assert cut["metadata"]["id"] == message_id
    assert cut["metadata"]["partial"] is True and cut["metadata"]["partial_reason"] == "cancelled"
    # What the reader saw, no more and no less, and a real cut: a non-empty proper prefix of the answer.
    assert cut["content"] == streamed_text(seen, message_id)
    assert cut["content"] and LONG_ANSWER.startswith(cut["content"]) and cut["content"] != LONG_ANSWER
    assert len(cut["content"].split()) >= MID_ANSWER_CHUNKS
    # The next turn counts both user messages once (no user message remembered twice, none lost) ...
    [_, reply] = assistant_texts(log)
    assert "what did you say?" in reply["content"] and reply["content"].endswith("[context: 2]")
    # ... and the agents remember the cut-off text the user saw (saved with run_cancelled, kept by the next run).
    assert client.app is not None
    state = await client.app[keys.STORE].load_team_state("cut")
    assert state is not None
    assert cut["content"] in set(strings(state["agent_states"]["RoundRobinGroupChatManager"]))
    context = state["agent_states"]["assistant"]["agent_state"]["llm_context"]["messages"]
    assert [(m["type"], m["content"]) for m in context] == [
        ("UserMessage", LONG),
        ("AssistantMessage", cut["content"]),  # its own reply, as far as the user saw it
        ("UserMessage", "what did you say?"),
        ("AssistantMessage", reply["content"]),
    ]


# --- 6. lone surrogate escapes in a frame or a body are repaired, not refused -----------------------------------
LONE_FRAME = '{"type":"TextMessage","content":"hi \\ud83d","client_msg_id":"m1"}'


async def test_a_lone_surrogate_escape_is_taken_with_u_fffd_over_websocket_and_http(client: Client) -> None:
    reader = await ws_reader(client, "session_id=lone")
    try:
        await reader.ws.send_str(LONE_FRAME)
        await reader.wait(lambda frames: any(f.get("type") in ("ack", "error") for f in frames))
        answers = [f for f in reader.frames if f.get("type") in ("ack", "error")]
        assert answers == [{"type": "ack", "client_msg_id": "m1", "seq": 1}]
        # A resend (what a page's outbox does after a reconnect) is the same message, acknowledged again.
        await reader.ws.send_str(LONE_FRAME)
        await reader.wait(lambda frames: len([f for f in frames if f.get("type") == "ack"]) == 2)
        assert [f for f in reader.frames if f.get("type") in ("ack", "error")][-1] == answers[0]
        await reader.wait(count("run_completed"))
    finally:
        await reader.close()
    body = LONE_FRAME.replace('"client_msg_id":"m1"', '"client_msg_id":"h1"').encode()
    posted = await client.post(
        "/sessions/lone/messages", data=body, headers={"Content-Type": "application/json"}
    )
    assert posted.status == 202, await posted.text()
    assert (await posted.json())["client_msg_id"] == "h1"

    users = [e for e in await read_log(client, "lone") if e["source"] == "user"]
    assert [(e["client_msg_id"], e["content"]) for e in users] == [("m1", "hi \ufffd"), ("h1", "hi \ufffd")]


# --- 5. an emoji split across two deltas of an OpenAI-compatible stream -----------------------------------------
# Deltas exactly as a provider writes them: JSON string literals, the first ending with the escape of the first
# half of a UTF-16 pair, the next starting with the second half.
SPLIT_DELTAS = [r'"A smile: \ud83d"', r'"\ude00 for you."']
SPLIT_TEXT = "A smile: \U0001f600 for you."
LONE_DELTAS = [r'"Lone \ud83d"', r'" plain text."']
LONE_TEXT = "Lone \ufffd plain text."
TRAILING_DELTAS = [r'"Cut at the end: "', r'"\ud83d"']  # the stream ends with the first half of a pair
TRAILING_TEXT = "Cut at the end: \ufffd"
OPENAI_MODEL_INFO: dict[str, Any] = {
    "vision": False,
    "function_calling": False,
    "json_output": False,
    "family": "unknown",
    "structured_output": False,
}


def _sse_chunk(delta: bytes, finish: str | None = None) -> bytes:
    finish_json = orjson.dumps(finish)
    return (
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":0,"model":"fake",'
        b'"choices":[{"index":0,"delta":' + delta + b',"finish_reason":' + finish_json + b"}]}\n\n"
    )


async def _fake_completions(request: web.Request) -> web.StreamResponse:
    """/v1/chat/completions, streamed: "[[split]]" splits an emoji across two deltas, "[[lone]]" sends half of
    one followed by more text, "[[trailing]]" ends the answer with half of one."""
    body = await request.json()
    last = str(body["messages"][-1].get("content"))
    deltas = (
        SPLIT_DELTAS if "[[split]]" in last else TRAILING_DELTAS if "[[trailing]]" in last else LONE_DELTAS
    )
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(_sse_chunk(b'{"role":"assistant","content":""}'))
    for literal in deltas:
        await response.write(_sse_chunk(b'{"content":' + literal.encode() + b"}"))
    await response.write(_sse_chunk(b"{}", "stop"))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


@pytest.fixture
async def fake_openai() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _fake_completions)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}/v1"
    finally:
        await server.close()


def openai_team_file(tmp_path: Path, base_url: str) -> Path:
    model = OpenAIChatCompletionClient(
        model="fake",
        base_url=base_url,
        api_key="sk-unused",
        model_info=OPENAI_MODEL_INFO,  # type: ignore[arg-type]
    )
    team = RoundRobinGroupChat(
        [AssistantAgent("assistant", model_client=model, model_client_stream=True)], max_turns=1
    )
    path = tmp_path / "emoji.json"
    path.write_text(team.dump_component().model_dump_json())
    return path


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def openai_client(
    request: pytest.FixtureRequest,
    fake_openai: str,
    tmp_path: Path,
    aiohttp_client: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Client]:
    """The app with a team ``emoji`` whose model is OpenAI's client on the fake server, and a session ``emo``."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-emoji")
    teams = {"emoji": str(openai_team_file(tmp_path, fake_openai))}
    with backend_url(request.param, tmp_path) as url:
        # A short lease: a run that crashes is recovered (run_interrupted) soon, and the test fails soon.
        client = await aiohttp_client(create_app(make_config(url, teams=teams, lease_s=1.0)))
        created = await client.post("/sessions", json={"session_id": "emo", "team": "emoji"})
        assert created.status == 201
        try:
            yield client
        finally:
            await client.close()  # before the database is dropped and the key unset


def run_ended(n: int) -> Predicate:
    """``n`` runs reached an end (or, for a run that crashed, its interruption after the lease expired)."""
    ends = ("run_completed", "run_failed", "run_cancelled", "run_interrupted")
    return lambda frames: sum(1 for f in durable(frames) if f["type"] in ends) >= n


async def converse(client: Client, texts: list[str]) -> tuple[WsReader, SseReader, list[Frame]]:
    """Send ``texts`` one after the other to session ``emo`` with a WebSocket and an SSE follower connected
    throughout (both checked to be still connected at the end); the followers and the log."""
    ws = await ws_reader(client, "session_id=emo")
    sse = await sse_reader(client, "emo")
    try:
        for n, text in enumerate(texts, start=1):
            queued = await client.post("/sessions/emo/messages", json={"content": text})
            assert queued.status == 202
            await ws.wait(run_ended(n))
            await sse.wait(run_ended(n))
        # No 1011 close, no aborted event stream.
        assert not ws.ended and not ws.ws.closed and ws.ws.close_code is None
        assert not sse.ended
    finally:
        await ws.close()
        await sse.close()
    return ws, sse, await read_log(client, "emo")


@pytest.mark.parametrize(
    ("directive", "stored"),
    [("[[split]]", SPLIT_TEXT), ("[[lone]]", LONE_TEXT), ("[[trailing]]", TRAILING_TEXT)],
    ids=["split-emoji", "lone-surrogate", "trailing-half"],
)
async def test_surrogate_halves_from_a_provider_stream_reach_followers_and_the_log_repaired(
    openai_client: Client, directive: str, stored: str
) -> None:
    ws, sse, log = await converse(openai_client, [f"{directive} smile please"])
    assert [e["type"] for e in log if e["source"] == "system"] == ["run_started", "run_completed"]
    [message] = assistant_texts(log)
    assert message["content"] == stored
    for reader in (ws, sse):
        assert durable(reader.frames) == log
        assert streamed_text(reader.frames, message["metadata"]["id"]) == stored
    assert openai_client.app is not None
    state = await openai_client.app[keys.STORE].load_team_state("emo")
    assert state is not None  # saved with the run_completed


async def test_the_conversation_goes_on_after_an_emoji_split_across_deltas(openai_client: Client) -> None:
    """The next turn sends the first one back to the provider: it must be text the provider can take."""
    _, _, log = await converse(openai_client, ["[[split]] smile please", "[[lone]] and again"])
    assert [e["type"] for e in log if e["source"] == "system"] == ["run_started", "run_completed"] * 2
    assert [e["content"] for e in assistant_texts(log)] == [SPLIT_TEXT, LONE_TEXT]


# --- draft_interval_s: the streamed text is saved as a draft, or not at all with 0 -----------------------------
@pytest.mark.parametrize("interval_s", [0.1, 0.0])
async def test_draft_interval_decides_whether_the_text_so_far_is_saved(
    tmp_path: Path, aiohttp_client: MakeClient, interval_s: float
) -> None:
    """README "Streaming": a draft at most every draft_interval_s; 0 saves none (what a SIGKILL then leaves is
    only the run_interrupted, no partial entry)."""
    client = await aiohttp_client(
        create_app(make_config(f"sqlite:///{tmp_path / 'd.db'}", draft_interval_s=interval_s))
    )
    reader = await ws_reader(client, "session_id=dr")
    try:
        await reader.ws.send_json({"type": "TextMessage", "content": LONG, "client_msg_id": "m1"})
        await reader.wait(at_least_chunks(MID_ANSWER_CHUNKS))  # ~0.03 s a chunk: well past one interval
        assert client.app is not None
        draft = await client.app[keys.STORE].read_draft("dr")
        assert (draft is not None) is (interval_s > 0)
        await client.post("/sessions/dr/cancel")
        await reader.wait(count("run_cancelled"))
    finally:
        await reader.close()
