"""Durability as a user feels it: a real process acknowledges enqueues, is SIGKILLed mid-stream, and the file it
leaves behind holds every acknowledged message exactly once; the input it died holding is recovered."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from service.models import RUN_INTERRUPTED, utcnow
from service.queue.sqlite import SqliteStore

pytestmark = pytest.mark.slow  # real child processes killed with SIGKILL

ROOT = Path(__file__).resolve().parents[1]
WANTED_ACKS = 50
Ack = tuple[str, int, str]  # session_id, seq, client_msg_id


def later() -> datetime:
    """The child used the real clock with a 1 s lease; an hour later that lease has certainly expired."""
    return utcnow() + timedelta(hours=1)


def parse(lines: list[str]) -> tuple[list[Ack], bool]:
    acks: list[Ack] = []
    running = False
    for line in lines:
        words = line.split()
        if words and words[0] == "ACK":
            acks.append((words[1], int(words[2]), words[3]))
        elif words and words[0] == "RUNNING":
            running = True
    return acks, running


async def run_and_kill(path: str) -> list[str]:
    """Start the child, read until enough acks and RUNNING, SIGKILL it, and return every line it printed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.durability_child", path, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(30):
            while True:
                raw = await proc.stdout.readline()
                assert raw, f"the child exited early (code {await proc.wait()}) after {lines[-3:]}"
                lines.append(raw.decode())
                acks, running = parse(lines)
                if running and len(acks) >= WANTED_ACKS:
                    break
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    # Acks printed before the kill may still sit in the pipe: they count too.
    lines += (await proc.stdout.read()).decode().splitlines(keepends=True)
    assert proc.returncode == -signal.SIGKILL
    return lines


def raw_rows(path: str, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "durable.db")


async def test_acked_enqueues_survive_sigkill_exactly_once(db_path: str) -> None:
    acks, running = parse(await run_and_kill(db_path))
    assert running and len(acks) >= WANTED_ACKS

    # Exactly once, straight from the file: no duplicate queue item, and every user entry has its queue item
    # (enqueue is one transaction: never an entry without an input or the reverse).
    assert (
        raw_rows(db_path, "SELECT session_id, input_seq FROM inputs GROUP BY 1, 2 HAVING count(*) > 1") == []
    )
    orphans = """SELECT e.session_id, e.seq FROM entries e WHERE e.source = 'user' AND NOT EXISTS
        (SELECT 1 FROM inputs i WHERE i.session_id = e.session_id AND i.input_seq = e.seq)"""
    assert raw_rows(db_path, orphans) == []
    assert raw_rows(db_path, "SELECT session_id, status FROM inputs WHERE status = 'running'") == [
        ("held", "running")
    ]

    store = SqliteStore(db_path, clock=later)
    await store.open()
    try:
        queued = {(s, q) for s, q in raw_rows(db_path, "SELECT session_id, input_seq FROM inputs")}
        for session_id, seq, client_msg_id in acks:
            page = await store.read_log(session_id, after=seq - 1, limit=1)
            assert [(e.seq, e.client_msg_id) for e in page.messages] == [(seq, client_msg_id)]
            assert (session_id, seq) in queued
        for session_id in {a[0] for a in acks}:
            page = await store.read_log(session_id, limit=1000)
            assert [e.seq for e in page.messages] == list(range(1, page.last_seq + 1))  # no gap, no dupe
        # Idempotency survives the restart: an acked client_msg_id sent again is the same message.
        session_id, seq, client_msg_id = acks[-1]
        again = await store.enqueue("alice", session_id, "resent", client_msg_id)
        assert (again.duplicate, again.seq) == (True, seq)

        recovered = await store.recover_expired()
        assert [
            (e.session_id, e.type, e.metadata["input_seq"], e.metadata["attempt"]) for e in recovered
        ] == [("held", RUN_INTERRUPTED, 1, 1)]
        claim = await store.claim("after-restart", lease_s=30)
        assert claim is not None
        assert (claim.session_id, claim.input_seq, claim.attempt) == ("held", 1, 2)
    finally:
        await store.close()
