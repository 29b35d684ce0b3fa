"""One clock on PostgreSQL (README "Deploying on PostgreSQL"): two instances on one database, B's clock 45 s ahead.

B runs under libfaketime (``FAKETIME=+45s``, the monotonic clock left alone, as ``faketime -f +45s
--exclude-monotonic`` does; preloaded directly rather than through the ``faketime`` wrapper, which forks, so that
SIGKILL and SIGSTOP reach the server itself). Only B's wall clock is wrong: its HTTP ``Date`` header proves it.

1. A live run on A (lease 3 s, heartbeat 1 s) is not taken over by B's lease recovery.
2. A retry's backoff, started on A, is not cut short by B: B claims the retry only once the database's ``now()``
   has passed the input's ``not_before``.
3. B's LISTEN connection is cut while A commits a whole run; B's catch-up window (the database's clock) still
   covers it, so a WebSocket client on B receives every entry, with no gap.

Each test fails when the service judges time by the instance's clock. Checked with a scratch copy of the service
whose PostgresStore adds the instance's clock skew (``time.time()`` minus the database's ``clock_timestamp()``,
measured at open) to every database time, so every time in SQL became the instance's clock:
1. fails: the log reads run_started, run_interrupted, run_started (attempt 2), run_completed: B re-queued A's
   live run.
2. fails: "B claimed the retry 14.5 s before its not_before (database clock)", at once after B started.
3. fails: the client on B never gets the second run (timeout): the catch-up looked back from 45 s ahead. It fails
   the same way with only ``since`` in notify.py's ``_supervise`` taken from ``datetime.now(UTC)`` (one place).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from service.queue.postgres.notify import LISTEN_APPLICATION
from tests.server import ServerProcess, start_server
from tests.test_multi_instance import (
    WsClient,
    assert_contiguous,
    count,
    first_run,
    post_message,
    read_log,
    replies,
    runner_of,
    sse_until,
)
from tests.web import durable

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

LIBFAKETIME = next(
    iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"))),
    Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"),
)
SKEW_S = 45
FAST = ("--lease-s", "3", "--heartbeat-s", "1", "--poll-interval-s", "0.2", "--grace-s", "0.5")
BACKOFF_S = 15.0  # the retry's delay: well under the skew, so a clock 45 s ahead would skip it entirely
WAIT_S = 40.0  # bound on a wait for an event (a hang guard, never a performance assertion)


def skewed_env() -> dict[str, str]:
    """The environment of a process whose wall clock is SKEW_S ahead (its monotonic clock is the true one)."""
    # `make test` installs Debian's faketime when missing (Makefile, target tools): a missing one is a failure.
    assert LIBFAKETIME.exists(), f"needs libfaketime ({LIBFAKETIME}; Debian package faketime: make tools)"
    return {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME": f"+{SKEW_S}s",
        "DONT_FAKE_MONOTONIC": "1",  # the name this libfaketime reads; the next one is the newer name
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


# --- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture
def servers(tmp_path: Path, pg_url: str) -> Iterator[Callable[..., ServerProcess]]:
    """start(name, *args, skewed=False) -> a server on the test's database; every one is killed at the end."""
    started: list[ServerProcess] = []

    def start(name: str, *args: str, skewed: bool = False) -> ServerProcess:
        home = tmp_path / name
        home.mkdir(exist_ok=True)
        env = skewed_env() if skewed else None
        server = start_server(home, "--database", pg_url, *args, env=env)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            if server.proc is not None and server.proc.poll() is None:
                server.proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
            server.kill()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_url)
    try:
        yield conn
    finally:
        await conn.close()


# --- helpers --------------------------------------------------------------------------------------------------
async def server_clock(http: aiohttp.ClientSession, server: ServerProcess) -> datetime:
    async with http.get(f"{server.url}/healthz") as response:
        return parsedate_to_datetime(response.headers["Date"])


async def start_skewed(
    http: aiohttp.ClientSession, start: Callable[..., ServerProcess], reference: ServerProcess, *args: str
) -> ServerProcess:
    """Instance B, its wall clock SKEW_S ahead of ``reference``'s (checked: else the test would prove nothing)."""
    b = await asyncio.to_thread(start, "b", *args, skewed=True)
    ahead = (await server_clock(http, b) - await server_clock(http, reference)).total_seconds()
    assert SKEW_S - 2 <= ahead <= SKEW_S + 2, (
        f"B's clock is {ahead} s ahead, not {SKEW_S}: libfaketime inactive?"
    )
    return b


def socket_ports(pid: int) -> set[int]:
    """Local TCP ports of the process's sockets (from /proc: its socket inodes, matched in /proc/net/tcp)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


# --- 1. B's recovery does not take over A's live run ----------------------------------------------------------
async def test_a_skewed_instance_does_not_take_over_a_live_run(
    servers: Callable[..., ServerProcess], http: aiohttp.ClientSession, pg_url: str
) -> None:
    a = servers("a", *FAST)
    status, _ = await post_message(http, a, "live", "[[sleep:8]] keep me", "m1")
    assert status == 202
    run = await first_run(http, a, "live")  # only A runs: it claimed the input
    # B recovers expired leases at start (before it listens) and every lease_s while A's run goes on.
    b = await start_skewed(http, servers, a, *FAST)
    assert count(await read_log(http, a, "live"), "run_completed") == 0  # B started during the run

    log = await sse_until(http, b, "live", lambda es: count(es, "run_completed") == 1)
    assert_contiguous(log)
    assert [(e["type"], e.get("attempt")) for e in log if e["type"].startswith("run_")] == [
        ("run_started", 1),
        ("run_completed", 1),
    ]
    assert await runner_of(pg_url, run["run_id"], [a, b]) is a
    [text] = replies(log)
    assert "keep me" in text
    assert "re-queued" not in b.output()


# --- 2. B honours a backoff started on A -------------------------------------------------------------------------
async def test_a_skewed_instance_waits_for_the_backoff_by_the_database_clock(
    servers: Callable[..., ServerProcess], http: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    args = (*FAST, "--retry-base-delay-s", str(BACKOFF_S))
    a = servers("a", *args)
    status, _ = await post_message(http, a, "retry", "[[fail]] later", "m1")
    assert status == 202
    await sse_until(http, a, "retry", lambda es: count(es, "run_failed") == 1)
    not_before = await db.fetchval("SELECT not_before FROM inputs WHERE session_id = 'retry'")
    b = await start_skewed(http, servers, a, *args)
    a.kill()  # only B may claim the retry now
    margin = (not_before - await db.fetchval("SELECT clock_timestamp()")).total_seconds()
    assert margin > 5, f"B started too late to be tempted ({margin:.1f} s of backoff left)"

    # Watch the database: is attempt 2 started, and what does the database's clock read?
    started_at = None
    async with asyncio.timeout(WAIT_S):
        while started_at is None:
            now, started_at = await db.fetchrow(
                """SELECT clock_timestamp(), (SELECT created_at FROM entries WHERE session_id = 'retry'
                   AND type = 'run_started' AND (metadata->>'attempt')::int = 2)"""
            )
            if started_at is None:
                await asyncio.sleep(0.1)
    early = (not_before - now).total_seconds()
    assert early <= 0, f"B claimed the retry {early:.1f} s before its not_before (database clock)"
    assert started_at >= not_before  # stamped by the database too
    log = await read_log(http, b, "retry")
    assert [(e["type"], e.get("attempt")) for e in log if e["type"].startswith("run_")][:3] == [
        ("run_started", 1),
        ("run_failed", 1),
        ("run_started", 2),
    ]


# --- 3. B's catch-up after a lost LISTEN connection misses nothing -----------------------------------------------
async def test_a_skewed_instance_catches_up_on_what_it_missed_while_deaf(
    servers: Callable[..., ServerProcess], http: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    a = servers("a", *FAST)
    b = await start_skewed(http, servers, a, *FAST)
    async with http.post(f"{a.url}/sessions", json={"session_id": "deaf"}) as response:
        assert response.status == 201
    client = WsClient(await http.ws_connect(f"{b.ws_url}?session_id=deaf&client_id=on-b"))
    try:
        # The client is live on B: a first run on A reaches it through NOTIFY.
        status, _ = await post_message(http, a, "deaf", "before the cut", "m0")
        assert status == 202
        await client.wait(lambda frames: count(durable(frames), "run_completed") == 1)
        assert b.proc is not None
        ports = socket_ports(b.proc.pid)
        # B stands still while its LISTEN connection is cut and A commits a whole run: every notification of
        # it is lost to B (and B cannot claim the input), so only B's catch-up can bring the entries.
        b.proc.send_signal(signal.SIGSTOP)
        try:
            cut = await db.fetchval(
                """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                   WHERE datname = current_database() AND application_name = $1 AND client_port = ANY($2)""",
                LISTEN_APPLICATION,
                list(ports),
            )
            assert cut == 1
            status, _ = await post_message(http, a, "deaf", "while B is deaf", "m1")
            assert status == 202
            committed = await sse_until(http, a, "deaf", lambda es: count(es, "run_completed") == 2)
        finally:
            b.proc.send_signal(signal.SIGCONT)
        await client.wait(lambda frames: count(durable(frames), "run_completed") == 2)
    finally:
        await client.close()
    assert durable(client.frames) == committed  # every entry, in order, none twice
    assert_contiguous(committed)
    texts = replies(committed)
    assert len(texts) == 2 and "while B is deaf" in texts[1]
