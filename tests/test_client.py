"""The Python client (``service/client.py``, README "A quick tour") against a real server process.

``follow`` across a dropped connection mid-message (through a TCP proxy) and across a SIGKILL and restart with a
message in flight: no gap, no duplicate seq, no text twice, the run's terminal entry arrives. ``send`` retrying
while the server is down. History paging, cancel, reset, answers to ``[[ask]]``, deletion (4404), the sync wrapper.

Waits are for events or conditions, bounded by ``WAIT_S`` (a hang guard, never a timing assertion)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from service.client import (
    ChatClient,
    ChatError,
    Chunk,
    Entry,
    Event,
    Follower,
    SendTimeout,
    SyncChatClient,
    is_terminal,
)
from tests.server import ServerProcess, start_server

pytestmark = pytest.mark.slow

WAIT_S = 30.0
FAST = ("--lease-s", "2", "--heartbeat-s", "0.5", "--poll-interval-s", "0.2", "--grace-s", "0.5")
LONG = " ".join(f"w{i}" for i in range(80))  # the demo model streams its answer word by word: ~80 chunks
MID_ANSWER_CHUNKS = 20


# --- helpers ------------------------------------------------------------------------------------------------
@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    process = start_server(tmp_path, *FAST)
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[ChatClient]:
    async with ChatClient(server.url, client_id="tester", max_backoff_s=0.5) as chat:
        yield chat


class Collector:
    """Runs a follower in a task, keeping every event; ``wait`` for a condition on them."""

    def __init__(self, follower: Follower) -> None:
        self.follower = follower
        self.events: list[Event] = []
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for event in self.follower:
                self.events.append(event)
                self._changed.set()
        finally:
            self._changed.set()

    async def wait(self, condition: Callable[[list[Event]], bool]) -> None:
        async with asyncio.timeout(WAIT_S):
            while not condition(self.events):
                if self.task.done():
                    self.task.result()
                    raise AssertionError(f"follow ended before the condition held: {self.events[-3:]}")
                self._changed.clear()
                await self._changed.wait()

    async def ended(self) -> None:
        async with asyncio.timeout(WAIT_S):
            await self.task

    async def close(self) -> None:
        if self.task.done():
            self.task.result()  # an error of the follower fails the test
        else:
            self.task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await self.task
        await self.follower.aclose()


def durable(events: list[Event]) -> list[Entry]:
    return [e for e in events if not isinstance(e, Chunk)]


def chunks(events: list[Event], message_id: str | None = None) -> list[Chunk]:
    return [e for e in events if isinstance(e, Chunk) and message_id in (None, e.message_id)]


def terminal(input_seq: int) -> Callable[[list[Event]], bool]:
    return lambda events: any(is_terminal(e, input_seq) for e in durable(events))


def has(kind: str, input_seq: int | None = None) -> Callable[[list[Event]], bool]:
    return lambda events: any(
        e["type"] == kind and input_seq in (None, e.get("input_seq")) for e in durable(events)
    )


def at_least_chunks(n: int) -> Callable[[list[Event]], bool]:
    return lambda events: len(chunks(events)) >= n


def streamed_texts(events: list[Event]) -> dict[str, str]:
    """Each message's text, concatenating its chunks; asserts every chunk continues exactly where the text so
    far ends (nothing twice, nothing missing)."""
    texts: dict[str, str] = {}
    for chunk in chunks(events):
        text = texts.get(chunk.message_id, "")
        assert chunk.offset == len(text), (chunk, text)
        texts[chunk.message_id] = text + chunk.content
    return texts


def assert_seqs_contiguous(events: list[Event], first: int = 1) -> list[int]:
    seqs = [e["seq"] for e in durable(events)]
    assert seqs == list(range(first, first + len(seqs))), seqs
    return seqs


async def full_log(chat: ChatClient, session_id: str) -> list[Entry]:
    page = await chat.history(session_id, after=0, limit=1000)
    assert not page["has_more"]
    return page["messages"]


async def until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Poll state in another process (nothing to await there), bounded."""
    async with asyncio.timeout(WAIT_S):
        while not await condition():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def _cursor_is(chat: ChatClient, session_id: str, seq: int) -> bool:
    return await chat.get_cursor(session_id) == seq


class Proxy:
    """A TCP proxy in front of the server: ``cut()`` drops every open connection (a network blip) and holds new
    ones until ``restore()``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = ""
        self.up = asyncio.Event()
        self.up.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def _handle(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        await self.up.wait()
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers |= {down_w, up_w}
        await asyncio.gather(_pipe(down_r, up_w), _pipe(up_r, down_w))

    def cut(self) -> None:
        self.up.clear()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.up.set()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.restore()  # handlers still waiting end with a refused connection


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.transport.abort()


class RetryLog(logging.Handler):
    """Sets an event when the client logs a send retry."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.retried = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("send of "):
            self.retried.set()


# --- tests --------------------------------------------------------------------------------------------------
async def test_send_and_follow_end_to_end(client: ChatClient) -> None:
    collector = Collector(client.follow("s1", after=0))
    try:
        first = await client.send("s1", "hello there")
        await collector.wait(terminal(first))
        # The follower is live now: the next answer streams to it from its first word.
        second = await client.send("s1", LONG)
        await collector.wait(terminal(second))
        # It acknowledges what it yielded while it follows: the server keeps this client's cursor.
        last = durable(collector.events)[-1]["seq"]
        await until(lambda: _cursor_is(client, "s1", last))
    finally:
        await collector.close()
    seqs = assert_seqs_contiguous(collector.events)
    assert durable(collector.events) == await full_log(client, "s1")
    assert [e["seq"] for e in durable(collector.events) if e["source"] == "user"] == [first, second]
    answers = [
        e for e in durable(collector.events) if e["type"] == "TextMessage" and e["source"] == "assistant"
    ]
    assert answers[-1]["content"] == f"You said: {LONG} [context: 2]"
    texts = streamed_texts(collector.events)
    assert texts[answers[-1]["metadata"]["id"]] == answers[-1]["content"]
    assert collector.follower.cursor == seqs[-1]
    with pytest.raises(ChatError) as too_large:  # refusals that retrying cannot fix are raised at once
        await client.send("s1", "x" * 100_001)
    assert (too_large.value.status, too_large.value.code) == (413, "too_large")


async def test_follow_resumes_mid_message_after_a_dropped_connection_without_repeating_text(
    client: ChatClient, server: ServerProcess
) -> None:
    proxy = await Proxy(server.port).start()
    direct = Collector(client.follow("s2", after=0))
    async with ChatClient(proxy.url, client_id="behind-proxy", max_backoff_s=0.5) as watcher:
        behind = Collector(watcher.follow("s2", after=0))
        try:
            seq = await client.send("s2", LONG)
            await behind.wait(at_least_chunks(MID_ANSWER_CHUNKS))
            proxy.cut()
            seen = len(chunks(behind.events))
            # While the watcher is cut off, the answer goes on (a direct follower sees it grow).
            await direct.wait(at_least_chunks(seen + 5))
            proxy.restore()
            await behind.wait(terminal(seq))
            await direct.wait(terminal(seq))
        finally:
            await behind.close()
            await direct.close()
            await proxy.close()
    assert durable(behind.events) == durable(direct.events)
    assert_seqs_contiguous(behind.events)
    answer = next(
        e for e in durable(behind.events) if e["source"] == "assistant" and e["type"] == "TextMessage"
    )
    assert answer["content"] == f"You said: {LONG} [context: 1]"
    message_id = answer["metadata"]["id"]
    # The server's resumed frame repeated the text so far (offset 0); the client yielded only the rest.
    before_cut, after_cut = chunks(behind.events)[:seen], chunks(behind.events)[seen:]
    assert after_cut[0].resumed and after_cut[0].frame["offset"] == 0
    assert after_cut[0].offset == len("".join(c.content for c in before_cut)) > 0
    assert streamed_texts(behind.events) == {message_id: answer["content"]}


async def test_follow_across_sigkill_and_restart_with_a_message_in_flight(
    client: ChatClient, server: ServerProcess
) -> None:
    collector = Collector(client.follow("s3"))  # from the server's cursor of this client (none yet: all)
    try:
        seq = await client.send("s3", LONG)
        await collector.wait(at_least_chunks(MID_ANSWER_CHUNKS))
        await asyncio.to_thread(server.kill)
        await asyncio.to_thread(server.restart)
        await collector.wait(terminal(seq))
        last = durable(collector.events)[-1]["seq"]
        await until(lambda: _cursor_is(client, "s3", last))  # acknowledged on the new connection
    finally:
        await collector.close()
    assert_seqs_contiguous(collector.events)
    entries = durable(collector.events)
    assert entries == await full_log(client, "s3")
    kinds = [e["type"] for e in entries]
    assert (
        "run_interrupted" in kinds and next(e for e in entries if is_terminal(e))["type"] == "run_completed"
    )
    assert [e.get("attempt") for e in entries if e["type"] == "run_started"] == [1, 2]
    texts = streamed_texts(collector.events)  # offsets contiguous per message: nothing twice
    answers = [e for e in entries if e["type"] == "TextMessage" and e["source"] == "assistant"]
    partial, final = answers
    assert partial["metadata"]["partial"] is True and partial["metadata"]["partial_reason"] == "interrupted"
    assert texts[partial["metadata"]["id"]].startswith(partial["content"])
    assert final["content"] == f"You said: {LONG} [context: 1]" == texts[final["metadata"]["id"]]


async def test_send_retries_while_the_server_is_down_and_enqueues_once(
    client: ChatClient, server: ServerProcess
) -> None:
    await client.send("s4", "before the crash")
    retries = RetryLog()
    logging.getLogger("service.client").addHandler(retries)
    logging.getLogger("service.client").setLevel(logging.INFO)
    try:
        await asyncio.to_thread(server.kill)
        with pytest.raises(SendTimeout) as timed_out:
            await client.send("s4", "never acknowledged", client_msg_id="late", timeout=0.3)
        assert timed_out.value.client_msg_id == "late"
        retries.retried.clear()
        sending = asyncio.create_task(client.send("s4", "while it was down", client_msg_id="m-down"))
        async with asyncio.timeout(WAIT_S):
            await retries.retried.wait()  # it is retrying against a dead server
        assert not sending.done()
        await asyncio.to_thread(server.restart)
        async with asyncio.timeout(WAIT_S):
            seq = await sending
    finally:
        logging.getLogger("service.client").removeHandler(retries)
    assert await client.send("s4", "while it was down", client_msg_id="m-down") == seq  # idempotent
    late = await client.send("s4", "never acknowledged", client_msg_id="late")
    log = await full_log(client, "s4")
    assert [e["seq"] for e in log if e["client_msg_id"] == "m-down"] == [seq]
    assert [e["seq"] for e in log if e["client_msg_id"] == "late"] == [late]
    assert next(e for e in log if e["seq"] == seq)["content"] == "while it was down"


async def test_send_retries_unavailable_with_the_same_client_msg_id() -> None:
    """503 ``unavailable`` (the database is down, say) cannot be made on demand in the real server: a stand-in
    answers it twice, then acknowledges."""
    received: list[str] = []

    async def post_message(request: web.Request) -> web.Response:
        received.append((await request.json())["client_msg_id"])
        if len(received) <= 2:
            return web.json_response({"error": {"code": "unavailable", "message": "db down"}}, status=503)
        return web.json_response({"seq": 7, "client_msg_id": received[-1], "status": "queued"}, status=202)

    app = web.Application()
    app.router.add_post("/sessions/{session_id}/messages", post_message)
    stand_in = TestServer(app, host="127.0.0.1")
    await stand_in.start_server()
    try:
        async with ChatClient(f"http://127.0.0.1:{stand_in.port}") as chat:
            assert await chat.send("s", "hi") == 7
    finally:
        await stand_in.close()
    assert len(received) == 3 and len(set(received)) == 1


async def test_history_pages_forward_and_backward(client: ChatClient) -> None:
    collector = Collector(client.follow("s5", after=0))
    try:
        seqs = [await client.send("s5", f"message {i}") for i in range(3)]
        await collector.wait(terminal(seqs[-1]))
    finally:
        await collector.close()
    log = await full_log(client, "s5")
    assert [e["seq"] for e in log] == list(range(1, len(log) + 1)) and len(log) > 8
    forward: list[Entry] = []
    page = await client.history("s5", after=0, limit=4)
    while True:
        assert len(page["messages"]) <= 4 and page["last_seq"] == len(log)
        forward += page["messages"]
        if not page["has_more"]:
            break
        page = await client.history("s5", after=forward[-1]["seq"], limit=4)
    assert forward == log
    backward: list[Entry] = []
    page = await client.history("s5", before=len(log) + 1, limit=4)
    while True:
        backward = page["messages"] + backward
        if not page["has_more"]:
            break
        page = await client.history("s5", before=backward[0]["seq"], limit=4)
    assert backward == log
    with pytest.raises(ValueError):
        await client.history("s5", after=1, before=3)
    with pytest.raises(ChatError) as bad:
        await client.history("s5", after=-1)
    assert (bad.value.status, bad.value.code) == (400, "bad_request")
    with pytest.raises(ChatError) as missing:
        await client.history("no-such-session")
    assert (missing.value.status, missing.value.code) == (404, "not_found")


async def test_cancel_and_reset(client: ChatClient) -> None:
    collector = Collector(client.follow("s6", after=0))
    try:
        seq = await client.send("s6", "[[sleep:60]] take your time")
        await collector.wait(has("run_started", seq))
        with pytest.raises(ChatError) as busy:
            await client.reset("s6")  # not while a run is in progress
        assert (busy.value.status, busy.value.code) == (409, "conflict")
        assert await client.cancel("s6") is True
        await collector.wait(terminal(seq))
        assert next(e for e in durable(collector.events) if is_terminal(e))["type"] == "run_cancelled"
        assert await client.cancel("s6") is False  # nothing left to cancel
        reset_seq = await client.reset("s6")
        await collector.wait(has("team_reset"))
    finally:
        await collector.close()
    assert [e["seq"] for e in durable(collector.events) if e["type"] == "team_reset"] == [reset_seq]
    assert_seqs_contiguous(collector.events)


async def test_answer_to_a_question(client: ChatClient) -> None:
    collector = Collector(client.follow("s7", after=0))
    try:
        asked = await client.send("s7", "[[ask]] plan my day")
        await collector.wait(has("UserInputRequestedEvent"))
        assert (await client.get_session("s7"))["status"] == "awaiting_input"
        answer = await client.answer("s7", "blue skies")
        await collector.wait(terminal(asked))
    finally:
        await collector.close()
    entries = durable(collector.events)
    assert next(e for e in entries if is_terminal(e))["type"] == "run_completed"
    assert not any(e.get("input_seq") == answer for e in entries)  # an answer is not a run of its own
    assert any(e["seq"] == answer and e["content"] == "blue skies" for e in entries)
    assert entries[-2]["content"] == "You said: blue skies [context: 2]"


async def test_follow_ends_when_the_session_is_deleted(
    client: ChatClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.client")
    session = await client.create_session(title="short-lived")
    sid = session["session_id"]
    with pytest.raises(ChatError) as taken:
        await client.create_session(sid)
    assert (taken.value.status, taken.value.code) == (409, "conflict")
    collector = Collector(client.follow(sid, after=0))
    try:
        seq = await client.send(sid, "hello")
        await collector.wait(terminal(seq))
        await client.delete_session(sid)
        await collector.ended()  # closed with 4404: the iterator ends instead of reconnecting
    finally:
        await collector.close()
    assert not [r for r in caplog.records if "connection lost" in r.getMessage()]
    with pytest.raises(ChatError) as gone:
        await client.get_session(sid)  # and nothing re-created it
    assert gone.value.code == "not_found"


def test_sync_client(server: ServerProcess) -> None:
    with SyncChatClient(server.url, client_id="script") as chat:
        asked = chat.send("s8", "[[ask]] a question please")
        answer_seq = None
        seen: list[Entry] = []
        for event in chat.follow("s8", after=0):
            if isinstance(event, Chunk):
                continue
            seen.append(event)
            if event["type"] == "UserInputRequestedEvent":
                answer_seq = chat.answer("s8", "forty-two")
            if is_terminal(event, asked):
                break
        assert answer_seq is not None and seen[-1]["type"] == "run_completed"
        page = chat.history("s8", after=0)
        assert page["messages"] == seen and not page["has_more"]
        assert chat.cancel("s8") is False
        with pytest.raises(ChatError) as missing:
            chat.history("nobody-here")
        assert missing.value.status == 404
