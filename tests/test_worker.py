"""The worker pool end to end on real stores (memory and SQLite files): turns, memory across restarts, tools,
retries, cancel, human input (live and after a crash), parallel sessions, fencing and graceful stop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from service.hub import Hub, Subscription
from service.models import Claim, Entry, SessionStatus, interrupted
from service.queue import Store, open_store
from service.queue.memory import MemoryStore
from service.queue.retry import RetryPolicy
from service.worker.pool import WorkerPool
from service.worker.teams import TeamRegistry, default_team
from tests.conftest import FakeClock

OWNER = "local"
BACKENDS = ["memory", "sqlite"]


class World:
    """A store on a fake clock, a hub and fast teams (the default team with no chunk delay)."""

    def __init__(self, url: str, clock: FakeClock) -> None:
        self.url, self.clock = url, clock
        self.hub = Hub()
        self.teams = TeamRegistry({"default": partial(default_team, 0.0)})
        self.store: Store = open_store(url, clock=clock, db_clock_offset=clock.db_offset)

    async def reopen(self) -> None:
        """A restart: a new store object on the same database (SQLite only: memory would forget)."""
        await self.store.close()
        self.store = open_store(self.url, clock=self.clock)
        await self.store.open()

    def pool(self, **options: Any) -> WorkerPool:
        options.setdefault("retry", RetryPolicy(max_attempts=2, base_delay_s=5.0))
        return WorkerPool(self.store, self.hub, self.teams, clock=self.clock, **options)

    async def send(self, session_id: str, text: str) -> None:
        await self.store.enqueue(OWNER, session_id, text, None)

    async def log(self, session_id: str) -> list[Entry]:
        return (await self.store.read_log(session_id, after=0, limit=1000)).messages

    async def replies(self, session_id: str) -> list[str]:
        return [
            e.content
            for e in await self.log(session_id)
            if e.type == "TextMessage" and e.source == "assistant"
        ]

    async def status(self, session_id: str) -> SessionStatus:
        session = await self.store.get_session(OWNER, session_id)
        assert session is not None
        return session.status


@pytest.fixture(params=BACKENDS)
async def world(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> AsyncIterator[World]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'service.db'}"
    w = World(url, clock)
    await w.store.open()
    try:
        yield w
    finally:
        await w.store.close()


@pytest.fixture
async def sqlite_world(tmp_path: Path, clock: FakeClock) -> AsyncIterator[World]:
    w = World(f"sqlite:///{tmp_path / 'service.db'}", clock)
    await w.store.open()
    try:
        yield w
    finally:
        await w.store.close()


async def next_entry(sub: Subscription, match: Callable[[Entry], bool]) -> Entry:
    while True:
        item = await sub.queue.get()
        if isinstance(item, Entry) and match(item):
            return item


def of_type(type_: str) -> Callable[[Entry], bool]:
    return lambda e: e.type == type_


async def test_three_turns_remember_the_conversation(world: World) -> None:
    pool = world.pool()
    with world.hub.subscribe("s1") as sub:
        for text in ("one", "two", "three"):
            await world.send("s1", text)
            await pool.run_until_idle()
    replies = await world.replies("s1")
    assert [r.split("[context:")[1] for r in replies] == [" 1]", " 2]", " 3]"]
    assert all(text in reply for text, reply in zip(("one", "two", "three"), replies, strict=True))
    log = await world.log("s1")
    assert [e.seq for e in log] == list(range(1, len(log) + 1))
    assert [e.type for e in log[:4]] == ["TextMessage", "run_started", "TextMessage", "run_completed"]
    assert log[1].metadata == {"input_seq": 1, "attempt": 1}
    assert log[3].metadata["stop_reason"] == "Text '[context:' mentioned"
    assert log[2].metadata["id"] and log[2].metadata["models_usage"]["completion_tokens"] > 0
    # Everything the pool published was committed first, in seq order; chunks went out live only, with seq null.
    published = [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]
    durable = [i for i in published if isinstance(i, Entry)]
    assert [e.seq for e in durable] == [e.seq for e in log if e.source != "user"]
    chunks = [i for i in published if isinstance(i, dict)]
    assert chunks and all(c["seq"] is None and c["type"] == "ModelClientStreamingChunkEvent" for c in chunks)
    first_reply_chunks = [c["content"] for c in chunks if c["full_message_id"] == log[2].metadata["id"]]
    assert "".join(first_reply_chunks) == log[2].content
    assert await world.status("s1") is SessionStatus.IDLE
    assert (pool.stats.runs_started, pool.stats.completed) == (3, 3)


async def test_memory_survives_a_restart(sqlite_world: World) -> None:
    w = sqlite_world
    for text in ("one", "two", "three"):
        await w.send("s1", text)
        await w.pool().run_until_idle()
    await w.reopen()
    await w.send("s1", "four")
    await w.pool().run_until_idle()
    replies = await w.replies("s1")
    assert replies[-1] == "You said: four [context: 4]"
    assert [r[-2] for r in replies] == ["1", "2", "3", "4"]


async def test_tool_call(world: World) -> None:
    await world.send("s1", "[[tool:calculator:6*7]] please")
    await world.pool().run_until_idle()
    log = await world.log("s1")
    types = [e.type for e in log]
    assert types == [
        "TextMessage",
        "run_started",
        "ToolCallRequestEvent",
        "ToolCallExecutionEvent",
        "TextMessage",
        "run_completed",
    ]
    call = log[2].content[0]
    assert call["name"] == "calculator" and call["arguments"] == '{"expression":"6*7"}'
    assert log[3].content[0]["content"] == "42" and log[3].content[0]["is_error"] is False
    assert "42" in log[4].content and "[[tool:calculator:6*7]] please" in log[4].content
    assert log[4].content.endswith("[context: 1]")


async def test_a_refused_calculation_is_a_failed_tool_call(world: World) -> None:
    await world.send("s1", "[[tool:calculator:1/0]] please")
    await world.pool().run_until_idle()
    log = await world.log("s1")
    [result] = [e for e in log if e.type == "ToolCallExecutionEvent"]
    assert result.content[0]["is_error"] is True and "division by zero" in result.content[0]["content"]
    assert log[-1].type == "run_completed"  # the model read the error and answered


async def test_failure_is_retried_with_backoff_then_the_session_moves_on(world: World) -> None:
    pool = world.pool()
    await world.send("s1", "[[fail]] broken")
    await world.send("s1", "after")
    await pool.run_until_idle()
    # Attempt 1 failed; attempt 2 waits for its backoff (5 s on the fake clock), and "after" waits behind it.
    first = [e for e in await world.log("s1") if e.type == "run_failed"]
    assert len(first) == 1 and first[0].metadata["retrying"] is True
    assert await world.replies("s1") == []
    world.clock.advance(5)
    await pool.run_until_idle()
    log = await world.log("s1")
    failed = [e for e in log if e.type == "run_failed"]
    assert [f.metadata["retrying"] for f in failed] == [True, False]
    assert [e.metadata["attempt"] for e in log if e.type == "run_started"] == [1, 2, 1]
    error = failed[1].metadata["error"]
    assert error == "DemoModelError: the demo model failed on purpose ([[fail]] in the message)"
    assert all("Traceback" not in f.content and "\n" not in f.content for f in failed)
    assert await world.replies("s1") == ["You said: after [context: 1]"]
    assert (pool.stats.retried, pool.stats.failed, pool.stats.completed) == (1, 1, 1)
    assert await world.status("s1") is SessionStatus.IDLE


async def test_interruptions_do_not_use_up_the_retries(world: World) -> None:
    await world.send("s1", "[[fail]] broken")
    for _ in range(3):  # three shutdowns in a row caught this input mid-run
        claim = await world.store.claim("gone", 30)
        assert claim is not None
        await world.store.release(claim, interrupted(claim.input_seq, claim.attempt))
    await world.pool().run_until_idle()
    failed = [e for e in await world.log("s1") if e.type == "run_failed"]
    assert [f.metadata["attempt"] for f in failed] == [4]
    assert failed[0].metadata["retrying"] is True  # its first failure: retried as usual


async def test_a_team_that_cannot_be_built_fails_at_once(world: World) -> None:
    # The claim committed run_started before the team was built, so run_failed follows it (no retry: the
    # configuration will not fix itself), and both went out on the hub in seq order.
    pool = world.pool()
    with world.hub.subscribe("s1") as sub:
        await world.store.enqueue(OWNER, "s1", "hello", None, team="no-such-team")
        await pool.run_until_idle()
    log = await world.log("s1")
    assert [e.type for e in log] == ["TextMessage", "run_started", "run_failed"]
    assert log[1].run_id == log[2].run_id and log[2].metadata["retrying"] is False
    assert "no-such-team" in log[2].metadata["error"]
    published = [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]
    assert [e.seq for e in published if isinstance(e, Entry)] == [2, 3]
    assert (pool.stats.failed, pool.stats.retried) == (1, 0)
    assert await world.status("s1") is SessionStatus.FAILED


async def test_cancel_in_process_and_through_the_store(world: World) -> None:
    pool = world.pool(heartbeat_s=0.02)
    await pool.start()
    try:
        with world.hub.subscribe("s1") as sub:
            # In this process: the web layer calls pool.cancel.
            await world.send("s1", "[[sleep:300]] first")
            await next_entry(sub, of_type("run_started"))
            assert pool.cancel("s1")
            await next_entry(sub, of_type("run_cancelled"))
            # From another process: only the store knows; the heartbeat sees it.
            await world.send("s1", "[[sleep:300]] second")
            await next_entry(sub, of_type("run_started"))
            assert await world.store.request_cancel(OWNER, "s1")
            await next_entry(sub, of_type("run_cancelled"))
            await world.send("s1", "after")
            done = await next_entry(sub, of_type("run_completed"))
    finally:
        await pool.stop()
    assert done.metadata["input_seq"] == (await world.log("s1"))[-4].seq
    # The sleeps never finished: no reply to them. The next input ran normally.
    assert await world.replies("s1") == ["You said: after [context: 3]"]
    assert (pool.stats.cancelled, pool.stats.completed) == (2, 1)
    assert pool.cancel("s1") is False


async def test_human_input_live(world: World) -> None:
    pool = world.pool()
    await world.send("s1", "[[ask]] hello")
    await pool.run_until_idle()
    assert (await world.log("s1"))[-1].type == "UserInputRequestedEvent"
    assert await world.status("s1") is SessionStatus.AWAITING_INPUT
    assert pool.running_count() == 1
    await world.send("s1", "My name is Bob")
    await pool.run_until_idle()
    log = await world.log("s1")
    assert [(e.type, e.source) for e in log] == [
        ("TextMessage", "user"),
        ("run_started", "system"),
        ("TextMessage", "assistant"),
        ("UserInputRequestedEvent", "user"),
        ("TextMessage", "user"),  # the answer, enqueued by the user, not appended again by the run
        ("TextMessage", "assistant"),
        ("run_completed", "system"),
    ]
    assert log[5].content == "You said: My name is Bob [context: 2]"
    assert log[3].metadata["request_id"]
    assert await world.status("s1") is SessionStatus.IDLE
    assert pool.running_count() == 0


async def _crash(pool: WorkerPool) -> None:
    """The process dies: its runs stop without writing anything more."""
    tasks = [task for _, task in pool._runs.values()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_human_input_after_a_crash(world: World) -> None:
    await world.send("s1", "first")
    await world.pool().run_until_idle()
    pool = world.pool(lease_s=30)
    await world.send("s1", "[[ask]] hello")
    await pool.run_until_idle()
    await _crash(pool)
    if world.url.startswith("sqlite"):
        await world.reopen()
    world.clock.advance(31)
    recovered = await world.store.recover_expired()
    assert [e.type for e in recovered] == ["run_interrupted"]
    await world.send("s1", "My name is Bob")  # the answer, queued while nothing runs
    pool2 = world.pool()
    await pool2.run_until_idle()
    log = await world.log("s1")
    assert [e.metadata["attempt"] for e in log if e.type == "run_started"] == [1, 1, 2]
    assert [e.type for e in log].count("UserInputRequestedEvent") == 2
    assert (await world.replies("s1"))[-1] == "You said: My name is Bob [context: 3]"
    assert log[-1].type == "run_completed"
    assert await world.status("s1") is SessionStatus.IDLE


class Metrics:
    def __init__(self, pool_running: Callable[[], int]) -> None:
        self.running = pool_running
        self.max_running = 0
        self.ended: list[str] = []

    def run_started(self, team: str) -> None:
        self.max_running = max(self.max_running, self.running())

    def run_ended(self, team: str, outcome: str, duration_s: float) -> None:
        self.ended.append(outcome)


async def test_sessions_run_in_parallel_each_in_order(world: World) -> None:
    holder: list[WorkerPool] = []
    metrics = Metrics(lambda: holder[0].running_count())
    pool = world.pool(workers=4, metrics=metrics)
    holder.append(pool)
    for i in range(1, 4):
        await world.send("a", f"[[sleep:0.05]] a{i}")
        await world.send("b", f"b{i}")
    await pool.run_until_idle()
    assert await world.replies("a") == [f"You said: [[sleep:0.05]] a{i} [context: {i}]" for i in range(1, 4)]
    assert await world.replies("b") == [f"You said: b{i} [context: {i}]" for i in range(1, 4)]
    assert metrics.max_running == 2
    assert metrics.ended == ["completed"] * 6


async def test_a_run_of_a_deleted_session_stops_without_a_warning(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    pool = world.pool(lease_s=30)
    await world.send("s1", "[[ask]] hello")
    await pool.run_until_idle()
    pool.cancel("s1")  # as DELETE /sessions/{id} does, just before the store deletes the session
    assert await world.store.delete_session(OWNER, "s1")
    with caplog.at_level(logging.INFO, logger="service.worker.runner"):
        await pool.run_until_idle()
    assert pool.stats.lease_lost == 1
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "service.worker.runner"]
    assert any("the session was deleted" in m for _, m in said), said
    assert all(level < logging.WARNING for level, _ in said), said


async def test_a_run_whose_lease_expired_writes_nothing(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.worker.runner")
    pool = world.pool(lease_s=30)
    await world.send("s1", "[[ask]] hello")
    await pool.run_until_idle()
    old_run = (await world.log("s1"))[-1].run_id
    world.clock.advance(31)
    await world.store.recover_expired()  # as another process's recovery would: the input is re-queued
    await pool.run_until_idle()  # the old run finds its lease lost; attempt 2 asks again
    log = await world.log("s1")
    assert [e.type for e in log if e.run_id == old_run] == [
        "run_started",
        "TextMessage",
        "UserInputRequestedEvent",
        "run_interrupted",  # written by recovery, not by the fenced run
    ]
    assert [e.type for e in log][-3:] == ["run_started", "TextMessage", "UserInputRequestedEvent"]
    assert pool.stats.lease_lost == 1
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "lease lost" in r.getMessage()
    ]
    assert len(warned) == 1, warned  # an expired lease is a fault: it is said
    await world.send("s1", "Bob")
    await pool.run_until_idle()
    assert (await world.replies("s1"))[-1] == "You said: Bob [context: 2]"


async def test_graceful_stop_lets_short_runs_finish(world: World) -> None:
    pool = world.pool(grace_s=30)
    await pool.start()
    with world.hub.subscribe("s1") as sub:
        await world.send("s1", "[[sleep:0.1]] quick")
        await next_entry(sub, of_type("run_started"))
        await pool.stop()
    assert [e.type for e in await world.log("s1")][-1] == "run_completed"
    assert pool.stats.interrupted == 0


async def test_graceful_stop_releases_a_running_run(world: World) -> None:
    pool = world.pool(grace_s=0.05)
    await pool.start()
    with world.hub.subscribe("s1") as sub:
        await world.send("s1", "[[ask]] hello")
        await next_entry(sub, of_type("UserInputRequestedEvent"))
        await pool.stop()
        interrupted = await next_entry(sub, of_type("run_interrupted"))
    assert interrupted.metadata == {"input_seq": 1, "attempt": 1, "retrying": True}
    assert pool.stats.interrupted == 1 and pool.running_count() == 0
    assert await world.status("s1") is SessionStatus.QUEUED
    await world.send("s1", "Bob")
    pool2 = world.pool()
    await pool2.run_until_idle()
    log = await world.log("s1")
    assert [e.metadata["attempt"] for e in log if e.type == "run_started"] == [1, 2]
    assert log[-1].type == "run_completed"
    assert (await world.replies("s1"))[-1] == "You said: Bob [context: 2]"


class BrokenClaims(MemoryStore):
    """Fault injection: the database answers claims with an error the pool does not expect."""

    async def claim(self, worker_id: str, lease_s: float, held: Any = None) -> Claim | None:
        raise RuntimeError("disk on fire")


async def test_a_dying_side_task_fails_the_pool_loudly(caplog: pytest.LogCaptureFixture) -> None:
    store = BrokenClaims()
    await store.open()
    pool = WorkerPool(store, Hub(), TeamRegistry({"default": partial(default_team, 0.0)}))
    await pool.start()
    while pool.failed is None:  # noqa: ASYNC110 (a few loop steps, no time involved)
        await asyncio.sleep(0)  # yield to the claim loop; it dies on its first claim
    assert str(pool.failed) == "disk on fire"
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1 and "the claim task died" in critical[0].getMessage()
    with pytest.raises(RuntimeError, match="the worker pool failed: RuntimeError: disk on fire"):
        await pool.run_until_idle()
    await pool.stop()
    await store.close()


async def test_a_run_waiting_for_a_human_holds_no_worker_slot(world: World) -> None:
    pool = world.pool(workers=1)
    await world.send("a", "[[ask]] question")
    await world.send("b", "hello")
    await pool.run_until_idle()
    assert await world.status("a") is SessionStatus.AWAITING_INPUT
    assert await world.replies("b") == ["You said: hello [context: 1]"]
    await world.send("a", "answer")
    await pool.run_until_idle()
    assert (await world.replies("a"))[-1] == "You said: answer [context: 2]"
    assert pool.running_count() == 0
