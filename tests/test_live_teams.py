"""A turn costs the same at turn 200 as at turn 20 (the issue "Long conversations": constant cost per turn), and the
live team that makes it so (service/worker/live_teams.py) is used only when it is exactly what a fresh build would
load: never after another writer changed the state, a reset, a rollback, a failed or cancelled run.

The first test counts work instead of timing it, per turn, around turn 20 and around turn 200: team builds, saved
messages AutoGen validates again on loading, strings our text repair visits, messages our tool-call repair walks,
and serialisations in the piece diff. On main before the change (commit 0cfb3b8) it failed with every count
growing with the conversation: messages validated 84 -> 804 per turn, strings repaired 2,875 -> 26,275,
messages walked by the tool-call repair 42 -> 402, piece-diff serialisations 137 -> 1,217 (and one build per
turn). Now: no build, no validation, 6 strings (the run's new entries), 2 messages, 15 serialisations, at both.
The second test counts what was left growing: AutoGen's save_state (now a live team's StateSaver) and the
claim reading the state back (README "Benchmarks").
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
from autogen_agentchat.messages import BaseMessage, MessageFactory
from autogen_core.model_context._chat_completion_context import ChatCompletionContextState

import service.queue.postgres.store as postgres_store
import service.queue.sqlite.functions as sqlite_functions
import service.queue.state_pieces as state_pieces_module
import service.text as text_module
import service.worker.state as state_module
import service.worker.state_saver as state_saver_module
from service.hub import Hub
from service.models import RUN_COMPLETED, Entry, lifecycle
from service.queue import Store, open_store
from service.queue.retry import RetryPolicy
from service.worker.demo_model import DemoChatCompletionClient
from service.worker.pool import WorkerPool
from service.worker.state import CANCELLED_TOOL_RESULT, next_round, prepare_state
from service.worker.teams import TeamBuilder, TeamRegistry, default_team
from tests import teams_for_tests as tt
from tests.conftest import FakeClock, backend_url

OWNER = "local"
GUARD_S = 20.0  # a test guard only
EARLY = range(20, 25)  # turns measured (1-based)
LATE = range(200, 205)


class Counted:
    """Counts of work done per turn, by name."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n


class CountingOrjson:
    """``orjson`` as ``state_pieces`` sees it, counting ``dumps`` calls (one per item serialised one by one)."""

    def __init__(self, counted: Counted) -> None:
        self._counted = counted

    def dumps(self, *args: Any, **kwargs: Any) -> bytes:
        self._counted.add("piece diff: orjson.dumps calls")
        return orjson.dumps(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(orjson, name)


def counting(counted: Counted, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counted.add(name)
        return func(*args, **kwargs)

    return wrapper


async def long_session(tmp_path: Path, counted: Counted, url: str | None = None) -> dict[int, dict[str, int]]:
    """Drive one session of the default team (on SQLite unless ``url``) to turn ``LATE.stop - 1``: ``counted``'s
    counts per turn."""
    build = counting(counted, "team builds", partial(default_team, 0.0))
    store = open_store(url or f"sqlite:///{tmp_path / 'long.db'}")
    await store.open()
    per_turn: dict[int, dict[str, int]] = {}
    try:
        pool = WorkerPool(store, Hub(), TeamRegistry({"default": build}))
        for turn in range(1, LATE.stop):
            # Plain messages only, so every measured turn adds the same messages.
            await store.enqueue(OWNER, "long", f"turn {turn}: tell me about the weather in Lisbon", None)
            before = dict(counted.counts)
            await pool.run_until_idle()
            per_turn[turn] = {k: v - before.get(k, 0) for k, v in counted.counts.items()}
        log = (await store.read_log("long", after=0, limit=10_000)).messages
        await pool.stop()
    finally:
        await store.close()
    replies = [e.content for e in log if e.type == "TextMessage" and e.source == "assistant"]
    assert replies[-1].endswith(f"[context: {LATE.stop - 1}]")  # the whole conversation is remembered
    return per_turn


def grown(per_turn: dict[int, dict[str, int]]) -> dict[str, tuple[float, float]]:
    """The counts whose mean per turn around turn 200 is clearly above the one around turn 20."""
    names = sorted({name for counts in per_turn.values() for name in counts})
    early = {n: statistics.fmean(per_turn[t].get(n, 0) for t in EARLY) for n in names}
    late = {n: statistics.fmean(per_turn[t].get(n, 0) for t in LATE) for n in names}
    return {n: (early[n], late[n]) for n in names if late[n] > early[n] * 1.2 + 2}


class CountingBytes:
    """``orjson`` as a module sees it, counting the bytes ``dumps`` writes under ``name``."""

    def __init__(self, counted: Counted, name: str) -> None:
        self._counted, self._name = counted, name

    def dumps(self, *args: Any, **kwargs: Any) -> bytes:
        text = orjson.dumps(*args, **kwargs)
        self._counted.add(self._name, len(text))
        return text

    def __getattr__(self, name: str) -> Any:
        return getattr(orjson, name)


def counting_assemble(counted: Counted) -> Callable[..., Any]:
    """``state_pieces.assemble`` as a store calls it, counting the state items it reads back (the pieces)."""

    def wrapper(head: Any, pieces: Any) -> Any:
        counted.add("claim: state items read back", sum(len(items) for items in (pieces or {}).values()))
        return state_pieces_module.assemble(head, pieces)

    return wrapper


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_saving_and_claiming_the_state_do_not_grow_with_the_conversation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """What the issue's profile found still growing with a live team: AutoGen's save_state dumping every message
    of the conversation (the manager's thread, the user proxy's buffer, the assistant's model context) and the
    claim reading the whole saved state back. On main before the change (commit ff15cf8) it failed on SQLite:
    messages dumped per turn 133 at turn ~20 -> 1,213 at turn ~200, state bytes the claim parsed 27,045 ->
    252,738; on PostgreSQL, before migration 0014, the items read back grew with every turn. Now 7 messages
    dumped and no item read back at both (the claim hands back the state the live team holds). Then the state's
    whole text, serialised to check it needs no repair and to diff its pieces: on d40e892 the bytes checked and
    the bytes the piece diff serialised per turn grew with the conversation; now only what the run added.
    """
    counted = Counted()
    original_dump = BaseMessage.dump

    def dump(self: BaseMessage) -> Any:
        counted.add("AutoGen: messages dumped")
        return original_dump(self)

    original_context_dump = ChatCompletionContextState.model_dump

    def context_dump(self: ChatCompletionContextState, **kwargs: Any) -> Any:
        counted.add("AutoGen: messages dumped", len(self.messages))
        return original_context_dump(self, **kwargs)

    monkeypatch.setattr(BaseMessage, "dump", dump)
    monkeypatch.setattr(ChatCompletionContextState, "model_dump", context_dump)
    monkeypatch.setattr(sqlite_functions, "assemble", counting_assemble(counted))
    monkeypatch.setattr(postgres_store, "assemble", counting_assemble(counted))
    # The state's text: the check that it needs no repair (text.clean_json, or the saver's check of what it
    # dumped anew) and the piece diff's serialisations and hashes (state_pieces).
    monkeypatch.setattr(text_module, "orjson", CountingBytes(counted, "state text checked: bytes"))
    monkeypatch.setattr(
        state_saver_module, "orjson", CountingBytes(counted, "state text checked: bytes"), raising=False
    )
    monkeypatch.setattr(state_pieces_module, "orjson", CountingBytes(counted, "piece diff: bytes serialised"))
    with backend_url(backend, tmp_path) as url:
        per_turn = await long_session(tmp_path, counted, url)
        assert not grown(per_turn), f"per turn (turn ~20, turn ~200): {grown(per_turn)}"
        assert per_turn[LATE.start]["AutoGen: messages dumped"] > 0  # the counter does see the work
        # The counter sees a claim that holds nothing: it reads every item of the conversation back.
        store = open_store(url)
        await store.open()
        try:
            await store.enqueue(OWNER, "long", "one more", None)
            before = counted.counts.get("claim: state items read back", 0)
            claim = await store.claim("w", 60.0)
            assert claim is not None and claim.team_state is not None
            assert counted.counts["claim: state items read back"] - before > LATE.stop
        finally:
            await store.close()


async def test_work_per_turn_does_not_grow_with_the_conversation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = Counted()
    monkeypatch.setattr(text_module, "repair", counting(counted, "text repair: strings", text_module.repair))
    tool_calls = counting(counted, "tool-call repair: messages", state_module._tool_calls)
    monkeypatch.setattr(state_module, "_tool_calls", tool_calls)
    create = counting(counted, "AutoGen load: messages validated", MessageFactory.create)
    monkeypatch.setattr(MessageFactory, "create", create)
    monkeypatch.setattr(state_pieces_module, "orjson", CountingOrjson(counted))
    per_turn = await long_session(tmp_path, counted)
    assert not grown(per_turn), f"per turn (turn ~20, turn ~200): {grown(per_turn)}"
    assert per_turn[LATE.start]["piece diff: orjson.dumps calls"] > 0  # the counter does see the piece diff


# --- the kept team starts each run exactly as a fresh team would --------------------------------------------
TEAMS: dict[str, TeamBuilder] = {**tt.TEAM_SHAPES, "selector_default": tt.selector_default_team}


class World:
    def __init__(self, url: str, clock: FakeClock) -> None:
        self.clock = clock
        self.hub = Hub()
        self.teams = TeamRegistry(TEAMS)
        self.store: Store = open_store(url, clock=clock, db_clock_offset=clock.db_offset)
        self.pools: list[WorkerPool] = []

    def pool(self, **options: Any) -> WorkerPool:
        options.setdefault("retry", RetryPolicy(max_attempts=2, base_delay_s=5.0))
        pool = WorkerPool(self.store, self.hub, self.teams, clock=self.clock, **options)
        self.pools.append(pool)
        return pool

    async def send(self, session_id: str, text: str, team: str = "default", **options: Any) -> int:
        queued = await self.store.enqueue(OWNER, session_id, text, None, team=team, **options)
        if queued.entry is not None:
            self.hub.publish(session_id, [queued.entry])
        return queued.seq

    async def log(self, session_id: str) -> list[Entry]:
        return (await self.store.read_log(session_id, after=0, limit=1000)).messages

    async def last_reply(self, session_id: str) -> str:
        said = [
            e.content for e in await self.log(session_id) if e.type == "TextMessage" and e.source != "user"
        ]
        return str(said[-1])

    async def terminal(self, session_id: str, input_seq: int) -> Entry:
        ends = ("run_completed", "run_cancelled", "run_failed")
        found = [
            e
            for e in await self.log(session_id)
            if e.type in ends and e.metadata.get("input_seq") == input_seq and not e.metadata.get("retrying")
        ]
        assert len(found) == 1, found
        return found[0]


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def world(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> AsyncIterator[World]:
    """Every backend: a live team is used again only when the claim brings back exactly the state it saved, so
    each store's round trip of the state must keep it byte for byte (the PostgreSQL kind: integration)."""
    with backend_url(request.param, tmp_path) as url:
        w = World(url, clock)
        await w.store.open()
        try:
            yield w
        finally:
            for pool in w.pools:
                await asyncio.wait_for(pool.stop(), GUARD_S)
            await w.store.close()


@pytest.mark.parametrize("team", sorted(TEAMS))
async def test_a_kept_team_starts_its_next_run_as_a_fresh_team_would(world: World, team: str) -> None:
    pool = world.pool()
    texts = ["one", "two [[tool:calculator:6*7]]", "three", "[[tool:transfer_to_user:x]] four", "five"]
    for n, text in enumerate(texts, start=1):
        await world.send("s1", text, team=team)
        await pool.run_until_idle()
        live = pool.live_teams.peek("s1")
        assert live is not None, f"{team}: not kept after message {n}"
        # What the ordinary path would load for the next run: a fresh team, the saved state merged onto it.
        fresh = world.teams.build(team)
        expected = prepare_state(await world.store.load_team_state("s1"), await fresh.save_state())
        assert await live.team.save_state() == expected, f"{team}: after message {n}"
        # Its saver, which dumps only what each run added, saves what AutoGen's own save_state saves.
        assert await live.saver.save() == await live.team.save_state(), f"{team}: after message {n}"
    assert pool.live_teams.reused == len(texts) - 1
    assert (await world.last_reply("s1")).endswith(f"[context: {len(texts)}]")


# --- a stale live team is never used -------------------------------------------------------------------------
async def one_kept_turn(world: World, pool: WorkerPool) -> None:
    await world.send("s1", "one")
    await pool.run_until_idle()
    assert pool.live_teams.peek("s1") is not None
    assert (await world.last_reply("s1")).endswith("[context: 1]")


async def test_not_after_another_writer_saved_the_state(world: World) -> None:
    pool = world.pool()
    await one_kept_turn(world, pool)
    # Another instance runs the next message: a fresh team on the claimed state; it saves a state that differs.
    await world.send("s1", "two")
    claim = await world.store.claim("another-instance", 30.0)
    assert claim is not None
    other = default_team(0.0)
    await other.load_state(prepare_state(claim.team_state, await other.save_state()))
    async for _ in other.run_stream(task=claim.content, output_task_messages=False):
        pass
    done = lifecycle(RUN_COMPLETED, "done", input_seq=claim.input_seq)
    await world.store.finish(claim, done, dict(await other.save_state()))
    await world.send("s1", "three")
    await pool.run_until_idle()
    assert (await world.last_reply("s1")).endswith("[context: 3]")  # the kept team knew of one message only
    assert (pool.live_teams.reused, pool.live_teams.dropped) == (0, 1)
    assert pool.live_teams.peek("s1") is not None  # the team that ran "three" is kept in its place


async def test_not_after_a_reset(world: World) -> None:
    pool = world.pool()
    await one_kept_turn(world, pool)
    assert await world.store.reset_team_state(OWNER, "s1") is not None
    await world.send("s1", "two")
    await pool.run_until_idle()
    assert (await world.last_reply("s1")).endswith("[context: 1]")
    assert (pool.live_teams.reused, pool.live_teams.dropped) == (0, 1)


async def run_until_started(world: World, pool: WorkerPool, text: str) -> int:
    """Send ``text`` to a started pool; its seq once its run has started."""
    with world.hub.subscribe("s1") as sub:
        seq = await world.send("s1", text)
        while True:
            item = await asyncio.wait_for(sub.queue.get(), GUARD_S)
            if isinstance(item, Entry) and item.type == "run_started" and item.metadata["input_seq"] == seq:
                return seq


async def wait_terminal(world: World, input_seq: int) -> Entry:
    async def poll() -> Entry:
        while True:
            try:
                return await world.terminal("s1", input_seq)
            except AssertionError:
                await asyncio.sleep(0.01)

    return await asyncio.wait_for(poll(), GUARD_S)


@pytest.mark.parametrize("strategy", ["rollback", "interrupt"])
async def test_not_after_a_double_texting_stop(world: World, strategy: str) -> None:
    """The long run took the kept team; a message with ``rollback`` (the state stays as before the long run) or
    ``interrupt`` stops it: the message after it runs on a fresh team."""
    pool = world.pool()
    await one_kept_turn(world, pool)
    await pool.start()
    long = await run_until_started(world, pool, "[[sleep:30]] the long one")
    assert (pool.live_teams.reused, len(pool.live_teams)) == (1, 0)  # taken by the long run
    new = await world.send("s1", "the new one", strategy=strategy)
    await world.store.request_cancel(OWNER, "s1")  # what the web layer does for these strategies
    pool.cancel("s1")
    stopped = await wait_terminal(world, long)
    assert stopped.type == "run_cancelled"
    assert stopped.metadata.get("rolled_back", False) is (strategy == "rollback")
    assert (await wait_terminal(world, new)).type == "run_completed"
    # rollback: as if the long one never happened; interrupt: it is remembered.
    context = 2 if strategy == "rollback" else 3
    assert (await world.last_reply("s1")).endswith(f"[context: {context}]")
    assert pool.live_teams.reused == 1  # the new one built its team


async def test_not_after_a_failed_run(world: World) -> None:
    pool = world.pool()
    await one_kept_turn(world, pool)
    failing = await world.send("s1", "[[fail]] please")
    await pool.run_until_idle()  # attempt 1 took the kept team and failed; the retry waits
    assert (pool.live_teams.reused, len(pool.live_teams)) == (1, 0)
    world.clock.advance(60)
    await pool.run_until_idle()
    assert (await world.terminal("s1", failing)).type == "run_failed"
    await world.send("s1", "after")
    await pool.run_until_idle()
    assert (await world.last_reply("s1")).endswith("[context: 2]")  # failed runs saved nothing
    assert pool.live_teams.reused == 1


async def test_not_after_a_cancelled_run(world: World) -> None:
    pool = world.pool()
    await one_kept_turn(world, pool)
    await pool.start()
    held = await run_until_started(world, pool, "[[sleep:30]] wait")
    await world.store.request_cancel(OWNER, "s1")
    pool.cancel("s1")
    assert (await wait_terminal(world, held)).type == "run_cancelled"
    assert len(pool.live_teams) == 0
    after = await world.send("s1", "after")
    assert (await wait_terminal(world, after)).type == "run_completed"
    assert (await world.last_reply("s1")).endswith("[context: 3]")  # the cancelled message is remembered
    assert pool.live_teams.reused == 1


async def test_not_for_another_pool_or_after_a_stop(world: World) -> None:
    """Another process (here: another pool, as after a restart or a new deployment with other team files)
    has its own live teams; a stopped pool keeps none."""
    pool = world.pool()
    await one_kept_turn(world, pool)
    await pool.stop()
    assert len(pool.live_teams) == 0
    world.teams = TeamRegistry({**TEAMS, "default": tt.grown_default_team})
    other = world.pool()
    await world.send("s1", "two")
    await other.run_until_idle()
    assert (await world.last_reply("s1")).startswith("You said: two [context: 2]")
    assert other.live_teams.reused == 0


async def test_the_cache_is_bounded_and_closes_what_it_drops(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[DemoChatCompletionClient] = []
    original = DemoChatCompletionClient.close

    async def close(self: DemoChatCompletionClient) -> None:
        closed.append(self)
        await original(self)

    monkeypatch.setattr(DemoChatCompletionClient, "close", close)
    pool = world.pool(live_teams=1)
    for text in ("a1", "b1", "a2", "b2"):
        await world.send(text[0], text)
        await pool.run_until_idle()
    assert (len(pool.live_teams), pool.live_teams.reused) == (1, 0)  # each session pushed the other one out
    assert len(closed) == 3  # the three teams pushed out; the last one is still kept
    assert (await world.last_reply("a")).endswith("[context: 2]")
    off = world.pool(live_teams=0)
    await world.send("c", "c1")
    await off.run_until_idle()
    assert len(off.live_teams) == 0


# --- next_round on states: what a kept team lacks for its next run -------------------------------------------
def _team(manager: dict[str, Any], **agents: Any) -> dict[str, Any]:
    return {"type": "TeamState", "version": "1.0.0", "agent_states": {**agents, "Manager": manager}}


def _agent(*messages: dict[str, Any]) -> dict[str, Any]:
    inner = {"type": "AssistantAgentState", "llm_context": {"messages": list(messages)}}
    return {"type": "ChatAgentContainerState", "agent_state": inner, "message_buffer": []}


def _manager(thread: list[Any], index: int) -> dict[str, Any]:
    return {
        "type": "RoundRobinManagerState",
        "message_thread": thread,
        "current_turn": 0,
        "next_speaker_index": index,
    }


USER_MESSAGE = {"type": "UserMessage", "content": "hi", "source": "user"}
CALL = {
    "type": "AssistantMessage",
    "content": [{"id": "c1", "name": "calc", "arguments": "{}"}],
    "source": "a",
}
RESULT = {
    "type": "FunctionExecutionResultMessage",
    "content": [{"content": "4", "call_id": "c1", "name": "calc"}],
}


def test_next_round_reloads_only_the_managers_counters() -> None:
    fresh = _team(_manager([], 0), a=_agent())
    started = _team(_manager([], 0), a=_agent(USER_MESSAGE))
    saved = _team(_manager([{"content": "hi"}], 1), a=_agent(USER_MESSAGE, CALL, RESULT))
    found = next_round(saved, fresh, started)
    assert found is not None and found.manager == "Manager"
    assert found.start["agent_states"]["Manager"]["next_speaker_index"] == 0
    assert (
        found.start["agent_states"]["Manager"]["message_thread"]
        is saved["agent_states"]["Manager"]["message_thread"]
    )
    already = _team(_manager([{"content": "hi"}], 0), a=_agent(USER_MESSAGE))
    found = next_round(already, fresh, started)
    assert found is not None and found.manager is None  # nothing to change


def test_next_round_refuses_a_team_left_with_a_tool_call_without_result() -> None:
    fresh = _team(_manager([], 0), a=_agent())
    started = _team(_manager([], 0), a=_agent(USER_MESSAGE))
    saved = _team(_manager([], 0), a=_agent(USER_MESSAGE, CALL))
    assert next_round(saved, fresh, started) is None
    # The ordinary path closes the call (README "Guarantees": tool calls stopped halfway are closed).
    messages = prepare_state(saved, fresh)["agent_states"]["a"]["agent_state"]["llm_context"]["messages"]
    assert messages[-1]["content"][0]["content"] == CANCELLED_TOOL_RESULT


def test_next_round_refuses_a_nested_teams_progress() -> None:
    inner_fresh = _team(_manager([], 0), w=_agent())
    inner_saved = _team(_manager([], 1), w=_agent())
    nested = {"type": "ChatAgentContainerState", "agent_state": inner_saved, "message_buffer": []}
    nested_fresh = {"type": "ChatAgentContainerState", "agent_state": inner_fresh, "message_buffer": []}
    fresh = _team(_manager([], 0), inner=nested_fresh)
    saved = _team(_manager([], 0), inner=nested)
    assert next_round(saved, fresh, saved) is None
