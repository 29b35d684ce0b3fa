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
4. Streaming (README "Streaming"): ``--stream-clients`` WebSocket clients x ``--stream-turns`` messages on a SQLite
   file, the shipped default team at its NORMAL speed (one word per chunk, 30 ms apart; a 39-chunk reply takes
   ~1.1 s) and as many worker slots as clients, so every client's reply streams at once. Every turn the client
   drops its WebSocket in the middle of the reply and reconnects with ``after`` = its last seq (a reloaded page):
   the time from that reconnect to the resumed chunk (``"resumed": true``, the text so far) is measured, and the
   text is checked (resumed + live chunks = the durable reply). Run with drafts saved every 0.25 s (the default
   ``--draft-interval-s``) and with them off (``0``), alternated ``--stream-rounds`` times; its table ends with
   ``ratio drafts/no_drafts turns_per_s = X.XX``.

    python bench/e2e.py [--clients 50] [--turns 20] [--workers 8] [--replay 10000] [--idle 1000]
                        [--pg postgresql://... | --no-pg] [--stream-clients 50] [--stream-turns 6]
                        [--stream-rounds 2] [--only turns|replay|idle|streaming ...]

Without ``--pg``, a throwaway database is created (and dropped) when PostgreSQL answers on 127.0.0.1:5432.
``--only streaming`` runs just section 4 (~1 minute). When section 1 runs, the last line is
``ratio sqlite/memory turns_per_s = X.XX``.
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
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import orjson
from _server import Server, served
from aiohttp import web

from service.models import CHUNK, RUN_COMPLETED, NewEntry, lifecycle
from service.queue import open_store
from service.worker.teams import DEFAULT_TEAM_FILE

OWNER = "local"  # auth none: every request is user 'local'
RECEIVE_TIMEOUT_S = 30.0
SCENARIO_TIMEOUT_S = 120.0
TEXT = "please tell me something about the weather in Lisbon today"
T = TypeVar("T")
SECTIONS = ("turns", "replay", "idle", "streaming")


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


async def run_clients(
    label: str,
    servers: list[Server],
    clients: int,
    client: Callable[[aiohttp.ClientSession, str, str, StartGate], Coroutine[Any, Any, T]],
) -> tuple[list[T], float, float]:
    """``clients`` clients spread round robin over ``servers``, each on its own session; what each returned, the
    wall time from the common start to the last one's end, and the servers' CPU seconds in that time."""
    ws_urls = [s.ws_url for s in servers]
    gate = StartGate(clients)
    tag = uuid.uuid4().hex[:8]
    async with http_session() as http:
        tasks = [
            asyncio.create_task(client(http, ws_urls[i % len(ws_urls)], f"t{tag}-{i}", gate))
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
    return per_client, seconds, server_cpu_s


async def run_turns(label: str, servers: list[Server], clients: int, turns: int) -> TurnResult:
    """``clients`` clients, ``turns`` turns each; wall time (and the servers' CPU time) from the common start to
    the last run_completed."""

    def client(
        http: aiohttp.ClientSession, ws_url: str, session_id: str, gate: StartGate
    ) -> Coroutine[Any, Any, list[float]]:
        return client_turns(http, ws_url, session_id, turns, gate)

    per_client, seconds, server_cpu_s = await run_clients(label, servers, clients, client)
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


# --- 5. streaming --------------------------------------------------------------------------------------------

# 35 words: the demo model's reply ("You said: ... [context: N]") streams as 39 one-word chunks, 30 ms apart.
STREAM_TEXT = (
    "please tell me a long story about the weather in Lisbon today: the wind from the ocean, the light on the "
    "river, the trams climbing the hills and the smell of coffee in the morning"
)
FIRST_CUT = 3  # a client reconnects after chunk FIRST_CUT .. FIRST_CUT + CUT_SPREAD - 1 of the reply
CUT_SPREAD = 16


@dataclass
class StreamStats:
    latencies_s: list[float] = field(default_factory=list)  # send -> run_completed
    resumes_s: list[float] = field(default_factory=list)  # start of the reconnect -> the resumed chunk
    missed: int = 0  # reconnects that found the reply already committed (nothing in flight to resume)


class StreamClient:
    """One session's client: every turn it drops its WebSocket in the middle of the streamed reply (after chunk
    ``cut``) and reconnects with ``after`` = the last seq it saw, like a reloaded page. It checks what the protocol
    promises: seqs +1, the resumed chunk holds the text so far (a superset of what it had), live chunks continue
    it at their offset, and the durable reply is exactly the streamed text."""

    def __init__(self, http: aiohttp.ClientSession, ws_url: str, session_id: str) -> None:
        self.http, self.ws_url, self.session_id = http, ws_url, session_id
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.last_seq = 0

    async def connect(self) -> None:
        url = f"{self.ws_url}?session_id={self.session_id}&client_id=bench&after={self.last_seq}"
        self.ws = await self.http.ws_connect(url)
        hello = await receive_frame(self.ws)
        if hello.get("type") != "session":
            raise RuntimeError(f"expected the session frame, got {hello}")

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()

    async def frame(self) -> dict[str, Any]:
        assert self.ws is not None
        frame = await receive_frame(self.ws)
        seq = frame.get("seq")
        if isinstance(seq, int) and frame.get("type") != "ack":  # a log entry (an ack frame echoes a seq)
            if seq != self.last_seq + 1:
                raise RuntimeError(f"{self.session_id}: seq {seq} after {self.last_seq}")
            self.last_seq = seq
        return frame

    async def turn(self, msg_id: str, cut: int, stats: StreamStats | None) -> str:
        """One message: send, reconnect mid-reply, follow to run_completed (ack it). The reply's text."""
        assert self.ws is not None
        began = time.perf_counter()
        message = {"type": "TextMessage", "content": STREAM_TEXT, "client_msg_id": msg_id}
        await self.ws.send_str(orjson.dumps(message).decode())
        text, message_id, chunks = "", None, 0
        reconnected_at: float | None = None  # set until the first frame of the new connection
        while True:
            frame = await self.frame()
            kind = frame.get("type")
            if kind == CHUNK:
                if reconnected_at is not None:
                    if not frame.get("resumed") or frame.get("full_message_id") != message_id:
                        raise RuntimeError(f"{self.session_id}: expected the resumed chunk, got {frame}")
                    if stats is not None:
                        stats.resumes_s.append(time.perf_counter() - reconnected_at)
                    reconnected_at = None
                elif frame.get("full_message_id") != message_id:  # the reply's first chunk
                    text, message_id = "", frame.get("full_message_id")
                offset, content = frame["offset"], frame["content"]
                if offset > len(text) or not content.startswith(text[offset:]):
                    raise RuntimeError(f"{self.session_id}: chunk at {offset} does not continue {text!r}")
                text = text[:offset] + content
                chunks += 1
                if chunks == cut:  # drop the connection mid-reply, come back like a reloaded page
                    await self.close()
                    reconnected_at = time.perf_counter()
                    await self.connect()
            elif kind == "TextMessage" and frame.get("source") == "assistant":
                if reconnected_at is not None:  # committed before the new connection went live
                    if stats is not None:
                        stats.missed += 1
                    reconnected_at = None
                    text = frame["content"]
                if frame.get("metadata", {}).get("id") != message_id or frame.get("content") != text:
                    raise RuntimeError(
                        f"{self.session_id}: durable reply {frame} is not the streamed {text!r}"
                    )
            elif kind == RUN_COMPLETED:
                if stats is not None:
                    stats.latencies_s.append(time.perf_counter() - began)
                assert self.ws is not None
                await self.ws.send_str(orjson.dumps({"type": "ack", "seq": frame["seq"]}).decode())
                return text
            elif kind in ("run_failed", "run_cancelled", "run_interrupted"):
                raise RuntimeError(f"turn {msg_id} did not complete: {frame}")


async def client_streams(
    http: aiohttp.ClientSession, ws_url: str, session_id: str, turns: int, gate: StartGate
) -> StreamStats:
    client = StreamClient(http, ws_url, session_id)
    stats = StreamStats()
    spread = int(session_id.rsplit("-", 1)[1])  # clients reconnect at different chunks
    try:
        await client.connect()
        await client.turn("warm", FIRST_CUT, None)
        await gate.arrive()
        reply = ""
        for t in range(turns):
            cut = FIRST_CUT + (spread * 5 + t * 7) % CUT_SPREAD
            reply = await client.turn(f"m{t}", cut, stats)
        if not reply.endswith(f"[context: {turns + 1}]"):
            raise RuntimeError(f"{session_id}: unexpected last reply {reply!r}")
    finally:
        await client.close()
    return stats


@dataclass(frozen=True)
class StreamResult:
    turns: TurnResult
    resumes_s: list[float]
    missed: int


async def streaming_once(
    folder: Path, label: str, draft_interval_s: str, args: argparse.Namespace, n: int
) -> StreamResult:
    common = ["--workers", str(args.stream_clients), "--draft-interval-s", draft_interval_s]
    database = str(folder / f"stream-{safe_name(label)}-{n}.db")
    async with served(folder, "--database", database, *common, name=f"stream-{safe_name(label)}-{n}") as srv:

        def client(
            http: aiohttp.ClientSession, ws_url: str, session_id: str, gate: StartGate
        ) -> Coroutine[Any, Any, StreamStats]:
            return client_streams(http, ws_url, session_id, args.stream_turns, gate)

        per_client, seconds, server_cpu_s = await run_clients(label, [srv], args.stream_clients, client)
    latencies = [x for c in per_client for x in c.latencies_s]
    resumes = [x for c in per_client for x in c.resumes_s]
    missed = sum(c.missed for c in per_client)
    return StreamResult(TurnResult(label, len(latencies), seconds, server_cpu_s, latencies), resumes, missed)


async def streaming_section(folder: Path, args: argparse.Namespace) -> None:
    """Drafts saved every 0.25 s (the default) vs not saved, alternated ``--stream-rounds`` times; turns/s and
    latency from the best run of each, server CPU per turn and resume times from all runs of each."""
    modes = [("drafts every 0.25 s", "0.25"), ("drafts off (0)", "0")]
    runs: dict[str, list[StreamResult]] = {label: [] for label, _ in modes}
    for n in range(args.stream_rounds):
        for label, interval in modes:
            runs[label].append(await streaming_once(folder, label, interval, args, n))
    print(
        f"\n4. streaming: {args.stream_clients} WebSocket clients x {args.stream_turns} messages, the default "
        f"team at its normal speed (one word per chunk, 30 ms apart; {STREAM_TEXT.count(' ') + 5} chunks per "
        f"reply), SQLite FULL, --workers {args.stream_clients}; every turn reconnects once mid-reply "
        f"(turns/s, p50/p99: best of {args.stream_rounds}; server CPU and resume times: all runs)"
    )
    print(
        f"{'mode':<20} {'turns':>6} {'turns/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/turn':>11} "
        f"{'resumes':>8} {'resume p50 ms':>13} {'resume p99 ms':>13} {'missed':>6}"
    )
    best: list[TurnResult] = []
    for label, _ in modes:
        results = runs[label]
        r = max((x.turns for x in results), key=lambda t: t.turns_per_s)
        best.append(r)
        resumes = [x for res in results for x in res.resumes_s]
        missed = sum(res.missed for res in results)
        cpu_ms = sum(x.turns.server_cpu_s for x in results) * 1000 / sum(x.turns.turns for x in results)
        p50, p99 = percentile(r.latencies_s, 0.50) * 1000, percentile(r.latencies_s, 0.99) * 1000
        r50 = percentile(resumes, 0.50) * 1000 if resumes else float("nan")
        r99 = percentile(resumes, 0.99) * 1000 if resumes else float("nan")
        print(
            f"{label:<20} {r.turns:>6} {r.turns_per_s:>8.1f} {p50:>8.1f} {p99:>8.1f} "
            f"{cpu_ms:>11.1f} {len(resumes):>8} {r50:>13.1f} {r99:>13.1f} {missed:>6}"
        )
    print(f"ratio drafts/no_drafts turns_per_s = {best[0].turns_per_s / best[1].turns_per_s:.2f}")


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
    parser.add_argument(
        "--stream-clients", type=int, default=50, help="streaming: clients (and worker slots)"
    )
    parser.add_argument("--stream-turns", type=int, default=6, help="streaming: messages per client")
    parser.add_argument(
        "--stream-rounds",
        type=int,
        default=2,
        help="streaming: runs of each mode, alternated (best is shown)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run only this section (repeatable; default: all of them)",
    )
    args = parser.parse_args()
    sections = args.only or list(SECTIONS)
    # SIGTERM cancels the bench like Ctrl-C does, so the finally blocks still stop the servers.
    main_task = asyncio.current_task()
    if main_task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    raise_fd_limit(2 * args.idle + 1024)

    results: list[TurnResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        folder = Path(tmp)
        if "turns" in sections:
            team = bench_team_file(folder)
            results = await memory_and_sqlite(folder, args, team)
            results += await pg_rows(folder, args, team)
            print_turns(results, args)
        if "replay" in sections:
            await replay_section(folder, args)
        if "idle" in sections:
            await idle_section(folder, args)
        if "streaming" in sections:
            await streaming_section(folder, args)

    if results:
        memory, sqlite = results[0], results[1]
        print(f"\nratio sqlite/memory turns_per_s = {sqlite.turns_per_s / memory.turns_per_s:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
