# ruff: noqa: E402
"""Turns per second through the worker pool on the SQLite store vs the same team run bare.

Same team (the demo model with no chunk delay, its calculator tool), same number of sessions and turns. The bare
loop keeps one team object per session and calls ``team.run_stream`` turn after turn, all sessions concurrently
in one event loop, writing nothing. The pool does what the service does: claim each input under a lease, build a
fresh team and load the saved state (or take the session's live team: README "Configuration", live_teams), append
every entry durably (SQLite, synchronous=FULL), publish, save the state.

    python bench/worker.py [--sessions 32] [--turns 10] [--workers 32]

The last line is ``ratio pool/bare turns_per_s = X.XX``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where bench/queue.py would shadow the stdlib's queue.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE.parent)]

import argparse
import asyncio
import logging
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.conditions import TextMentionTermination
from autogen_agentchat.teams import RoundRobinGroupChat
from autogen_core.tools import FunctionTool

from service.hub import Hub
from service.queue import open_store
from service.worker.demo_model import DemoChatCompletionClient
from service.worker.pool import WorkerPool
from service.worker.teams import TeamRegistry
from service.worker.tools import calculator


def bench_team() -> RoundRobinGroupChat:
    assistant = AssistantAgent(
        "assistant",
        model_client=DemoChatCompletionClient(chunk_size=1, chunk_delay_s=0.0),
        tools=[FunctionTool(calculator, description="Evaluate arithmetic.", name="calculator")],
        system_message="You are a helpful assistant.",
        model_client_stream=True,
        reflect_on_tool_use=True,
    )
    return RoundRobinGroupChat([assistant], termination_condition=TextMentionTermination("[context:"))


def turn_text(session: int, turn: int) -> str:
    return f"session {session} turn {turn}: please say something about the weather"


async def run_bare(sessions: int, turns: int) -> float:
    async def one_session(s: int) -> None:
        team = bench_team()
        for t in range(turns):
            async for _ in team.run_stream(task=turn_text(s, t), output_task_messages=False):
                pass

    began = time.perf_counter()
    await asyncio.gather(*(one_session(s) for s in range(sessions)))
    return time.perf_counter() - began


async def run_bare_fresh(sessions: int, turns: int) -> float:
    """For reference: bare, but with the pool's team lifecycle (fresh team + load/save state every turn)."""

    async def one_session(s: int) -> None:
        state: Mapping[str, Any] | None = None
        for t in range(turns):
            team = bench_team()
            if state is not None:
                await team.load_state(state)
            async for _ in team.run_stream(task=turn_text(s, t), output_task_messages=False):
                pass
            state = await team.save_state()

    began = time.perf_counter()
    await asyncio.gather(*(one_session(s) for s in range(sessions)))
    return time.perf_counter() - began


async def run_pool(sessions: int, turns: int, workers: int, folder: Path) -> float:
    store = open_store(f"sqlite:///{folder / 'bench.db'}")
    await store.open()
    try:
        for t in range(turns):
            for s in range(sessions):
                await store.enqueue("bench", f"s{s}", turn_text(s, t), None)
        pool = WorkerPool(store, Hub(), TeamRegistry({"default": bench_team}), workers=workers)
        began = time.perf_counter()
        await pool.run_until_idle()
        elapsed = time.perf_counter() - began
        assert pool.stats.completed == sessions * turns, pool.stats
        last = (await store.read_log("s0", before=10**9, limit=2)).messages
        assert last[0].content.endswith(f"[context: {turns}]"), last[0].content
        return elapsed
    finally:
        await store.close()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--workers", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    total = args.sessions * args.turns
    with tempfile.TemporaryDirectory() as tmp:
        await run_bare(2, 2)  # warm up imports and code paths
        warm = Path(tmp) / "warm"
        warm.mkdir()
        await run_pool(2, 2, 2, warm)
        bare_s = await run_bare(args.sessions, args.turns)
        fresh_s = await run_bare_fresh(args.sessions, args.turns)
        folder = Path(tmp) / "run"
        folder.mkdir()
        pool_s = await run_pool(args.sessions, args.turns, args.workers, folder)
    bare_rate, pool_rate = total / bare_s, total / pool_s
    print(f"{'mode':<32} {'sessions':>8} {'turns':>6} {'workers':>7} {'seconds':>8} {'turns/s':>9}")
    rows = [
        ("bare run_stream (team kept)", bare_s, "-"),
        ("bare, fresh team + state per turn", fresh_s, "-"),
        ("pool on SQLite (durable)", pool_s, str(args.workers)),
    ]
    for name, seconds, workers in rows:
        print(
            f"{name:<32} {args.sessions:>8} {total:>6} {workers:>7} {seconds:>8.2f} {total / seconds:>9.1f}"
        )
    print(f"ratio pool/bare turns_per_s = {pool_rate / bare_rate:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
