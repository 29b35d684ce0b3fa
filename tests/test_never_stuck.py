"""Issue 10, "No session is ever stuck": every acknowledged input reaches exactly one terminal entry
(run_completed, run_cancelled, or run_failed with retrying false) in bounded time, and the session then takes its
next message; for every team that loads. One test (or a few) per fault kind, in-process, with the real WorkerPool
on real stores.

How each test failed on the base (commit 9a5a669, before the fix):
* kind 1, test_a_failing_answer_is_given_again_to_every_retry (memory, sqlite, postgresql): attempts [1, 2], not
  [1, 2, 3]: attempt 2 asked again and waited forever (the answer was used up); the session stayed awaiting_input.
* kind 1, test_an_answer_taken_by_an_interrupted_attempt_is_given_again (all 3): no terminal entry for the [[ask]]
  input: attempt 2 asked again and waited forever.
* kind 2, test_cancel_while_a_tool_runs_ends_the_run, test_shutdown_while_a_tool_runs_returns,
  test_state_saved_after_a_cancel_mid_tool_is_valid_for_a_real_provider: TypeError, WorkerPool has no
  stop_timeout_s (without it, run_stream never returns after the cancel: no run_cancelled, stop() hangs).
* kind 3, test_cancel_ends_a_pending_retry (all 3): request_cancel answered False. Over WebSocket
  (test_cancel_of_a_pending_retry_over_http_and_websocket): no run_cancelled frame within the 20 s guard.
* kind 4, test_every_run_starts_a_fresh_round_of_max_turns: the next run stopped after 2 replies, not 4.
* kind 5, test_swarm_resumes_after_handing_off_to_the_user: the next message failed with "The existing handoff
  target user is not one of the participants ['alice']" (retrying). test_team_shapes_...[graph]: the message after
  the cancel completed with no reply at all (GraphFlow saved its ready queue empty mid-node); the other shapes
  passed on the base (they guard against regressions).
* kind 6, test_sessions_survive_a_changed_team: "Agent state for helper not found in the saved state." /
  "Agent state for SelectorGroupChatManager not found in the saved state." (retrying).
  test_reset_team_state_in_the_store: AttributeError (no reset_team_state). test_reset_clears_a_state_that_cannot_load:
  the unloadable state failed with retrying true (a permanent error was retried) and there was no /reset.
* kind 8, test_a_shipped_team_file_behaves_as_built: the loaded default.json ended the [context: 3] run on the
  user's own message with no reply; the Python-built team answered.
* stall, test_a_run_that_makes_no_progress_is_stopped, test_a_run_waiting_for_a_human_is_not_a_stall: TypeError,
  WorkerPool has no stall_timeout_s.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from service import keys
from service.app import create_app
from service.errors import Conflict
from service.hub import Hub, Subscription
from service.models import RUN_COMPLETED, Entry, NewEntry, SessionStatus, lifecycle
from service.queue import Store, open_store
from service.queue.retry import RetryPolicy
from service.worker.pool import WorkerPool
from service.worker.teams import DEFAULT_TEAM_FILE, TeamBuilder, TeamRegistry, default_team
from tests import teams_for_tests as tt
from tests.conftest import FakeClock, backend_url
from tests.web import make_config, receive_until, run_until_idle

OWNER = "local"
GUARD_S = 20.0  # a test guard only: the bound within which something must have happened
RETRY = RetryPolicy(max_attempts=3, base_delay_s=5.0, max_delay_s=60.0)
TERMINAL = ("run_completed", "run_cancelled", "run_failed")
SHIPPED_TEAMS = sorted(DEFAULT_TEAM_FILE.parent.glob("*.json"))

Client = TestClient[Any, web.Application]
MakeClient = Callable[..., Awaitable[Client]]

TEAMS: dict[str, TeamBuilder] = tt.TEAM_SHAPES


# --- the world: a store on a fake clock, a hub, the test teams ---------------------------------------------------
class World:
    def __init__(self, url: str, clock: FakeClock) -> None:
        self.url, self.clock = url, clock
        self.hub = Hub()
        self.teams = TeamRegistry(TEAMS)
        self.store: Store = open_store(url, clock=clock, db_clock_offset=clock.db_offset)
        self.pools: list[WorkerPool] = []

    def use_teams(self, **builders: TeamBuilder) -> None:
        """The configured teams change (a new deployment): pools made from now on build these."""
        self.teams = TeamRegistry({**TEAMS, **builders})

    def pool(self, **options: Any) -> WorkerPool:
        options.setdefault("retry", RETRY)
        pool = WorkerPool(self.store, self.hub, self.teams, clock=self.clock, **options)
        self.pools.append(pool)
        return pool

    async def send(self, session_id: str, text: str, team: str = "default") -> int:
        """Enqueue a user message (acknowledged once this returns, like a 202); its seq."""
        queued = await self.store.enqueue(OWNER, session_id, text, None, team=team)
        if queued.entry is not None:
            self.hub.publish(session_id, [queued.entry])  # as the web layer does: the doorbell
        return queued.seq

    async def log(self, session_id: str) -> list[Entry]:
        return (await self.store.read_log(session_id, after=0, limit=1000)).messages

    async def status(self, session_id: str) -> SessionStatus:
        session = await self.store.get_session(OWNER, session_id)
        assert session is not None
        return session.status

    async def cancel(self, pool: WorkerPool, session_id: str) -> None:
        """What POST /sessions/{id}/cancel does: through the store (any process), and here at once."""
        await self.store.request_cancel(OWNER, session_id)
        pool.cancel(session_id)


@asynccontextmanager
async def open_world(backend: str, tmp_path: Path, clock: FakeClock) -> AsyncIterator[World]:
    with backend_url(backend, tmp_path) as url:
        world = World(url, clock)
        await world.store.open()
        try:
            yield world
        finally:
            try:
                for pool in world.pools:  # a run still waiting (a failed test) must not outlive its store
                    await asyncio.wait_for(pool.stop(), GUARD_S)
            finally:
                await world.store.close()


@pytest.fixture(params=["memory", "sqlite"])
async def world(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> AsyncIterator[World]:
    async with open_world(request.param, tmp_path, clock) as w:
        yield w


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def any_world(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> AsyncIterator[World]:
    """Also PostgreSQL, for the kinds that live in the store's queue rules (its own SQL)."""
    async with open_world(request.param, tmp_path, clock) as w:
        yield w


# --- reading the log -----------------------------------------------------------------------------------------------
def is_terminal(e: Entry) -> bool:
    return e.type in TERMINAL and not (e.type == "run_failed" and e.metadata.get("retrying"))


def terminals(log: list[Entry], input_seq: int) -> list[Entry]:
    return [e for e in log if is_terminal(e) and e.metadata.get("input_seq") == input_seq]


def starts(log: list[Entry], input_seq: int) -> list[Entry]:
    return [e for e in log if e.type == "run_started" and e.metadata.get("input_seq") == input_seq]


def failures(log: list[Entry], input_seq: int) -> list[Entry]:
    return [e for e in log if e.type == "run_failed" and e.metadata.get("input_seq") == input_seq]


def replies(log: list[Entry], run_id: str | None = None) -> list[str]:
    """What the agents said (any agent; not the user, not the service)."""
    return [
        e.content
        for e in log
        if e.type == "TextMessage"
        and e.source not in ("user", "system")
        and (run_id is None or e.run_id == run_id)
    ]


def the_terminal(log: list[Entry], input_seq: int) -> Entry:
    found = terminals(log, input_seq)
    failed = [e.metadata.get("error") for e in failures(log, input_seq)]
    assert len(found) == 1, (
        f"input {input_seq}: terminals {[(e.type, e.metadata) for e in found]}, failures {failed}"
    )
    return found[0]


def assert_every_input_ended(log: list[Entry], answers: frozenset[int] = frozenset()) -> None:
    """The invariant: every user message that is not an answer to a question is an input with exactly one
    terminal entry, and no run writes anything after its terminal entry."""
    inputs = [e.seq for e in log if e.type == "TextMessage" and e.source == "user" and e.seq not in answers]
    for seq in inputs:
        the_terminal(log, seq)
    ended: set[str] = set()
    for e in log:
        assert e.run_id is None or e.run_id not in ended, f"entry {e.seq} ({e.type}) after its run's end"
        if is_terminal(e) and e.run_id is not None:
            ended.add(e.run_id)


def assert_nothing_left_to_the_garbage_collector() -> None:
    """An abandoned team must not leave its pending tasks to the garbage collector: asyncio holds tasks weakly,
    so AutoGen's runtime tasks would be destroyed mid-flight ("Task was destroyed but it is pending!", and
    exceptions ignored in its coroutines, which pytest turns into errors). It happens at the next collection
    anyway; collect now, so the test sees it every time instead of now and then."""
    gc.collect()


def cancel_accepted(answer: object) -> bool:
    """``request_cancel``'s answer: True, or an object saying it cancelled something."""
    return answer is True or getattr(answer, "cancelled", None) is True


async def next_entry(sub: Subscription, match: Callable[[Entry], bool]) -> Entry:
    while True:
        item = await sub.queue.get()
        if isinstance(item, Entry) and match(item):
            return item


async def wait_entry(sub: Subscription, match: Callable[[Entry], bool]) -> Entry:
    return await asyncio.wait_for(next_entry(sub, match), GUARD_S)


def of_type(type_: str) -> Callable[[Entry], bool]:
    return lambda e: e.type == type_


def ends(input_seq: int) -> Callable[[Entry], bool]:
    return lambda e: is_terminal(e) and e.metadata.get("input_seq") == input_seq


async def wait_status(world: World, session_id: str, status: SessionStatus) -> None:
    """Poll the store until the session has ``status`` (no event says "the answer was taken")."""

    async def poll() -> None:
        while await world.status(session_id) is not status:  # noqa: ASYNC110 (the store has no event for it)
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), GUARD_S)


# === 1. answers belong to their run ===============================================================================
async def test_a_failing_answer_is_given_again_to_every_retry(any_world: World) -> None:
    w = any_world
    pool = w.pool()
    ask = await w.send("s1", "[[ask]] plan a trip")
    await pool.run_until_idle()
    assert (await w.log("s1"))[-1].type == "UserInputRequestedEvent"
    answer = await w.send("s1", "[[fail]] the answer is 42")
    await pool.run_until_idle()  # attempt 1 takes the answer and fails
    for backoff in (5, 10):
        w.clock.advance(backoff)
        await pool.run_until_idle()
    log = await w.log("s1")
    assert [e.metadata["attempt"] for e in starts(log, ask)] == [1, 2, 3]
    assert [e.metadata["retrying"] for e in failures(log, ask)] == [True, True, False]
    # Every retry asked again and got the same answer without the user sending it again.
    assert [e.type for e in log].count("UserInputRequestedEvent") == 3
    assert [e.seq for e in log if e.source == "user" and e.type == "TextMessage"] == [ask, answer]
    assert all("DemoModelError" in e.metadata["error"] for e in failures(log, ask))
    assert await w.status("s1") is SessionStatus.FAILED
    nxt = await w.send("s1", "hello again")
    await pool.run_until_idle()
    log = await w.log("s1")
    assert the_terminal(log, nxt).type == "run_completed"
    assert_every_input_ended(log, answers=frozenset({answer}))
    assert await w.status("s1") is SessionStatus.IDLE


async def test_an_answer_taken_by_an_interrupted_attempt_is_given_again(any_world: World) -> None:
    w = any_world
    pool = w.pool(grace_s=0.05)
    await pool.start()
    with w.hub.subscribe("s1") as sub:
        ask = await w.send("s1", "[[ask]] plan a trip")
        await wait_entry(sub, of_type("UserInputRequestedEvent"))
        # The model takes a second over this answer: the service shuts down meanwhile.
        answer = await w.send("s1", "[[sleep:1]] the answer is 42")
        await wait_status(w, "s1", SessionStatus.RUNNING)  # the answer was taken
        await asyncio.wait_for(pool.stop(), GUARD_S)
    log = await w.log("s1")
    assert [e.type for e in log][-1] == "run_interrupted"
    pool2 = w.pool()
    await asyncio.wait_for(pool2.run_until_idle(), GUARD_S)
    log = await w.log("s1")
    assert [e.metadata["attempt"] for e in starts(log, ask)] == [1, 2]
    done = the_terminal(log, ask)
    assert done.type == "run_completed"
    assert replies(log, done.run_id)[-1] == "You said: [[sleep:1]] the answer is 42 [context: 2]"
    assert [e.seq for e in log if e.source == "user" and e.type == "TextMessage"] == [ask, answer]
    assert_every_input_ended(log, answers=frozenset({answer}))
    assert await w.status("s1") is SessionStatus.IDLE


# === 2. cancel (or shutdown) while a tool executes ==============================================================
async def test_cancel_while_a_tool_runs_ends_the_run(world: World) -> None:
    pool = world.pool(stop_timeout_s=1.0, heartbeat_s=0.05)
    await pool.start()
    with world.hub.subscribe("s1") as sub:
        slow = await world.send("s1", "[[tool:slow:8]] please", team="slow")
        await wait_entry(sub, of_type("ToolCallRequestEvent"))
        await world.cancel(pool, "s1")
        cancelled = await wait_entry(sub, ends(slow))
        assert cancelled.type == "run_cancelled"
        after = await world.send("s1", "after", team="slow")
        done = await wait_entry(sub, ends(after))
    assert_nothing_left_to_the_garbage_collector()
    assert done.type == "run_completed"
    log = await world.log("s1")
    # The cancelled message is remembered (the state saved with run_cancelled loads).
    assert replies(log, done.run_id) == ["You said: after [context: 2]"]
    assert_every_input_ended(log)
    assert await world.status("s1") is SessionStatus.IDLE


async def test_shutdown_while_a_tool_runs_returns(world: World) -> None:
    pool = world.pool(stop_timeout_s=1.0, grace_s=0.05)
    await pool.start()
    with world.hub.subscribe("s1") as sub:
        slow = await world.send("s1", "[[tool:slow:8]] please", team="slow")
        await wait_entry(sub, of_type("ToolCallRequestEvent"))
        await asyncio.wait_for(pool.stop(), GUARD_S)
    assert_nothing_left_to_the_garbage_collector()
    log = await world.log("s1")
    assert [(e.type, e.metadata.get("input_seq")) for e in log][-1] == ("run_interrupted", slow)
    assert pool.running_count() == 0
    assert await world.status("s1") is SessionStatus.QUEUED  # back in the queue for the next start


class StrictOpenAI:
    """An OpenAI-compatible /v1/chat/completions that refuses (HTTP 400, as OpenAI does) a message list in which
    an assistant message's tool calls are not followed by a tool message for each call id, or a tool message
    answers no call. Scripted: a user message with ``[[tool]]`` gets a call to the ``slow`` tool (8 s)."""

    def __init__(self) -> None:
        self.requests: list[list[dict[str, Any]]] = []
        self.refused: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completions)
        return app

    async def completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        messages: list[dict[str, Any]] = body["messages"]
        self.requests.append(messages)
        problem = invalid_tool_sequence(messages)
        if problem is not None:
            self.refused.append(problem)
            error = {"message": problem, "type": "invalid_request_error", "param": "messages", "code": None}
            return web.json_response({"error": error}, status=400)
        last = messages[-1]
        if body.get("tools") and last["role"] == "user" and "[[tool]]" in str(last["content"]):
            call = {
                "id": "call_slow_1",
                "type": "function",
                "function": {"name": "slow", "arguments": '{"expression": "8"}'},
            }
            message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [call]}
            finish = "tool_calls"
        else:
            text = (
                f"The tool said {last['content']}." if last["role"] == "tool" else f"Echo: {last['content']}"
            )
            message, finish = {"role": "assistant", "content": text}, "stop"
        choice = {"index": 0, "message": message, "finish_reason": finish}
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": "fake",
                "choices": [choice],
                "usage": usage,
            }
        )


def invalid_tool_sequence(messages: list[dict[str, Any]]) -> str | None:
    """OpenAI's rule, checked the way its API does."""
    expected: list[str] = []  # call ids still to be answered, right after their assistant message
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "tool":
            if m.get("tool_call_id") not in expected:
                return f"messages[{i}]: a 'tool' message must answer a preceding message with 'tool_calls'"
            expected.remove(m["tool_call_id"])
            continue
        if expected:
            return f"messages[{i}]: tool_calls {expected} have no response messages"
        if role == "assistant":
            expected = [c["id"] for c in m.get("tool_calls") or []]
    if expected:
        return f"the last message's tool_calls {expected} have no response messages"
    return None


@pytest.fixture
async def strict_openai() -> AsyncIterator[tuple[StrictOpenAI, str]]:
    fake = StrictOpenAI()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield fake, f"http://127.0.0.1:{server.port}/v1"
    finally:
        await server.close()


async def test_state_saved_after_a_cancel_mid_tool_is_valid_for_a_real_provider(
    world: World, strict_openai: tuple[StrictOpenAI, str]
) -> None:
    fake, base_url = strict_openai
    world.use_teams(gpt=partial(tt.openai_slow_tool_team, base_url))
    pool = world.pool(stop_timeout_s=1.0, heartbeat_s=0.05, retry=RetryPolicy(max_attempts=1))
    await pool.start()
    with world.hub.subscribe("s1") as sub:
        first = await world.send("s1", "[[tool]] take a nap", team="gpt")
        await wait_entry(sub, of_type("ToolCallRequestEvent"))
        await world.cancel(pool, "s1")
        assert (await wait_entry(sub, ends(first))).type == "run_cancelled"
        after = await world.send("s1", "hello", team="gpt")
        done = await wait_entry(sub, ends(after))
    assert_nothing_left_to_the_garbage_collector()
    log = await world.log("s1")
    assert fake.refused == []
    assert done.type == "run_completed", done.metadata
    assert replies(log, done.run_id) == ["Echo: hello"]
    assert fake.requests[-1][-1] == {"role": "user", "name": "user", "content": "hello"}
    assert_every_input_ended(log)


# === 3. cancel while a failed run waits for its retry ===========================================================
async def test_cancel_ends_a_pending_retry(any_world: World) -> None:
    w = any_world
    pool = w.pool(retry=RetryPolicy(max_attempts=3, base_delay_s=60.0))
    boom = await w.send("s1", "[[fail]] boom")
    await pool.run_until_idle()
    assert [e.metadata["retrying"] for e in failures(await w.log("s1"), boom)] == [True]
    assert cancel_accepted(await w.store.request_cancel(OWNER, "s1"))
    log = await w.log("s1")
    cancelled = the_terminal(log, boom)
    assert cancelled.type == "run_cancelled" and cancelled.metadata["input_seq"] == boom
    assert await w.status("s1") is SessionStatus.IDLE
    w.clock.advance(3600)  # long past the backoff: nothing more is spent on it
    await pool.run_until_idle()
    assert len(starts(await w.log("s1"), boom)) == 1
    nxt = await w.send("s1", "next")
    await pool.run_until_idle()
    log = await w.log("s1")
    assert the_terminal(log, nxt).type == "run_completed"
    assert len(starts(log, boom)) == 1
    assert_every_input_ended(log)


@pytest.fixture(params=["memory", "sqlite"])
def app_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with backend_url(request.param, tmp_path) as url:
        yield url


async def test_cancel_of_a_pending_retry_over_http_and_websocket(
    app_url: str, aiohttp_client: MakeClient
) -> None:
    config = make_config(app_url, retry_base_delay_s=60.0, retry_max_delay_s=60.0)
    client = await aiohttp_client(create_app(config, start_workers=False))
    # WebSocket: the cancel frame ends the pending retry, and the client sees run_cancelled live.
    ws = await client.ws_connect("/ws/chat/queue?session_id=w1")
    await ws.receive_json()
    await ws.send_json({"type": "TextMessage", "content": "[[fail]] boom"})
    await asyncio.wait_for(receive_until(ws, lambda f: f.get("type") == "ack"), GUARD_S)
    await run_until_idle(client)
    await asyncio.wait_for(receive_until(ws, lambda f: f.get("type") == "run_failed"), GUARD_S)
    await ws.send_json({"type": "cancel"})
    frames = await asyncio.wait_for(receive_until(ws, lambda f: f.get("type") == "run_cancelled"), GUARD_S)
    assert frames[-1]["input_seq"] == 1
    await ws.close()
    # HTTP: {"cancelled": true}, and the session takes its next message.
    await client.post("/sessions/h1/messages", json={"content": "[[fail]] boom"})
    await run_until_idle(client)
    response = await client.post("/sessions/h1/cancel")
    assert response.status == 202 and await response.json() == {"cancelled": True}
    nxt = (await (await client.post("/sessions/h1/messages", json={"content": "next"})).json())["seq"]
    await run_until_idle(client)
    page = await (await client.get("/sessions/h1/messages?limit=1000")).json()
    types = [(e["type"], e.get("input_seq")) for e in page["messages"] if e["source"] == "system"]
    assert types == [
        ("run_started", 1),
        ("run_failed", 1),
        ("run_cancelled", 1),
        ("run_started", nxt),
        ("run_completed", nxt),
    ]
    assert (await (await client.get("/sessions/h1")).json())["status"] == "idle"


# === 4. a cancelled run leaves the team's turn counter behind ===================================================
async def test_every_run_starts_a_fresh_round_of_max_turns(world: World) -> None:
    tt.HOLDING.reset()
    pool = world.pool()
    await pool.start()
    with world.hub.subscribe("s1") as sub:
        held = await world.send("s1", f"{tt.HOLD} go", team="turns")
        for _ in range(2):  # two turns done; the third (the assistant again) holds
            await wait_entry(sub, lambda e: e.type == "TextMessage" and e.source != "user")
        await asyncio.wait_for(tt.HOLDING.wait(), GUARD_S)
        await world.cancel(pool, "s1")
        assert (await wait_entry(sub, ends(held))).type == "run_cancelled"
        again = await world.send("s1", "again", team="turns")
        done = await wait_entry(sub, ends(again))
    assert done.type == "run_completed"
    log = await world.log("s1")
    assert len(replies(log, done.run_id)) == 4, replies(log, done.run_id)
    assert_every_input_ended(log)


# === 5. Swarm handing off to the user, and the other team shapes ================================================
async def test_swarm_resumes_after_handing_off_to_the_user(world: World) -> None:
    pool = world.pool()
    first = await world.send("s1", "[[tool:transfer_to_user:x]] book a trip", team="swarm")
    await pool.run_until_idle()
    log = await world.log("s1")
    assert the_terminal(log, first).type == "run_completed"
    [handoff] = [e for e in log if e.type == "HandoffMessage"]
    assert handoff.source == "alice" and handoff.metadata["target"] == "user"
    second = await world.send("s1", "to Rome", team="swarm")
    await pool.run_until_idle()
    log = await world.log("s1")
    done = the_terminal(log, second)
    assert done.type == "run_completed", done.metadata
    assert failures(log, second) == []
    assert (
        replies(log, done.run_id)[-1] == "You said: to Rome [context: 2]"
    )  # alice remembers the first message
    assert_every_input_ended(log)
    assert await world.status("s1") is SessionStatus.IDLE


@pytest.mark.parametrize("team", ["swarm", "round_robin_one", "selector", "nested", "graph", "single_agent"])
async def test_team_shapes_take_messages_a_cancel_and_more_messages(world: World, team: str) -> None:
    tt.HOLDING.reset()
    pool = world.pool()
    await pool.start()
    with world.hub.subscribe("s1") as sub:
        outcomes: list[tuple[str, Entry]] = []
        for text in ("one", "two", f"{tt.HOLD} three", "four"):
            seq = await world.send("s1", text, team=team)
            if tt.HOLD in text:  # cancel while the first agent's model call is under way
                await asyncio.wait_for(tt.HOLDING.wait(), GUARD_S)
                await world.cancel(pool, "s1")
            outcomes.append((text, await wait_entry(sub, ends(seq))))
    assert [(text, e.type) for text, e in outcomes] == [
        ("one", "run_completed"),
        ("two", "run_completed"),
        (f"{tt.HOLD} three", "run_cancelled"),
        ("four", "run_completed"),
    ], [e.metadata for _, e in outcomes]
    log = await world.log("s1")
    said = {text: replies(log, e.run_id) for text, e in outcomes}
    assert said["one"] and said["two"] and said["four"], said
    assert said["two"][-1] == "You said: two [context: 2]"  # memory across runs
    assert said["four"][-1].startswith("You said: four [context: "), said
    assert_every_input_ended(log)
    assert await world.status("s1") is SessionStatus.IDLE


# === 6. a team's configuration changes under its sessions =====================================================
@pytest.mark.parametrize(
    "changed",
    [tt.grown_default_team, tt.selector_default_team],
    ids=["helper_added", "round_robin_to_selector"],
)
async def test_sessions_survive_a_changed_team(world: World, changed: TeamBuilder) -> None:
    for text in ("one", "two"):
        await world.send("s1", text)
        await world.pool().run_until_idle()
    world.use_teams(default=changed)  # a new deployment: same names, another shape
    three = await world.send("s1", "three")
    await world.pool().run_until_idle()
    log = await world.log("s1")
    done = the_terminal(log, three)
    assert done.type == "run_completed", done.metadata
    assert failures(log, three) == []
    assert replies(log, done.run_id)[0] == "You said: three [context: 3]"  # the assistant's memory survived
    assert_every_input_ended(log)


async def test_reset_team_state_in_the_store(any_world: World) -> None:
    w = any_world
    pool = w.pool()
    await w.send("s1", "one")
    await pool.run_until_idle()
    assert await w.store.load_team_state("s1") is not None
    await w.send("s1", "working")
    claim = await w.store.claim("another-worker", 30.0)
    assert claim is not None
    with pytest.raises(Conflict):  # a run is working on the session
        await w.store.reset_team_state(OWNER, "s1")
    await w.store.finish(claim, _completed(claim.input_seq), None)
    await w.send("s1", "[[ask]] a question")
    await pool.run_until_idle()
    with pytest.raises(Conflict):  # the run waiting for its answer is still running
        await w.store.reset_team_state(OWNER, "s1")
    await w.send("s1", "the answer")
    await pool.run_until_idle()
    entry = await w.store.reset_team_state(OWNER, "s1")
    assert entry is not None and (entry.type, entry.source) == ("team_reset", "system")
    assert (await w.log("s1"))[-1] == entry
    assert await w.store.load_team_state("s1") is None
    await w.store.create_session("someone-else", "theirs", "default", None)
    assert await w.store.reset_team_state(OWNER, "theirs") is None
    assert await w.store.reset_team_state(OWNER, "missing") is None
    nxt = await w.send("s1", "three")
    await pool.run_until_idle()
    log = await w.log("s1")
    assert replies(log, the_terminal(log, nxt).run_id) == ["You said: three [context: 1]"]


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def reset_client(
    request: pytest.FixtureRequest, tmp_path: Path, aiohttp_client: MakeClient
) -> AsyncIterator[Client]:
    with backend_url(request.param, tmp_path) as url:
        config = make_config(url, teams={"evolving": "tests.teams_for_tests:fast_default_team"})
        yield await aiohttp_client(create_app(config, start_workers=False))


async def test_reset_clears_a_state_that_cannot_load(reset_client: Client) -> None:
    client = reset_client
    assert client.app is not None
    store: Store = client.app[keys.STORE]
    assert (await client.post("/sessions", json={"session_id": "s1", "team": "evolving"})).status == 201
    await client.post("/sessions/s1/messages", json={"content": "one"})
    await run_until_idle(client)
    # The saved state is damaged (a bad disk, a bad migration, a hand edit): write it as a run would.
    state = await store.load_team_state("s1")
    assert state is not None
    state["agent_states"]["assistant"]["agent_state"]["llm_context"] = {
        "messages": [{"type": "NoSuchMessage"}]
    }
    await client.post("/sessions/s1/messages", json={"content": "seed"})
    claim = await store.claim("test", 30.0)
    assert claim is not None
    await store.finish(claim, _completed(claim.input_seq), state)
    response = await client.post("/sessions/s1/messages", json={"content": "two"})
    two = (await response.json())["seq"]
    await run_until_idle(client)
    log = await _http_log(client, "s1")
    assert [e["attempt"] for e in log if e["type"] == "run_started" and e["input_seq"] == two] == [1]
    [failed] = [e for e in log if e["type"] == "run_failed" and e["input_seq"] == two]
    assert failed["retrying"] is False
    assert "evolving" in failed["error"] and "/reset" in failed["error"]
    assert (await (await client.get("/sessions/s1")).json())["status"] == "failed"

    reset = await client.post("/sessions/s1/reset")
    assert reset.status == 200 and (await reset.json())["reset"] is True
    log = await _http_log(client, "s1")
    assert (log[-1]["type"], log[-1]["source"]) == ("team_reset", "system")
    await client.post("/sessions/s1/messages", json={"content": "three"})
    await run_until_idle(client)
    log = await _http_log(client, "s1")
    assert log[-1]["type"] == "run_completed"
    assert [e["content"] for e in log if e["source"] == "assistant"][-1] == "You said: three [context: 1]"

    # While a run waits for the human: 409; a missing or another user's session: 404.
    await client.post("/sessions/s1/messages", json={"content": "[[ask]] a question"})
    await run_until_idle(client)
    busy = await client.post("/sessions/s1/reset")
    assert busy.status == 409 and (await busy.json())["error"]["code"] == "conflict"
    await client.post("/sessions/s1/messages", json={"content": "the answer"})
    await run_until_idle(client)
    assert (await _http_log(client, "s1"))[-1]["type"] == "run_completed"
    await store.create_session("someone-else", "theirs", "default", None)
    for sid in ("theirs", "missing"):
        gone = await client.post(f"/sessions/{sid}/reset")
        assert gone.status == 404 and (await gone.json())["error"]["code"] == "not_found"
    assert [e.type for e in (await store.read_log("theirs", after=0)).messages] == []


def _completed(input_seq: int) -> NewEntry:
    return lifecycle(RUN_COMPLETED, "Run completed: test", stop_reason="test", input_seq=input_seq, attempt=1)


async def _http_log(client: Client, session_id: str) -> list[dict[str, Any]]:
    page = await (await client.get(f"/sessions/{session_id}/messages?limit=1000")).json()
    messages: list[dict[str, Any]] = page["messages"]
    return messages


# === 8. the shipped team files behave like the teams they were dumped from ======================================
PYTHON_BUILT: dict[str, TeamBuilder] = {"default.json": partial(default_team, 0.0)}


@pytest.mark.parametrize("path", SHIPPED_TEAMS, ids=[p.name for p in SHIPPED_TEAMS])
async def test_a_shipped_team_file_behaves_as_built(world: World, path: Path) -> None:
    assert path.name in PYTHON_BUILT, (
        f"{path.name}: add the Python builder it was dumped from to PYTHON_BUILT"
    )
    loaded = TeamRegistry.from_config({"loaded": str(path)})
    world.use_teams(loaded=partial(loaded.build, "loaded"), built=PYTHON_BUILT[path.name])
    inputs = [
        "hello",
        "the reply says [context: 3] in the middle",
        "[[tool:calculator:6*7]] please",
        "[[ask]] a question",
        "my answer",
    ]
    logs = {}
    for team in ("loaded", "built"):
        for text in inputs:
            await world.send(team, text, team=team)
            await world.pool().run_until_idle()
        logs[team] = [(e.type, e.source, e.content, _lifecycle(e)) for e in await world.log(team)]
    assert logs["loaded"] == logs["built"]
    log = await world.log("loaded")
    context3 = next(e.seq for e in log if e.content == inputs[1])
    done = the_terminal(log, context3)
    assert done.type == "run_completed"
    assert replies(log, done.run_id) == [f"You said: {inputs[1]} [context: 2]"]


def _lifecycle(e: Entry) -> str | None:
    return orjson.dumps(e.metadata, option=orjson.OPT_SORT_KEYS).decode() if e.source == "system" else None


# === 7. (in part) a run that makes no progress ===================================================================
async def test_a_run_that_makes_no_progress_is_stopped(world: World) -> None:
    pool = world.pool(stall_timeout_s=1.0, stop_timeout_s=0.5, heartbeat_s=0.05)
    await pool.start()
    with world.hub.subscribe("s1") as sub:
        stuck = await world.send("s1", "[[tool:slow:30]] please", team="slow")
        failed = await wait_entry(sub, ends(stuck))
        assert failed.type == "run_failed" and failed.metadata["retrying"] is False
        assert "progress" in failed.metadata["error"]
        after = await world.send("s1", "after", team="slow")
        done = await wait_entry(sub, ends(after))
    assert_nothing_left_to_the_garbage_collector()
    assert done.type == "run_completed"
    log = await world.log("s1")
    assert len(starts(log, stuck)) == 1
    assert_every_input_ended(log)


async def test_a_run_waiting_for_a_human_is_not_a_stall(world: World) -> None:
    pool = world.pool(stall_timeout_s=0.2, stop_timeout_s=0.5)
    await pool.start()
    with world.hub.subscribe("s1") as sub:
        ask = await world.send("s1", "[[ask]] a question")
        await wait_entry(sub, of_type("UserInputRequestedEvent"))
        # Time passing is what is tested here (several stall timeouts), not a stand-in for a condition.
        await asyncio.sleep(1.0)
        await world.send("s1", "my answer")
        done = await wait_entry(sub, ends(ask))
    assert done.type == "run_completed"
    assert replies(await world.log("s1"), done.run_id)[-1] == "You said: my answer [context: 2]"
