# ruff: noqa: E402
"""End-to-end benchmark: real ``python -m service serve`` processes, real WebSocket clients, loopback only.

1. Turns: ``--clients`` WebSocket clients on their own sessions each send ``--turns`` messages, one at a time
   (send, wait for that turn's ``run_completed``, ack it, send the next), against memory://, a SQLite file and
   (when reachable) PostgreSQL, also with two instances on one PostgreSQL database. turns/s, p50/p99 latency
   from send to ``run_completed``, and the server's CPU time per turn (the service is CPU-bound on this machine,
   so that column explains the turns/s). The team is the shipped default team with the demo model's chunk delay
   set to 0 (a copy passed as ``--teams default=<file>``): with its 30 ms per streamed word a turn takes ~0.3 s
   and the pauses, not the service, would be measured. memory:// and SQLite alternate ``--rounds`` times and the
   best run of each is shown, so a neighbour's burst of CPU does not decide their ratio.
   ``--workers 8`` per process: 50 sessions each with one input at a time keep 8 slots busy, and one process
   runs on one core anyway (more slots would only interleave more runs on it).
2. Replay: a fresh WebSocket replaying a ``--replay``-entry session vs a plain aiohttp WebSocket server (in this
   process) sending the same pre-serialised frames.
3. Idle: ``--idle`` idle WebSocket connections, the server's VmRSS before and after.

    python bench/e2e.py [--clients 50] [--turns 20] [--workers 8] [--replay 10000] [--idle 1000]
                        [--pg postgresql://... | --no-pg]

Without ``--pg``, a throwaway database is created (and dropped) when PostgreSQL answers on 127.0.0.1:5432.
The last line is ``ratio sqlite/memory turns_per_s = X.XX``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ comes first on sys.path, where bench/queue.py would shadow the standard library's queue.
# Put it last (for _server) and the project root first.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if p and Path(p).resolve() != _HERE), str(_HERE)]

import argparse
import asyncio
import logging
import resource
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from _server import Server, served
from aiohttp import web

from service.models import RUN_COMPLETED, NewEntry, lifecycle
from service.queue import open_store
from service.worker.teams import DEFAULT_TEAM_FILE

OWNER = "local"  # auth none: every request is user 'local'
RECEIVE_TIMEOUT_S = 30.0
SCENARIO_TIMEOUT_S = 120.0
TEXT = "please tell me something about the weather in Lisbon today"


# --- helpers -------------------------------------------------------------------------------------------------


def bench_team_file(folder: Path) -> Path:
    """The shipped default team with every ``chunk_delay_s`` set to 0."""

    def zero_delays(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: 0.0 if k == "chunk_delay_s" else zero_delays(v) for k, v in node.items()}
        if isinstance(node, list):
            return [zero_delays(v) for v in node]
        return node

    path = folder / "bench_team.json"
    path.write_bytes(orjson.dumps(zero_delays(orjson.loads(DEFAULT_TEAM_FILE.read_bytes()))))
    return path


def safe_name(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def receive_frame(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    try:
        msg = await ws.receive(timeout=RECEIVE_TIMEOUT_S)
    except TimeoutError as exc:
        raise RuntimeError(f"no frame within {RECEIVE_TIMEOUT_S:.0f} s") from exc
    if msg.type != aiohttp.WSMsgType.TEXT:
        raise RuntimeError(f"unexpected websocket message {msg.type!r}: {msg.data!r}")
    frame: dict[str, Any] = orjson.loads(msg.data)
    if frame.get("type") == "error":
        raise RuntimeError(f"error frame: {frame}")
    return frame


def http_session() -> aiohttp.ClientSession:
    # No connection cap: every WebSocket holds its connection for its whole life.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


# --- 1. turns ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnResult:
    label: str
    turns: int
    seconds: float
    server_cpu_s: float  # user + system time of the server process(es) during the measured turns
    latencies_s: list[float]

    @property
    def turns_per_s(self) -> float:
        return self.turns / self.seconds


async def one_turn(ws: aiohttp.ClientWebSocketResponse, msg_id: str) -> tuple[float, dict[str, Any]]:
    """Send one message; the seconds until its run_completed, and the assistant's reply of that turn."""
    began = time.perf_counter()
    await ws.send_str(
        orjson.dumps({"type": "TextMessage", "content": TEXT, "client_msg_id": msg_id}).decode()
    )
    reply: dict[str, Any] = {}
    while True:
        frame = await receive_frame(ws)
        kind = frame.get("type")
        if kind == RUN_COMPLETED:
            elapsed = time.perf_counter() - began
            # Like a real client: keep the server-side cursor up to date once per turn.
            await ws.send_str(orjson.dumps({"type": "ack", "seq": frame["seq"]}).decode())
            return elapsed, reply
        if kind == "TextMessage" and frame.get("source") == "assistant":
            reply = frame
        elif kind in ("run_failed", "run_cancelled", "run_interrupted"):
            raise RuntimeError(f"turn {msg_id} did not complete: {frame}")


class StartGate:
    """Every client warms up (connects, one turn), then all start their measured turns together."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.ready = 0
        self.all_ready = asyncio.Event()
        self.go = asyncio.Event()

    async def arrive(self) -> None:
        self.ready += 1
        if self.ready == self.clients:
            self.all_ready.set()
        await self.go.wait()


async def client_turns(
    http: aiohttp.ClientSession, ws_url: str, session_id: str, turns: int, gate: StartGate
) -> list[float]:
    async with http.ws_connect(f"{ws_url}?session_id={session_id}&client_id=bench") as ws:
        hello = await receive_frame(ws)
        if hello.get("type") != "session":
            raise RuntimeError(f"expected the session frame, got {hello}")
        await one_turn(ws, "warm")
        await gate.arrive()
        latencies: list[float] = []
        reply: dict[str, Any] = {}
        for t in range(turns):
            elapsed, reply = await one_turn(ws, f"m{t}")
            latencies.append(elapsed)
        # The team remembered every message of the session, the warm-up turn included.
        if not str(reply.get("content", "")).endswith(f"[context: {turns + 1}]"):
            raise RuntimeError(f"{session_id}: unexpected last reply {reply.get('content')!r}")
        return latencies


async def run_turns(label: str, servers: list[Server], clients: int, turns: int) -> TurnResult:
    """``clients`` clients spread round robin over ``servers``; wall time (and the servers' CPU time) from the
    common start to the last run_completed."""
    ws_urls = [s.ws_url for s in servers]
    gate = StartGate(clients)
    tag = uuid.uuid4().hex[:8]
    async with http_session() as http:
        tasks = [
            asyncio.create_task(client_turns(http, ws_urls[i % len(ws_urls)], f"t{tag}-{i}", turns, gate))
            for i in range(clients)
        ]
        try:
            ready = asyncio.create_task(gate.all_ready.wait())
            done, _ = await asyncio.wait(
                [ready, *tasks], timeout=SCENARIO_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
            if ready not in done:
                ready.cancel()
                failed = [t for t in tasks if t.done()]
                if failed:
                    failed[0].result()  # re-raises the client's error
                raise TimeoutError(f"{label}: clients not ready after {SCENARIO_TIMEOUT_S:.0f} s")
            began, cpu_before = time.perf_counter(), sum(s.cpu_s() for s in servers)
            gate.go.set()
            per_client = await asyncio.wait_for(asyncio.gather(*tasks), SCENARIO_TIMEOUT_S)
            seconds = time.perf_counter() - began
            server_cpu_s = sum(s.cpu_s() for s in servers) - cpu_before
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    latencies = [x for client in per_client for x in client]
    return TurnResult(label, len(latencies), seconds, server_cpu_s, latencies)


def print_turns(results: list[TurnResult], args: argparse.Namespace) -> None:
    print(
        f"\n1. turns: {args.clients} WebSocket clients x {args.turns} messages, own sessions, "
        f"--workers {args.workers} per process (memory/SQLite: best of {args.rounds})"
    )
    print(
        f"{'backend':<24} {'turns':>6} {'seconds':>8} {'turns/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'server CPU ms/turn':>18}"
    )
    for r in results:
        p50, p99 = percentile(r.latencies_s, 0.50) * 1000, percentile(r.latencies_s, 0.99) * 1000
        cpu_ms = r.server_cpu_s * 1000 / r.turns
        print(
            f"{r.label:<24} {r.turns:>6} {r.seconds:>8.2f} {r.turns_per_s:>8.1f} {p50:>8.1f} {p99:>8.1f} "
            f"{cpu_ms:>18.1f}"
        )


# --- 2. replay -----------------------------------------------------------------------------------------------

REPLAY_SESSION = "replay"
APPEND_BATCH = 500


async def build_replay_db(path: Path, entries: int) -> list[str]:
    """A SQLite file with one session of exactly ``entries`` entries (one finished run, nothing queued), made
    with the store API before any server runs; the frames the server will send for them, serialised as it does."""
    store = open_store(str(path))
    await store.open()
    try:
        await store.enqueue(OWNER, REPLAY_SESSION, TEXT, "r0")
        claim = await store.claim("bench", 600.0)
        if claim is None:
            raise RuntimeError("the replay input was not claimable")
        details = {"input_seq": claim.input_seq, "attempt": claim.attempt}
        body = entries - 3  # the user's message, run_started (written by the claim) and run_completed
        for first in range(0, body, APPEND_BATCH):
            batch = [
                NewEntry(
                    "TextMessage",
                    "assistant",
                    f"Reply part {i}: the weather in Lisbon is mild and sunny, about 21 degrees.",
                    {"id": str(uuid.uuid4()), "models_usage": {"prompt_tokens": 40, "completion_tokens": 16}},
                )
                for i in range(first, min(body, first + APPEND_BATCH))
            ]
            await store.append(claim, batch)
        await store.finish(
            claim, lifecycle(RUN_COMPLETED, "Run completed.", stop_reason="bench", **details), None
        )
        frames: list[str] = []
        after = 0
        while len(frames) < entries:
            page = await store.read_log(REPLAY_SESSION, after=after, limit=1000)
            if not page.messages:
                raise RuntimeError(f"replay session has {len(frames)} entries, expected {entries}")
            frames += [orjson.dumps(e.to_json()).decode() for e in page.messages]
            after = page.messages[-1].seq
        return frames
    finally:
        await store.close()


@asynccontextmanager
async def raw_server(frames: list[str]) -> AsyncIterator[str]:
    """A plain aiohttp WebSocket server in this process: the session frame, then ``frames`` as they are."""
    hello = orjson.dumps(
        {
            "type": "session",
            "session_id": REPLAY_SESSION,
            "status": "idle",
            "last_seq": len(frames),
            "replay_from": 0,
        }
    ).decode()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(hello)
        for frame in frames:
            await ws.send_str(frame)
        await ws.receive()  # until the client closes
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}/ws"
    finally:
        await runner.cleanup()


async def replay_once(http: aiohttp.ClientSession, url: str, entries: int) -> float:
    """Seconds from connecting to the last entry of the log, checking seqs arrive 1, 2, 3, ..."""
    began = time.perf_counter()
    async with http.ws_connect(url) as ws:
        hello = await receive_frame(ws)
        if hello.get("type") != "session":
            raise RuntimeError(f"expected the session frame, got {hello}")
        expected = 1
        while expected <= entries:
            frame = await receive_frame(ws)
            if frame.get("seq") != expected:
                raise RuntimeError(f"replay: expected seq {expected}, got {frame.get('seq')}")
            expected += 1
        return time.perf_counter() - began


async def best_replay(url: str, entries: int, repeats: int) -> float:
    async with http_session() as http:
        times = [
            await asyncio.wait_for(replay_once(http, url, entries), SCENARIO_TIMEOUT_S)
            for _ in range(repeats)
        ]
    return min(times)


# --- 3. idle connections -------------------------------------------------------------------------------------

CONNECT_CONCURRENCY = 50


@dataclass(frozen=True)
class IdleResult:
    connections: int
    rss_before_kib: int
    rss_after_kib: int
    connect_s: float

    @property
    def kib_per_connection(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / self.connections


async def run_idle(server: Server, count: int) -> IdleResult:
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
    async with http_session() as http:

        async def connect(i: int) -> None:
            async with limit:
                ws = await http.ws_connect(f"{server.ws_url}?session_id=idle-{i}")
                sockets.append(ws)
                await receive_frame(ws)

        try:
            # Warm the code paths (imports, first allocations) so "before" is a served process, not a fresh one.
            for i in range(3):
                await connect(-1 - i)
            await asyncio.sleep(0.5)  # let the server settle before sampling memory
            before = server.rss_kib()
            began = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(connect(i) for i in range(count))), SCENARIO_TIMEOUT_S)
            connect_s = time.perf_counter() - began
            await asyncio.sleep(0.5)
            after = server.rss_kib()
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return IdleResult(count, before, after, connect_s)


def raise_fd_limit(needed: int) -> None:
    """Both ends of every idle connection live on this machine; the server inherits this process's limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# --- 4. PostgreSQL -------------------------------------------------------------------------------------------

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def pg_answers(host: str = "127.0.0.1", port: int = 5432) -> bool:
    with suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


DROP_ATTEMPTS = 5


async def pg_admin(sql: str) -> None:
    import asyncpg

    admin = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        await admin.execute(sql)
    finally:
        await admin.close()


@asynccontextmanager
async def throwaway_pg_database() -> AsyncIterator[str]:
    """A fresh database, dropped afterwards (a fresh admin connection each time: the server may have restarted)."""
    name = f"bench_e2e_{uuid.uuid4().hex[:12]}"
    await pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        for attempt in range(1, DROP_ATTEMPTS + 1):
            try:
                await pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                break
            except Exception as exc:  # any driver or network error: try again, then say what is left behind
                if attempt == DROP_ATTEMPTS:
                    print(f"could not drop the PostgreSQL database {name}: {exc!r}", file=sys.stderr)
                else:
                    await asyncio.sleep(1.0)


async def pg_rows(folder: Path, args: argparse.Namespace, team: Path) -> list[TurnResult]:
    """The PostgreSQL rows: one instance, then two instances on the same database (clients split over both)."""

    async def both(url: str) -> list[TurnResult]:
        one = await turns_on(folder, "postgresql x1", url, args, team)
        two = await turns_on(folder, "postgresql x2 instances", url, args, team, instances=2)
        return [one, two]

    if args.pg is not None:
        return await both(args.pg)
    if args.no_pg or not pg_answers():
        return []
    try:
        async with throwaway_pg_database() as url:
            return await both(url)
    except Exception as exc:  # found by probing, PostgreSQL is optional: report and go on
        print(f"PostgreSQL rows skipped: {type(exc).__name__}: {str(exc)[-400:]}", file=sys.stderr)
        return []


# --- main ----------------------------------------------------------------------------------------------------


async def turns_on(
    folder: Path, label: str, database: str, args: argparse.Namespace, team: Path, instances: int = 1
) -> TurnResult:
    common = ["--database", database, "--workers", str(args.workers), "--teams", f"default={team}"]
    async with AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(served(folder, *common, name=f"{safe_name(label)}-{i}"))
            for i in range(instances)
        ]
        return await run_turns(label, servers, args.clients, args.turns)


async def memory_and_sqlite(folder: Path, args: argparse.Namespace, team: Path) -> list[TurnResult]:
    """The two rows of the ratio, alternated ``--rounds`` times, best of each: on a shared 2-core machine a
    neighbour's burst of CPU should not decide the ratio."""
    memory: list[TurnResult] = []
    sqlite: list[TurnResult] = []
    for n in range(args.rounds):
        memory.append(await turns_on(folder, "memory://", "memory://", args, team))
        sqlite.append(await turns_on(folder, "sqlite (FULL)", str(folder / f"turns{n}.db"), args, team))
    return [max(memory, key=lambda r: r.turns_per_s), max(sqlite, key=lambda r: r.turns_per_s)]


async def replay_section(folder: Path, args: argparse.Namespace) -> None:
    frames = await build_replay_db(folder / "replay.db", args.replay)
    database = str(folder / "replay.db")
    async with served(folder, "--database", database, "--workers", "1", name="replay") as srv:
        url = f"{srv.ws_url}?session_id={REPLAY_SESSION}"
        service_s = await best_replay(url, args.replay, args.replay_repeats)
    async with raw_server(frames) as url:
        raw_s = await best_replay(url, args.replay, args.replay_repeats)
    service_rate, raw_rate = args.replay / service_s, args.replay / raw_s
    print(
        f"\n2. replay of a {args.replay}-entry session to a fresh WebSocket (best of {args.replay_repeats})"
    )
    print(f"{'sender':<32} {'seconds':>8} {'entries/s':>10}")
    print(f"{'service (SQLite, replay + live)':<32} {service_s:>8.3f} {service_rate:>10.0f}")
    print(f"{'raw aiohttp, pre-serialised':<32} {raw_s:>8.3f} {raw_rate:>10.0f}")
    print(f"ratio service/raw entries_per_s = {service_rate / raw_rate:.2f}")


async def idle_section(folder: Path, args: argparse.Namespace) -> None:
    async with served(folder, "--database", str(folder / "idle.db"), name="idle") as srv:
        idle = await run_idle(srv, args.idle)
    print(f"\n3. {idle.connections} idle WebSocket connections (SQLite, default settings), server VmRSS")
    print(f"{'before KiB':>10} {'after KiB':>10} {'KiB/conn':>9} {'connect s':>10}")
    print(
        f"{idle.rss_before_kib:>10} {idle.rss_after_kib:>10} {idle.kib_per_connection:>9.1f} "
        f"{idle.connect_s:>10.2f}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument(
        "--rounds", type=int, default=3, help="memory/SQLite runs, alternated (best is shown)"
    )
    parser.add_argument("--replay", type=int, default=10_000)
    parser.add_argument("--replay-repeats", type=int, default=3)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--pg", help="a throwaway PostgreSQL database URL (default: auto on 127.0.0.1:5432)")
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    args = parser.parse_args()
    # SIGTERM cancels the bench like Ctrl-C does, so the finally blocks still stop the servers.
    main_task = asyncio.current_task()
    if main_task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    raise_fd_limit(2 * args.idle + 1024)

    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        folder = Path(tmp)
        team = bench_team_file(folder)
        results = await memory_and_sqlite(folder, args, team)
        results += await pg_rows(folder, args, team)
        print_turns(results, args)

        await replay_section(folder, args)
        await idle_section(folder, args)

    memory, sqlite = results[0], results[1]
    print(f"\nratio sqlite/memory turns_per_s = {sqlite.turns_per_s / memory.turns_per_s:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
