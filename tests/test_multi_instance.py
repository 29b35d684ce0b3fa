"""Several real service processes on one PostgreSQL database, and PostgreSQL itself going away mid-run.

Which instance runs an input is up to the claim race, so the tests ask the database (``inputs.worker_id`` of the
run) and match it with the ``worker pool <id> started`` line each process logs.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from tests.server import ServerProcess, start_server
from tests.web import durable

pytestmark = pytest.mark.slow

FAST = ("--lease-s", "2", "--heartbeat-s", "0.5", "--poll-interval-s", "0.2", "--grace-s", "0.5")
PG_VERSION = "15"
WAIT_S = 40.0  # bound on any single wait for an event (a hang guard, never a performance assertion)

Frame = dict[str, Any]
Predicate = Callable[[list[Frame]], bool]


# --- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture
def servers(tmp_path: Path, pg_url: str) -> Iterator[Callable[..., ServerProcess]]:
    """start(name, *args) -> a server process on the test's database; every one is killed at the end."""
    started: list[ServerProcess] = []

    def start(name: str, *args: str) -> ServerProcess:
        home = tmp_path / name
        home.mkdir(exist_ok=True)
        server = start_server(home, "--database", pg_url, *args)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.kill()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# --- helpers --------------------------------------------------------------------------------------------------
async def start_both(start: Callable[..., ServerProcess], *args: str) -> tuple[ServerProcess, ServerProcess]:
    """Two instances starting at once (their migrations race on the advisory lock)."""
    a, b = await asyncio.gather(asyncio.to_thread(start, "a", *args), asyncio.to_thread(start, "b", *args))
    return a, b


def count(frames: list[Frame], kind: str) -> int:
    return sum(1 for f in frames if f.get("type") == kind)


def replies(entries: list[Frame]) -> list[str]:
    return [e["content"] for e in entries if e["type"] == "TextMessage" and e["source"] == "assistant"]


def assert_contiguous(entries: list[Frame]) -> None:
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))


async def sse_until(
    http: aiohttp.ClientSession, server: ServerProcess, session: str, done: Predicate
) -> list[Frame]:
    """Durable entries from ``GET /events?after=0`` until ``done(entries so far)``."""
    entries: list[Frame] = []
    async with (
        asyncio.timeout(WAIT_S),
        http.get(f"{server.url}/sessions/{session}/events?after=0") as response,
    ):
        assert response.status == 200
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            frame = orjson.loads(line[6:])
            if frame.get("seq") is not None:
                entries.append(frame)
                if done(entries):
                    return entries
    raise AssertionError(f"the event stream ended early: {entries[-5:]}")


async def post_message(
    http: aiohttp.ClientSession, server: ServerProcess, session: str, content: str, msg_id: str
) -> tuple[int, Frame]:
    body = {"content": content, "client_msg_id": msg_id}
    async with http.post(f"{server.url}/sessions/{session}/messages", json=body) as response:
        answer: Frame = await response.json()
        return response.status, answer


async def read_log(http: aiohttp.ClientSession, server: ServerProcess, session: str) -> list[Frame]:
    async with http.get(f"{server.url}/sessions/{session}/messages?limit=1000") as response:
        assert response.status == 200
        page: Frame = await response.json()
        assert not page["has_more"]
        messages: list[Frame] = page["messages"]
        return messages


async def runner_of(pg_url: str, run_id: str, candidates: list[ServerProcess]) -> ServerProcess:
    """The process whose worker pool claimed ``run_id``."""
    conn = await asyncpg.connect(pg_url)
    try:
        worker_id = await conn.fetchval("SELECT worker_id FROM inputs WHERE run_id = $1", run_id)
    finally:
        await conn.close()
    found = [s for s in candidates if f"worker pool {worker_id} started" in s.output()]
    assert len(found) == 1, (worker_id, [s.output()[-500:] for s in candidates])
    return found[0]


async def first_run(http: aiohttp.ClientSession, server: ServerProcess, session: str) -> Frame:
    entries = await sse_until(http, server, session, lambda es: count(es, "run_started") == 1)
    return entries[-1]


class WsClient:
    """A WebSocket client whose frames are collected in the background, so waits never miss a frame."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[Frame] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                self.frames.append(orjson.loads(message.data))
                self._changed.set()
        self._changed.set()

    async def wait(self, done: Predicate) -> None:
        async with asyncio.timeout(WAIT_S):
            while not done(self.frames):
                assert not self._task.done(), f"the WebSocket closed: {self.frames[-5:]}"
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        await self.ws.close()
        await self._task


def acked(msg_id: str) -> Predicate:
    return lambda frames: any(f.get("type") == "ack" and f.get("client_msg_id") == msg_id for f in frames)


# --- 1. two instances, one session, a client on each ----------------------------------------------------------
async def test_clients_on_two_instances_see_one_gapless_log_and_inputs_run_once_in_order(
    servers: Callable[..., ServerProcess], http: aiohttp.ClientSession, pg_url: str
) -> None:
    a, b = await start_both(servers, *FAST)
    async with http.post(f"{a.url}/sessions", json={"session_id": "shared"}) as response:
        assert response.status == 201
    turns = 6
    clients = []
    for server, client_id in ((a, "on-a"), (b, "on-b")):
        ws = await http.ws_connect(f"{server.ws_url}?session_id=shared&client_id={client_id}")
        clients.append(WsClient(ws))
    try:
        for i in range(turns):
            # Alternate instances; each message is acknowledged (committed) before the next is sent, so the
            # log order is the sending order while runs of earlier turns go on on either instance.
            client = clients[i % 2]
            await client.ws.send_json(
                {"type": "TextMessage", "content": f"turn {i}", "client_msg_id": f"m{i}"}
            )
            await client.wait(acked(f"m{i}"))
        for client in clients:
            await client.wait(lambda frames: count(durable(frames), "run_completed") == turns)
        # The cursor a client acknowledged on A is where it resumes on B (frames are handled in order: the pong
        # means the ack was stored).
        await clients[0].ws.send_json({"type": "ack", "seq": 5})
        await clients[0].ws.send_json({"type": "ping"})
        await clients[0].wait(lambda frames: frames[-1].get("type") == "pong")
        async with http.ws_connect(f"{b.ws_url}?session_id=shared&client_id=on-a") as again:
            hello = await again.receive_json()
            assert hello["replay_from"] == 5
            assert (await again.receive_json())["seq"] == 6
    finally:
        for client in clients:
            await client.close()

    log = await read_log(http, b, "shared")
    assert_contiguous(log)
    for client in clients:
        seen = durable(client.frames)
        assert [e["seq"] for e in seen] == list(
            range(1, len(log) + 1)
        )  # no gap, no duplicate, nothing missed
        assert seen == log  # the same entries, whichever instance wrote them
    users = [e for e in log if e["source"] == "user"]
    assert [u["client_msg_id"] for u in users] == [f"m{i}" for i in range(turns)]
    started = [e for e in log if e["type"] == "run_started"]
    assert [s["input_seq"] for s in started] == [u["seq"] for u in users]  # each input once, in order
    assert all(s["attempt"] == 1 for s in started)
    texts = replies(log)
    assert len(texts) == turns
    for i, text in enumerate(texts):
        assert f"turn {i}" in text and text.endswith(f"[context: {i + 1}]")
    for run in started:  # every run was claimed by one of the two instances
        await runner_of(pg_url, run["run_id"], [a, b])


# --- 2. SIGKILL the instance running an input: the other one finishes it ---------------------------------------
async def test_sigkill_of_the_running_instance_the_other_finishes_the_input_once(
    servers: Callable[..., ServerProcess], http: aiohttp.ClientSession, pg_url: str
) -> None:
    a, b = await start_both(servers, *FAST)
    status, _ = await post_message(http, a, "k1", "[[sleep:3]] survive me", "m1")
    assert status == 202
    run = await first_run(http, a, "k1")
    victim = await runner_of(pg_url, run["run_id"], [a, b])
    survivor = b if victim is a else a
    victim.kill()

    # The lease (2 s) expires without heartbeats; the survivor's recovery re-queues the input and runs it.
    log = await sse_until(http, survivor, "k1", lambda es: count(es, "run_completed") == 1)
    assert_contiguous(log)
    assert [e["type"] for e in log if e["type"].startswith("run_")] == [
        "run_started",
        "run_interrupted",
        "run_started",
        "run_completed",
    ]
    assert [e["attempt"] for e in log if e["type"] == "run_started"] == [1, 2]
    [text] = replies(log)
    assert "survive me" in text and text.endswith("[context: 1]")
    assert log == await read_log(http, survivor, "k1")  # nothing more was written after the completion


# --- 3. a cancel asked on one instance stops the run on the other ---------------------------------------------
async def test_cancel_on_one_instance_stops_the_run_on_the_other(
    servers: Callable[..., ServerProcess], http: aiohttp.ClientSession, pg_url: str
) -> None:
    a, b = await start_both(servers, *FAST)
    status, _ = await post_message(http, a, "c1", "[[sleep:30]] never finishes", "m1")
    assert status == 202
    run = await first_run(http, a, "c1")
    runner = await runner_of(pg_url, run["run_id"], [a, b])
    other = b if runner is a else a
    async with http.post(f"{other.url}/sessions/c1/cancel") as response:
        assert response.status == 202

    # Bounded by WAIT_S (well under the 30 s sleep) and the test timeout: no timing assertion.
    log = await sse_until(http, other, "c1", lambda es: count(es, "run_cancelled") == 1)
    assert [e["type"] for e in log if e["type"].startswith("run_")] == ["run_started", "run_cancelled"]
    assert replies(log) == []
    status, _ = await post_message(http, other, "c1", "still here?", "m2")
    assert status == 202
    log = await sse_until(http, runner, "c1", lambda es: count(es, "run_completed") == 1)
    [text] = replies(log)
    assert "still here?" in text
    assert_contiguous(log)


async def test_cancels_asked_back_to_back_on_one_instance_all_stop_their_runs_on_the_other(
    servers: Callable[..., ServerProcess], http: aiohttp.ClientSession, pg_url: str
) -> None:
    """Four cancels sent at once to the instance that does not run them: each wakes the other instance (NOTIFY),
    including those that arrive while it is still checking the first one. The heartbeat (the only other moment
    a run looks for a cancel) is 60 s, longer than the runs' 30 s and than any wait here, so a wake-up lost
    during a check leaves its run to complete instead."""
    slow_beat = ("--lease-s", "120", "--heartbeat-s", "60", "--poll-interval-s", "0.2", "--grace-s", "0.5")
    a, b = await start_both(servers, *slow_beat)
    sessions = [f"q{n}" for n in range(4)]
    for sid in sessions:
        status, _ = await post_message(http, a, sid, "[[sleep:30]] never finishes", f"{sid}-m1")
        assert status == 202
    others = {}
    for sid in sessions:
        run = await first_run(http, a, sid)
        runner = await runner_of(pg_url, run["run_id"], [a, b])
        others[sid] = b if runner is a else a

    async def cancel(sid: str) -> None:
        async with http.post(f"{others[sid].url}/sessions/{sid}/cancel") as response:
            assert response.status == 202

    await asyncio.gather(*(cancel(sid) for sid in sessions))
    for sid in sessions:  # bounded by WAIT_S (40 s)
        log = await sse_until(http, others[sid], sid, lambda es: count(es, "run_cancelled") == 1)
        assert [e["type"] for e in log if e["type"].startswith("run_")] == ["run_started", "run_cancelled"]


# --- 4. PostgreSQL restarted while a run is in progress -------------------------------------------------------
def _pg(action: str) -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", "-m", "fast", PG_VERSION, "main", action],
        check=True,
        capture_output=True,
        timeout=60,
    )


def _pg_ready() -> bool:
    return subprocess.run(["pg_isready", "-h", "127.0.0.1", "-q"], check=False, timeout=10).returncode == 0


def _ensure_pg_running() -> None:
    """PostgreSQL is shared by the whole machine: whatever happened, leave it up."""
    if not _pg_ready():
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", PG_VERSION, "main", "start"],
            check=False,
            capture_output=True,
            timeout=60,
        )
    deadline = time.monotonic() + 30
    while not _pg_ready() and time.monotonic() < deadline:
        time.sleep(0.2)


async def readyz_becomes(http: aiohttp.ClientSession, server: ServerProcess, status: int) -> None:
    """Poll /readyz until it answers ``status`` (a state change has no event to wait on)."""
    async with asyncio.timeout(WAIT_S):
        while True:
            try:
                async with http.get(f"{server.url}/readyz") as response:
                    if response.status == status:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)


async def output_shows(server: ServerProcess, text: str) -> None:
    """Poll the process's log until it shows ``text`` (the only sign of a write failing while PostgreSQL is
    down: nothing durable can be written then)."""
    async with asyncio.timeout(WAIT_S):
        # The output is filled by ServerProcess's reader thread, which offers nothing to await.
        while text not in server.output():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


@pytest.mark.skipif(shutil.which("pg_ctlcluster") is None, reason="needs pg_ctlcluster (a local PostgreSQL)")
async def test_postgres_restart_mid_run_503_while_down_then_recovers_by_itself(
    servers: Callable[..., ServerProcess], http: aiohttp.ClientSession
) -> None:
    server = servers("s", *FAST)
    status, _ = await post_message(http, server, "p1", "[[sleep:2]] before the restart", "m1")
    assert status == 202
    await first_run(http, server, "p1")
    # A client connected through the outage: it must miss nothing.
    watcher = WsClient(await http.ws_connect(f"{server.ws_url}?session_id=p1"))
    await watcher.wait(lambda frames: count(durable(frames), "run_started") == 1)
    try:
        await asyncio.to_thread(_pg, "stop")
        await readyz_becomes(http, server, 503)
        status, body = await post_message(http, server, "p1", "while down", "m-down")
        assert status == 503 and body["error"]["code"] == "unavailable"  # nothing acknowledged
        # Keep the database down until the run's next write (its reply, after the 2 s sleep) has failed.
        await output_shows(server, "crashed (its lease will expire")
        await asyncio.to_thread(_pg, "start")
    finally:
        await asyncio.to_thread(_ensure_pg_running)

    await readyz_becomes(http, server, 200)  # by itself: the pool and the listener reconnect
    status, _ = await post_message(http, server, "p1", "after the restart", "m2")
    assert status == 202
    log = await sse_until(http, server, "p1", lambda es: count(es, "run_completed") == 2)
    await watcher.wait(lambda frames: count(durable(frames), "run_completed") == 2)
    await watcher.close()
    assert durable(watcher.frames) == log
    assert_contiguous(log)
    assert [e["client_msg_id"] for e in log if e["source"] == "user"] == ["m1", "m2"]
    # The lost run's lease expired; recovery re-queued the input and its second attempt answered, once.
    assert [(e["type"], e.get("attempt")) for e in log if e["type"].startswith("run_")] == [
        ("run_started", 1),
        ("run_interrupted", 1),
        ("run_started", 2),
        ("run_completed", 2),
        ("run_started", 1),
        ("run_completed", 1),
    ]
    texts = replies(log)
    assert len(texts) == 2
    assert "before the restart" in texts[0] and "after the restart" in texts[1]
    assert texts[1].endswith("[context: 2]")
