# ruff: noqa: E402
"""One long session: are bytes written and server CPU per turn the same at turn N as at turn 10?

A real ``python -m service serve`` process with the shipped default team (the demo model without its typing delay),
one WebSocket client driving ONE session turn after turn (every 10th turn calls the calculator tool). Around turn
10 and around the last turn it measures, per turn:

* bytes written to the database: on SQLite, the bytes the server process wrote to disk (``write_bytes`` in
  ``/proc/<pid>/io``: WAL frames and checkpoints into the database file; the WAL file is reused after each
  checkpoint, so its size says nothing); on PostgreSQL, WAL bytes (``pg_current_wal_lsn()`` difference; the whole
  cluster's, so the median turn is used: other databases' traffic makes spikes);
* server CPU ms (user + system of the service process).

On PostgreSQL it also prints the size on disk of the tables a turn writes (with their TOAST and indexes) after the
early window and at the end, and their dead rows: ``sessions`` holds the state's head, rewritten every turn (its
old versions are dead rows that autovacuum reclaims, so it must not grow with the turns), ``state_pieces`` and
``entries`` are append-only (they grow with the conversation, by what each turn adds).

    python bench/long.py [--turns 1000] [--window 10] [--pg postgresql://... | --no-pg]

Without ``--pg``, a throwaway database is created (and dropped) when PostgreSQL answers on 127.0.0.1:5432. The last
line is ``ratio turn<N>/turn10 bytes_per_turn = X.XX`` (the larger of the backends' ratios; goal <= 2.0), after
the same ratio of server CPU per turn (``cpu_ms_per_turn``).
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if p and Path(p).resolve() != _HERE), str(_HERE)]

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import orjson
from _server import Server, served
from e2e import bench_team_file, http_session, pg_answers, receive_frame, throwaway_pg_database

from service.models import RUN_COMPLETED

TEXT = "please tell me something about the weather in Lisbon today"
TOOL_TEXT = "and what is [[tool:calculator:6*7]]?"
EARLY_TURN = 10


@dataclass
class Window:
    first: int  # turns first..last (1-based), inclusive
    last: int
    bytes_per_turn: list[int]
    cpu_ms_per_turn: list[float]

    def bytes_mean(self) -> float:
        return statistics.fmean(self.bytes_per_turn)

    def bytes_median(self) -> float:
        return statistics.median(self.bytes_per_turn)

    def cpu_ms(self) -> float:
        return statistics.fmean(self.cpu_ms_per_turn)


async def turn(ws: aiohttp.ClientWebSocketResponse, n: int) -> str:
    """One turn: send, wait for its run_completed (acked, like a client); the assistant's last reply."""
    text = TOOL_TEXT if n % 10 == 0 else TEXT
    await ws.send_str(
        orjson.dumps({"type": "TextMessage", "content": text, "client_msg_id": f"m{n}"}).decode()
    )
    reply = ""
    while True:
        frame = await receive_frame(ws)
        kind = frame.get("type")
        if kind == RUN_COMPLETED:
            await ws.send_str(orjson.dumps({"type": "ack", "seq": frame["seq"]}).decode())
            return reply
        if kind == "TextMessage" and frame.get("source") == "assistant":
            reply = str(frame.get("content"))
        elif kind in ("run_failed", "run_cancelled", "run_interrupted"):
            raise RuntimeError(f"turn {n} did not complete: {frame}")


def proc_write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"no write_bytes for pid {pid}")


async def drive(
    server: Server,
    turns: int,
    window: int,
    written: Callable[[], Awaitable[int]],
    after_window: Callable[[int], Awaitable[None]] | None = None,
) -> tuple[Window, Window, float]:
    """Run ``turns`` turns on one session; the early and late windows and the wall time. ``after_window`` is
    called with the turn number after the last turn of each window."""
    early_first = max(1, EARLY_TURN - window // 2 + 1)
    early = Window(early_first, early_first + window - 1, [], [])
    late = Window(turns - window + 1, turns, [], [])
    session_id = f"long-{uuid.uuid4().hex[:8]}"
    began = time.perf_counter()
    async with http_session() as http:
        url = f"{server.ws_url}?session_id={session_id}&client_id=bench"
        async with http.ws_connect(url, max_msg_size=0) as ws:
            await receive_frame(ws)  # the session frame
            for n in range(1, turns + 1):
                measured = [w for w in (early, late) if w.first <= n <= w.last]
                if measured:
                    bytes_before, cpu_before = await written(), server.cpu_s()
                reply = await turn(ws, n)
                if measured:
                    # Let the finish commit land (the run_completed frame is published after its commit).
                    spent_bytes, spent_cpu = await written() - bytes_before, server.cpu_s() - cpu_before
                    for w in measured:
                        w.bytes_per_turn.append(spent_bytes)
                        w.cpu_ms_per_turn.append(spent_cpu * 1000)
                    if after_window is not None and any(n == w.last for w in measured):
                        await after_window(n)
                if n % 100 == 0:
                    print(
                        f"  turn {n}: {time.perf_counter() - began:.0f} s, reply ends {reply[-20:]!r}",
                        flush=True,
                    )
            if "[context:" not in reply:
                raise RuntimeError(f"unexpected last reply {reply!r}")
    return early, late, time.perf_counter() - began


def report(label: str, early: Window, late: Window, seconds: float, *, median: bool) -> tuple[float, float]:
    """Print one backend's row; (bytes ratio, CPU ratio), late window over early window."""

    def b(w: Window) -> float:
        return w.bytes_median() if median else w.bytes_mean()

    kind = "median" if median else "mean"
    ratio = b(late) / b(early)
    print(
        f"{label:<11} | turns {early.first}-{early.last}: {b(early) / 1024:9.1f} KiB/turn ({kind}), "
        f"{early.cpu_ms():6.1f} ms CPU/turn | turns {late.first}-{late.last}: {b(late) / 1024:9.1f} KiB/turn, "
        f"{late.cpu_ms():6.1f} ms CPU/turn | ratio {ratio:.2f} | {seconds:.0f} s",
        flush=True,
    )
    return ratio, late.cpu_ms() / early.cpu_ms()


async def run_sqlite(folder: Path, team: Path, args: argparse.Namespace) -> tuple[float, float]:
    async with served(folder, "--database", str(folder / "long.db"), "--teams", f"default={team}") as srv:

        async def written() -> int:
            return proc_write_bytes(srv.pid)

        early, late, seconds = await drive(srv, args.turns, args.window, written)
    return report("SQLite FULL", early, late, seconds, median=False)


async def run_pg(folder: Path, team: Path, args: argparse.Namespace, url: str) -> tuple[float, float]:
    import asyncpg

    admin = await asyncpg.connect(url)
    try:
        async with served(folder, "--database", url, "--teams", f"default={team}", name="long-pg") as srv:

            async def written() -> int:
                lsn = await admin.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
                return int(lsn)

            sizes: dict[int, dict[str, tuple[int, int]]] = {}

            async def measure_tables(turn: int) -> None:
                rows = await admin.fetch(TABLE_SIZES, list(GROWING_TABLES))
                sizes[turn] = {r["relname"]: (int(r["bytes"]), int(r["dead"])) for r in rows}

            early, late, seconds = await drive(srv, args.turns, args.window, written, measure_tables)
    finally:
        await admin.close()
    ratios = report("PostgreSQL", early, late, seconds, median=True)
    (first, at_first), (last, at_last) = sorted(sizes.items())
    for table in GROWING_TABLES:
        (b0, d0), (b1, d1) = at_first[table], at_last[table]
        print(
            f"  {table:<13} turn {first}: {b0 / 1024:8.0f} KiB, {d0:5} dead rows | turn {last}: "
            f"{b1 / 1024:8.0f} KiB, {d1:5} dead rows ({GROWING_TABLES[table]})"
        )
    return ratios


# The tables a turn writes (README "Storage and durability"), and how each should behave.
GROWING_TABLES = {
    "sessions": "the state's head, rewritten every turn: bounded",
    "state_pieces": "append-only: grows by each turn's new items",
    "entries": "append-only: the log",
}
TABLE_SIZES = """SELECT c.relname, pg_total_relation_size(c.oid) AS bytes, COALESCE(s.n_dead_tup, 0) AS dead
FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE c.relname = ANY($1::text[]) AND c.relkind = 'r'"""


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=1000, help="turns of the one session (>= 30)")
    parser.add_argument("--window", type=int, default=10, help="turns measured around turn 10 and at the end")
    parser.add_argument("--pg", help="a throwaway PostgreSQL database URL (default: auto on 127.0.0.1:5432)")
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    args = parser.parse_args()
    if args.turns < 3 * args.window:
        parser.error("--turns must be at least 3 x --window")
    print(
        f"one session, {args.turns} turns, default team without typing delay; per turn: bytes written, CPU ms"
    )
    ratios = []
    with tempfile.TemporaryDirectory(prefix="bench-long-") as tmp:
        folder = Path(tmp)
        team = bench_team_file(folder)
        ratios.append(await run_sqlite(folder, team, args))
        if args.pg:
            ratios.append(await run_pg(folder, team, args, args.pg))
        elif not args.no_pg and pg_answers():
            async with throwaway_pg_database() as url:
                ratios.append(await run_pg(folder, team, args, url))
    print(f"ratio turn{args.turns}/turn{EARLY_TURN} cpu_ms_per_turn = {max(r[1] for r in ratios):.2f}")
    print(f"ratio turn{args.turns}/turn{EARLY_TURN} bytes_per_turn = {max(r[0] for r in ratios):.2f}")


if __name__ == "__main__":
    asyncio.run(main())
