"""Long sessions: the bytes a turn writes do not grow with the conversation (team state in pieces, migration 0006),
and databases of the previous version upgrade with their saved state.

The long-session test drives one session through the store the way the pool does (enqueue, claim, the team's
messages, finish with ``team.save_state()``) with the real default team (demo model, no typing delay), a fresh
team loading the claimed state every turn as the runner does, and compares the bytes written per turn around turn 20 and
around turn 200. ``bench/long.py`` measures the same through a real server up to turn 1,000.
"""

from __future__ import annotations

import sqlite3
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from autogen_agentchat.messages import BaseChatMessage, ToolCallExecutionEvent, ToolCallRequestEvent

from service.models import NewEntry, lifecycle
from service.queue import Store, open_store
from service.queue.migrate import load_migrations
from service.queue.postgres import schema as pg_schema
from service.queue.sqlite.schema import migrate as sqlite_migrate
from service.worker.state import drop_delivered_buffers, prepare_state
from tests.pg import pg_database
from tests.teams_for_tests import fast_default_team

OWNER = "local"
EARLY = range(20, 40)  # turns measured (1-based)
LATE = range(200, 220)
TURNS = LATE.stop - 1
# A message of a real chat's size, so the state grows well beyond what a turn writes anyway (rewriting it would show).
FILLER = "tell me about the weather in Lisbon, " * 16


def written_by_this_process() -> int:
    """Bytes this process sent to the storage layer (the SQLite writer thread is one of its threads)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no write_bytes in /proc/self/io")


@asynccontextmanager
async def long_store(
    backend: str, tmp_path: Path
) -> AsyncIterator[tuple[Store, Callable[[], Awaitable[int]]]]:
    """An opened store and a counter of bytes written (SQLite: this process; PostgreSQL: WAL position)."""
    if backend == "sqlite":
        store = open_store(f"sqlite:///{tmp_path / 'long.db'}")
        await store.open()

        async def on_disk() -> int:
            return written_by_this_process()

        try:
            yield store, on_disk
        finally:
            await store.close()
        return
    with pg_database() as url:
        store = open_store(url)
        await store.open()
        conn = await asyncpg.connect(url)

        async def wal() -> int:
            return int(await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint"))

        try:
            yield store, wal
        finally:
            await conn.close()
            await store.close()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def test_bytes_per_turn_do_not_grow_with_the_conversation(backend: str, tmp_path: Path) -> None:
    per_turn: dict[int, int] = {}
    state: Any = None
    async with long_store(backend, tmp_path) as (store, written):
        for turn in range(1, TURNS + 1):
            text = "and what is [[tool:calculator:6*7]]?" if turn % 10 == 0 else f"turn {turn}: {FILLER}"
            await store.enqueue(OWNER, "long", text, f"m{turn}")
            before = await written()
            claim = await store.claim("w", 60)
            assert claim is not None
            assert claim.team_state == state  # the previous turn's state comes back whole
            team = fast_default_team()  # as the runner does: a fresh team, the saved state merged onto it
            await team.load_state(prepare_state(claim.team_state, await team.save_state()))
            async for message in team.run_stream(task=text, output_task_messages=False):
                if isinstance(message, BaseChatMessage | ToolCallRequestEvent | ToolCallExecutionEvent):
                    await store.append(
                        claim, [NewEntry(type(message).__name__, "assistant", message.to_text())]
                    )
            state = drop_delivered_buffers(dict(await team.save_state()))
            await store.finish(claim, lifecycle("run_completed", "done", input_seq=claim.input_seq), state)
            per_turn[turn] = await written() - before
    state_bytes = len(orjson.dumps(state))
    early = [per_turn[t] for t in EARLY]
    late = [per_turn[t] for t in LATE]
    # PostgreSQL's WAL position is the whole cluster's (other tests may write meanwhile): the median turn.
    pick = statistics.median if backend == "postgresql" else statistics.fmean
    ratio = pick(late) / pick(early)
    detail = f"early {pick(early):.0f} B/turn, late {pick(late):.0f} B/turn, state {state_bytes} B at the end"
    assert state_bytes > 2 * pick(early), detail  # so that rewriting the state every turn would show
    assert ratio < 1.6, detail


# --- upgrade: a state saved whole by the previous version loads and continues ---------------------------------
OLD_STATE = {
    "type": "TeamState",
    "agent_states": {
        "assistant": {
            "agent_state": {"llm_context": {"messages": [{"content": "old \x00 one", "source": "u"}]}}
        },
        "RoundRobinGroupChatManager": {"message_thread": [{"content": "old"}], "current_turn": 0},
    },
}
NOW = "2026-11-24T10:00:00.000000+00:00"


async def continue_after_upgrade(url: str) -> Store:
    store = open_store(url)
    await store.open()
    assert await store.load_team_state("s1") == OLD_STATE
    await store.enqueue(OWNER, "s1", "after the upgrade", None)
    claim = await store.claim("w", 60)
    assert claim is not None and orjson.dumps(claim.team_state) == orjson.dumps(OLD_STATE)
    grown: dict[str, Any] = orjson.loads(orjson.dumps(OLD_STATE))
    grown["agent_states"]["assistant"]["agent_state"]["llm_context"]["messages"].append({"content": "new"})
    await store.finish(claim, lifecycle("run_completed", "done", input_seq=claim.input_seq), grown)
    await store.enqueue(OWNER, "s1", "and again", None)
    claim = await store.claim("w", 60)
    assert claim is not None and orjson.dumps(claim.team_state) == orjson.dumps(grown)
    return store


async def test_a_sqlite_database_of_the_previous_version_keeps_its_team_state(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as raw:
        sqlite_migrate(raw, [m for m in load_migrations("sqlite") if m.version < 6])
        raw.execute(
            f"INSERT INTO sessions VALUES ('s1', '{OWNER}', 'default', NULL, 'idle', 0, '{NOW}', '{NOW}')"
        )
        raw.execute("INSERT INTO team_states VALUES ('s1', ?, ?)", (orjson.dumps(OLD_STATE).decode(), NOW))
    store = await continue_after_upgrade(f"sqlite:///{path}")
    await store.close()
    with closing(sqlite3.connect(path)) as raw:
        (pieces,) = raw.execute("SELECT count(*) FROM state_pieces WHERE session_id = 's1'").fetchone()
    assert pieces == 3  # two messages and one thread item, now stored as pieces


@pytest.mark.postgres
async def test_a_postgres_database_of_the_previous_version_keeps_its_team_state() -> None:
    with pg_database() as url:
        conn = await asyncpg.connect(url)
        try:
            await pg_schema.migrate(conn, [m for m in load_migrations("postgres") if m.version < 6])
            await conn.execute(
                "INSERT INTO sessions (session_id, owner, team, status, last_seq, team_state, created_at, updated_at)"
                " VALUES ('s1', $1, 'default', 'idle', 0, $2::text::json, now(), now())",
                OWNER,
                orjson.dumps(OLD_STATE).decode(),
            )
            store = await continue_after_upgrade(url)
            await store.close()
            pieces = await conn.fetchval("SELECT count(*) FROM state_pieces WHERE session_id = 's1'")
            assert pieces == 3
        finally:
            await conn.close()
