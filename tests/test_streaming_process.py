"""Streaming that survives (README "Streaming") across real processes: a reader on a second PostgreSQL instance
follows an answer streamed on the first one, and a server SIGKILLed in the middle of a streamed answer leaves the
text it had saved as a partial entry before ``run_interrupted``.

Waits are for frames or conditions, bounded by ``WAIT_S`` (a hang guard, never a timing assertion)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.pg import pg_database
from tests.server import ServerProcess, start_server
from tests.test_streaming import (
    LONG,
    LONG_ANSWER,
    MID_ANSWER_CHUNKS,
    WAIT_S,
    Frame,
    Reader,
    SseReader,
    WsReader,
    assistant_texts,
    at_least_chunks,
    chunks,
    count,
    streamed_text,
)
from tests.web import durable

pytestmark = pytest.mark.slow

FAST = ("--lease-s", "2", "--heartbeat-s", "0.5", "--poll-interval-s", "0.2", "--grace-s", "0.5")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    """Server processes a test started (append them): every one is killed at the end."""
    started: list[ServerProcess] = []
    try:
        yield started
    finally:
        for server in started:
            server.kill()


async def serve(servers: list[ServerProcess], home: Path, *args: str) -> ServerProcess:
    def start() -> ServerProcess:
        home.mkdir(exist_ok=True)
        return start_server(home, *args)

    server = await asyncio.to_thread(start)
    servers.append(server)
    return server


async def ws_reader(http: aiohttp.ClientSession, server: ServerProcess, query: str) -> WsReader:
    reader = WsReader(await http.ws_connect(f"{server.ws_url}?{query}"))
    await reader.wait(lambda frames: any(f.get("type") == "session" for f in frames))
    return reader


async def read_log(http: aiohttp.ClientSession, server: ServerProcess, session_id: str) -> list[Frame]:
    async with http.get(f"{server.url}/sessions/{session_id}/messages?limit=1000") as response:
        assert response.status == 200
        page = await response.json()
    assert not page["has_more"]
    messages: list[Frame] = page["messages"]
    return messages


async def until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (state in another process or in a file offers nothing to await), bounded."""
    async with asyncio.timeout(WAIT_S):
        while not await asyncio.to_thread(condition):  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def assert_growing_prefix(frames: list[Frame], message: Frame) -> str:
    """What a reader on an instance that does not run the model gets: the message's text at the pace of the
    saved drafts, each piece continuing the previous one (the first one ``resumed``), a prefix of the
    message (the rest comes with the durable message), then the message itself once."""
    message_id = message["metadata"]["id"]
    pieces = chunks(frames, message_id)
    text = streamed_text(frames, message_id)  # offsets contiguous: nothing twice, nothing missing in between
    assert pieces and pieces[0].get("resumed") is True
    assert text and message["content"].startswith(text)
    assert [f["seq"] for f in durable(frames)].count(message["seq"]) == 1
    position = next(i for i, f in enumerate(frames) if f.get("seq") == message["seq"])
    assert all(frames.index(c) < position for c in pieces)
    assert chunks(frames) == pieces  # no chunk of any other message
    return text


# --- 2. a reader on a second PostgreSQL instance follows the answer streamed on the first -----------------------
async def test_a_reader_on_another_postgresql_instance_follows_the_streamed_answer(
    tmp_path: Path, http: aiohttp.ClientSession, servers: list[ServerProcess]
) -> None:
    with pg_database() as pg_url:
        one, two = await asyncio.gather(
            serve(servers, tmp_path / "one", "--database", pg_url, *FAST),
            serve(servers, tmp_path / "two", "--database", pg_url, *FAST),
        )
        readers: list[Reader] = []
        try:
            # A reader on each instance from the start; which instance runs the model is up to the claim race.
            watchers = [await ws_reader(http, s, "session_id=x") for s in (one, two)]
            readers += watchers
            await watchers[0].ws.send_json({"type": "TextMessage", "content": LONG, "client_msg_id": "m1"})
            await watchers[0].wait(count("run_started"))
            run_id = next(f["run_id"] for f in durable(watchers[0].frames) if f["type"] == "run_started")
            runner = await runner_of(pg_url, run_id, [one, two])
            other = two if runner is one else one
            on_runner = watchers[0] if runner is one else watchers[1]
            on_other = watchers[1] if runner is one else watchers[0]
            await on_runner.wait(at_least_chunks(MID_ANSWER_CHUNKS))
            # Mid-answer: late readers connect to the instance that does not run the model.
            late_ws = await ws_reader(http, other, "session_id=x")
            readers.append(late_ws)
            late_sse = SseReader(await http.get(f"{other.url}/sessions/x/events?after=0"))
            readers.append(late_sse)
            for reader in readers:
                await reader.wait(count("run_completed"))
        finally:
            for reader in readers:
                await reader.close()
        log = await read_log(http, other, "x")
        for server in servers:
            server.kill()  # before the database is dropped

    [message] = assistant_texts(log)
    assert message["content"] == LONG_ANSWER
    for reader in readers:
        assert durable(reader.frames) == log
    # On the instance running the model: every chunk, live.
    assert streamed_text(on_runner.frames, message["metadata"]["id"]) == LONG_ANSWER
    # On the other instance: the text so far at once, then more as it is saved, never twice.
    for reader in (on_other, late_ws, late_sse):
        assert_growing_prefix(reader.frames, message)
    for reader in (late_ws, late_sse):
        pieces = chunks(reader.frames, message["metadata"]["id"])
        assert pieces[0]["content"]  # connected mid-answer: the text so far (as last saved) at once ...
        assert len(pieces) >= 2  # ... and then more as it was saved (a ~4 s answer, saved every 0.25 s)


async def runner_of(pg_url: str, run_id: str, candidates: list[ServerProcess]) -> ServerProcess:
    """The process whose worker pool claimed ``run_id`` (its ``worker pool <id> started`` log line)."""
    conn = await asyncpg.connect(pg_url)
    try:
        worker_id = await conn.fetchval("SELECT worker_id FROM inputs WHERE run_id = $1", run_id)
    finally:
        await conn.close()
    found = [s for s in candidates if f"worker pool {worker_id} started" in s.output()]
    assert len(found) == 1, (worker_id, [s.output()[-500:] for s in candidates])
    return found[0]


# --- 4. SIGKILL mid-answer: the saved draft becomes a partial entry before run_interrupted ----------------------
def draft_text(db: Path, session_id: str) -> str:
    """The session's saved draft, read straight from the file (WAL: readable while the server writes)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("SELECT content FROM drafts WHERE session_id = ?", (session_id,)).fetchone()
    finally:
        conn.close()
    return "" if row is None else str(row[0])


async def test_sigkill_mid_answer_leaves_the_saved_text_as_a_partial_entry_then_the_retry_completes(
    tmp_path: Path, http: aiohttp.ClientSession, servers: list[ServerProcess]
) -> None:
    server = await serve(servers, tmp_path / "k", "--draft-interval-s", "0.1", *FAST)
    db = tmp_path / "k" / "service.db"
    before = await ws_reader(http, server, "session_id=k1")
    try:
        await before.ws.send_json({"type": "TextMessage", "content": LONG, "client_msg_id": "m1"})
        await before.wait(at_least_chunks(MID_ANSWER_CHUNKS))
        await until(lambda: len(draft_text(db, "k1").split()) >= MID_ANSWER_CHUNKS // 2)
        saved = draft_text(db, "k1")
        server.kill()
        await before.wait(lambda _: before.ended)  # everything the dead server sent has been read
    finally:
        await before.close()
    assert count("run_completed")(before.frames) is False
    [message_id] = {f["full_message_id"] for f in chunks(before.frames)}
    streamed = streamed_text(before.frames, message_id)

    await asyncio.to_thread(server.restart)
    after = await ws_reader(http, server, "session_id=k1&after=0")
    try:
        await after.wait(count("run_completed"))
    finally:
        await after.close()
    log = await read_log(http, server, "k1")

    assert durable(after.frames) == log
    assert [(e["type"], e["source"]) for e in log] == [
        ("TextMessage", "user"),
        ("run_started", "system"),
        ("TextMessage", "assistant"),
        ("run_interrupted", "system"),
        ("run_started", "system"),
        ("TextMessage", "assistant"),
        ("run_completed", "system"),
    ]
    cut, retried = assistant_texts(log)
    assert cut["metadata"]["id"] == message_id
    assert cut["metadata"]["partial"] is True and cut["metadata"]["partial_reason"] == "interrupted"
    # What the last saved draft held: some of what was streamed (at most draft_interval_s behind), not empty.
    assert cut["content"].startswith(saved) and saved
    assert streamed.startswith(cut["content"]) and LONG_ANSWER.startswith(streamed)
    # The retry starts from the state before the run (the cut text is not remembered) and completes.
    assert [e["attempt"] for e in log if e["type"] == "run_started"] == [1, 2]
    assert retried["content"] == LONG_ANSWER and retried["metadata"]["id"] != message_id
    assert "partial" not in retried["metadata"]
    assert not chunks(after.frames, message_id)  # the dead run's draft is not resumed after the restart
    assert draft_text(db, "k1") == ""


# --- SIGTERM mid-answer: the text streamed so far becomes a partial entry before run_interrupted ---------------
async def test_sigterm_mid_answer_leaves_the_streamed_text_as_a_partial_entry_then_the_retry_completes(
    tmp_path: Path, http: aiohttp.ClientSession, servers: list[ServerProcess]
) -> None:
    server = await serve(servers, tmp_path / "t", *FAST)  # grace_s 0.5: the run does not finish in time
    before = await ws_reader(http, server, "session_id=t1")
    try:
        await before.ws.send_json({"type": "TextMessage", "content": LONG, "client_msg_id": "m1"})
        await before.wait(at_least_chunks(MID_ANSWER_CHUNKS))
        assert await asyncio.to_thread(server.stop) == 0
        await before.wait(lambda _: before.ended)
    finally:
        await before.close()
    [message_id] = {f["full_message_id"] for f in chunks(before.frames)}
    streamed = streamed_text(before.frames, message_id)

    await asyncio.to_thread(server.restart)
    after = await ws_reader(http, server, "session_id=t1&after=0")
    try:
        await after.wait(count("run_completed"))
    finally:
        await after.close()
    log = await read_log(http, server, "t1")

    assert durable(after.frames) == log
    assert [(e["type"], e["source"]) for e in log] == [
        ("TextMessage", "user"),
        ("run_started", "system"),
        ("TextMessage", "assistant"),
        ("run_interrupted", "system"),
        ("run_started", "system"),
        ("TextMessage", "assistant"),
        ("run_completed", "system"),
    ]
    cut, retried = assistant_texts(log)
    assert cut["metadata"]["id"] == message_id
    assert cut["metadata"]["partial"] is True and cut["metadata"]["partial_reason"] == "interrupted"
    # Streams end first (close 1001), then the run gets grace_s and is put back: the partial entry holds what
    # the reader saw and what was streamed during the grace period (never less), a cut of the answer.
    assert durable(before.frames) == log[: len(durable(before.frames))]
    assert cut["content"].startswith(streamed) and LONG_ANSWER.startswith(cut["content"])
    assert cut["content"] != LONG_ANSWER
    assert retried["content"] == LONG_ANSWER
