"""The queue rules in SQL: the synchronous bodies of the SQLite store's verbs.

Each function runs on the writer connection inside the writer's transaction (one SAVEPOINT per call) or on the
reader connection inside a read transaction; none of them commits. Because the single writer holds SQLite's
write lock for the whole batch, a SELECT followed by an UPDATE here is atomic.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson

from service.errors import Conflict, LeaseLost, NotFound, QueueFull
from service.models import (
    RUN_FAILED,
    USER_INPUT_REQUESTED,
    Answer,
    Claim,
    Enqueued,
    Entry,
    NewEntry,
    Page,
    Session,
    SessionStatus,
    interrupted,
    parse_iso,
)
from service.queue.sqlite_conn import stamp

SESSION_COLS = "session_id, owner, team, title, status, last_seq, created_at, updated_at"
ENTRY_COLS = "seq, session_id, type, source, content, created_at, run_id, client_msg_id, metadata"

INSERT_SESSION = f"INSERT INTO sessions ({SESSION_COLS}) VALUES (?, ?, ?, ?, 'idle', 0, ?, ?)"
INSERT_ENTRY = f"INSERT INTO entries ({ENTRY_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
INSERT_INPUT = """INSERT INTO inputs (session_id, input_seq, content, status, attempt, not_before, created_at)
VALUES (?, ?, ?, 'queued', 1, ?, ?)"""

# Per-session FIFO and one running input per session, as a WHERE clause: the oldest queued input that is due,
# whose session has nothing running and no older queued input (a retry waiting on backoff keeps its place).
CLAIMABLE = """SELECT i.id FROM inputs AS i
WHERE i.status = 'queued' AND i.not_before <= :now
  AND NOT EXISTS (SELECT 1 FROM inputs AS r WHERE r.session_id = i.session_id AND r.status = 'running')
  AND NOT EXISTS (SELECT 1 FROM inputs AS o WHERE o.session_id = i.session_id AND o.status = 'queued'
                  AND o.id < i.id)
ORDER BY i.id LIMIT 1"""
TAKE = """UPDATE inputs SET status = 'running', lease_token = ?, lease_expires_at = ?, worker_id = ?,
run_id = ?, cancel_requested = 0 WHERE id = ?"""
CLAIM_ROW = """SELECT i.session_id, s.owner, s.team, i.input_seq, i.content, i.attempt
FROM inputs AS i JOIN sessions AS s USING (session_id) WHERE i.id = ?"""

# Lease fencing: every write of a run names its token, and matches nothing once the input was recovered.
FENCE = "SELECT attempt FROM inputs WHERE id = ? AND lease_token = ? AND status = 'running'"
DONE = """UPDATE inputs SET status = 'done', lease_token = NULL, lease_expires_at = NULL
WHERE id = ? AND lease_token = ? AND status = 'running'"""
REQUEUE = """UPDATE inputs SET status = 'queued', attempt = attempt + 1, not_before = ?, lease_token = NULL,
lease_expires_at = NULL, worker_id = NULL, cancel_requested = 0
WHERE id = ? AND lease_token = ? AND status = 'running'"""
HEARTBEAT = (
    """UPDATE inputs SET lease_expires_at = ? WHERE id = ? AND lease_token = ? AND status = 'running'"""
)


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(8)


def to_session(row: sqlite3.Row | tuple[Any, ...]) -> Session:
    sid, owner, team, title, status, last_seq, created, updated = row
    return Session(
        sid, owner, team, title, SessionStatus(status), last_seq, parse_iso(created), parse_iso(updated)
    )


def to_entry(row: sqlite3.Row | tuple[Any, ...]) -> Entry:
    seq, sid, type_, source, content, created, run_id, client_msg_id, metadata = row
    return Entry(
        seq, sid, type_, source, orjson.loads(content), parse_iso(created), run_id, client_msg_id,
        orjson.loads(metadata),
    )  # fmt: skip


# --- sessions ---
def get_session(conn: sqlite3.Connection, session_id: str) -> Session | None:
    row = conn.execute(f"SELECT {SESSION_COLS} FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
    return None if row is None else to_session(row)


def owned(conn: sqlite3.Connection, owner: str, session_id: str) -> Session | None:
    session = get_session(conn, session_id)
    return session if session is not None and session.owner == owner else None


def create_session(
    conn: sqlite3.Connection, now: datetime, owner: str, session_id: str | None, team: str, title: str | None
) -> Session:
    sid = session_id or new_id("s_")
    if conn.execute("SELECT 1 FROM sessions WHERE session_id = ?", (sid,)).fetchone() is not None:
        raise Conflict(f"session {sid!r} already exists")
    conn.execute(INSERT_SESSION, (sid, owner, team, title, stamp(now), stamp(now)))
    return Session(sid, owner, team, title, SessionStatus.IDLE, 0, now, now)


def list_sessions(conn: sqlite3.Connection, owner: str) -> list[Session]:
    rows = conn.execute(
        f"SELECT {SESSION_COLS} FROM sessions WHERE owner = ? ORDER BY updated_at DESC, session_id", (owner,)
    )
    return [to_session(row) for row in rows]


def delete_session(conn: sqlite3.Connection, owner: str, session_id: str) -> bool:
    # ON DELETE CASCADE (foreign_keys=ON) removes entries, inputs and cursors in the same statement; a run of
    # this session then finds no row under its token and gets LeaseLost.
    cur = conn.execute("DELETE FROM sessions WHERE session_id = ? AND owner = ?", (session_id, owner))
    return cur.rowcount > 0


def set_status(conn: sqlite3.Connection, session_id: str, status: SessionStatus, now: datetime) -> None:
    conn.execute(
        "UPDATE sessions SET status = ?, updated_at = ? WHERE session_id = ?",
        (status.value, stamp(now), session_id),
    )


def has_queued(conn: sqlite3.Connection, session_id: str) -> bool:
    sql = "SELECT 1 FROM inputs WHERE session_id = ? AND status = 'queued' LIMIT 1"
    return conn.execute(sql, (session_id,)).fetchone() is not None


# --- log and cursors ---
def append_entries(
    conn: sqlite3.Connection,
    now: datetime,
    session_id: str,
    news: Sequence[NewEntry],
    run_id: str | None,
    client_msg_id: str | None = None,
) -> list[Entry]:
    """Number the entries after the session's last seq (contiguous: the writer lock serialises appends)."""
    (last,) = conn.execute("SELECT last_seq FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
    created = stamp(now)
    entries = [
        Entry(last + i, session_id, n.type, n.source, n.content, now, run_id, client_msg_id, dict(n.metadata))
        for i, n in enumerate(news, start=1)
    ]
    conn.executemany(
        INSERT_ENTRY,
        [
            (e.seq, session_id, e.type, e.source, orjson.dumps(e.content).decode(), created, run_id,
             client_msg_id, orjson.dumps(e.metadata).decode())
            for e in entries
        ],
    )  # fmt: skip
    conn.execute(
        "UPDATE sessions SET last_seq = ?, updated_at = ? WHERE session_id = ?",
        (last + len(entries), created, session_id),
    )
    return entries


def read_log(
    conn: sqlite3.Connection, session_id: str, after: int | None, before: int | None, limit: int
) -> Page:
    row = conn.execute("SELECT last_seq FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
    last_seq = 0 if row is None else int(row[0])
    low, limit = max(0, after or 0), max(0, limit)  # a negative LIMIT means "no limit" to SQLite
    if before is None:
        sql = f"SELECT {ENTRY_COLS} FROM entries WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?"
        rows = conn.execute(sql, (session_id, low, limit + 1)).fetchall()
        return Page(session_id, [to_entry(r) for r in rows[:limit]], last_seq, len(rows) > limit)
    sql = f"""SELECT {ENTRY_COLS} FROM entries WHERE session_id = ? AND seq > ? AND seq < ?
    ORDER BY seq DESC LIMIT ?"""
    rows = conn.execute(sql, (session_id, low, before, limit + 1)).fetchall()
    page = [to_entry(r) for r in reversed(rows[:limit])]
    return Page(session_id, page, last_seq, len(rows) > limit)


def get_cursor(conn: sqlite3.Connection, session_id: str, client_id: str) -> int | None:
    sql = "SELECT seq FROM cursors WHERE session_id = ? AND client_id = ?"
    row = conn.execute(sql, (session_id, client_id)).fetchone()
    return None if row is None else int(row[0])


def set_cursor(conn: sqlite3.Connection, session_id: str, client_id: str, seq: int) -> int:
    row = conn.execute("SELECT last_seq FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
    if row is None:
        return 0  # an unknown session has an empty log: the cursor clamps to 0 and there is nothing to keep
    wanted = min(max(seq, 0), int(row[0]))
    conn.execute(
        """INSERT INTO cursors (session_id, client_id, seq) VALUES (?, ?, ?)
        ON CONFLICT (session_id, client_id) DO UPDATE SET seq = max(seq, excluded.seq)""",
        (session_id, client_id, wanted),
    )
    stored = get_cursor(conn, session_id, client_id)
    assert stored is not None
    return stored


# --- queue ---
def enqueue(
    conn: sqlite3.Connection,
    now: datetime,
    owner: str,
    session_id: str,
    content: str,
    client_msg_id: str | None,
    team: str,
    max_queued: int | None,
) -> Enqueued:
    session = get_session(conn, session_id)
    if session is None:
        session = create_session(conn, now, owner, session_id, team, None)
    elif session.owner != owner:
        raise NotFound(f"session {session_id!r} not found")
    if client_msg_id is not None:
        sql = "SELECT seq FROM entries WHERE session_id = ? AND client_msg_id = ?"
        seen = conn.execute(sql, (session_id, client_msg_id)).fetchone()
        if seen is not None:
            return Enqueued(session_id, int(seen[0]), client_msg_id, True, None)
    if max_queued is not None:
        sql = "SELECT count(*) FROM inputs WHERE session_id = ? AND status = 'queued'"
        (queued,) = conn.execute(sql, (session_id,)).fetchone()
        if queued >= max_queued:
            raise QueueFull(f"session {session_id!r} already has {queued} queued inputs (limit {max_queued})")
    (entry,) = append_entries(
        conn, now, session_id, [NewEntry("TextMessage", "user", content)], None, client_msg_id
    )
    conn.execute(INSERT_INPUT, (session_id, entry.seq, content, now.timestamp(), stamp(now)))
    if session.status in (SessionStatus.IDLE, SessionStatus.FAILED):
        set_status(conn, session_id, SessionStatus.QUEUED, now)
    return Enqueued(session_id, entry.seq, client_msg_id, False, entry)


def claim(conn: sqlite3.Connection, now: datetime, worker_id: str, lease_s: float) -> Claim | None:
    row = conn.execute(CLAIMABLE, {"now": now.timestamp()}).fetchone()
    if row is None:
        return None
    input_id = int(row[0])
    token, run_id = secrets.token_hex(16), new_id("r_")
    conn.execute(TAKE, (token, now.timestamp() + lease_s, worker_id, run_id, input_id))
    session_id, owner, team, input_seq, content, attempt = conn.execute(CLAIM_ROW, (input_id,)).fetchone()
    set_status(conn, session_id, SessionStatus.RUNNING, now)
    return Claim(input_id, session_id, owner, team, input_seq, content, attempt, run_id, token, worker_id)


def fence(conn: sqlite3.Connection, claim: Claim) -> None:
    if conn.execute(FENCE, (claim.input_id, claim.lease_token)).fetchone() is None:
        raise LeaseLost()


def append(conn: sqlite3.Connection, now: datetime, claim: Claim, news: Sequence[NewEntry]) -> list[Entry]:
    fence(conn, claim)
    entries = append_entries(conn, now, claim.session_id, news, claim.run_id)
    if any(n.type == USER_INPUT_REQUESTED for n in news):
        set_status(conn, claim.session_id, SessionStatus.AWAITING_INPUT, now)
    return entries


def heartbeat(conn: sqlite3.Connection, now: datetime, claim: Claim, lease_s: float) -> bool:
    cur = conn.execute(HEARTBEAT, (now.timestamp() + lease_s, claim.input_id, claim.lease_token))
    return cur.rowcount > 0


def cancel_requested(conn: sqlite3.Connection, claim: Claim) -> bool:
    sql = "SELECT cancel_requested FROM inputs WHERE id = ? AND lease_token = ? AND status = 'running'"
    row = conn.execute(sql, (claim.input_id, claim.lease_token)).fetchone()
    # Fenced (recovered, or its session deleted): the run can no longer write anything, so it should stop too.
    return row is None or bool(row[0])


def take_answer(conn: sqlite3.Connection, now: datetime, claim: Claim) -> Answer | None:
    fence(conn, claim)
    sql = """SELECT id, input_seq, content FROM inputs WHERE session_id = ? AND status = 'queued'
    ORDER BY id LIMIT 1"""
    row = conn.execute(sql, (claim.session_id,)).fetchone()
    if row is None:
        return None
    conn.execute("UPDATE inputs SET status = 'done' WHERE id = ?", (row[0],))
    set_status(conn, claim.session_id, SessionStatus.RUNNING, now)
    return Answer(int(row[1]), row[2])


def finish(
    conn: sqlite3.Connection, now: datetime, claim: Claim, entry: NewEntry, team_state: dict[str, Any] | None
) -> Entry:
    if conn.execute(DONE, (claim.input_id, claim.lease_token)).rowcount == 0:
        raise LeaseLost()
    (done,) = append_entries(conn, now, claim.session_id, [entry], claim.run_id)
    if team_state is not None:
        conn.execute(
            "UPDATE sessions SET team_state = ? WHERE session_id = ?",
            (orjson.dumps(team_state).decode(), claim.session_id),
        )
    if has_queued(conn, claim.session_id):
        status = SessionStatus.QUEUED
    else:
        status = SessionStatus.FAILED if entry.type == RUN_FAILED else SessionStatus.IDLE
    set_status(conn, claim.session_id, status, now)
    return done


def requeue(
    conn: sqlite3.Connection, now: datetime, claim: Claim, entry: NewEntry, not_before: datetime
) -> Entry:
    """retry() and release(): the input goes back to the queue, keeping its place, with attempt + 1."""
    if conn.execute(REQUEUE, (not_before.timestamp(), claim.input_id, claim.lease_token)).rowcount == 0:
        raise LeaseLost()
    (done,) = append_entries(conn, now, claim.session_id, [entry], claim.run_id)
    set_status(conn, claim.session_id, SessionStatus.QUEUED, now)
    return done


def recover_expired(conn: sqlite3.Connection, now: datetime) -> list[Entry]:
    sql = """SELECT id, session_id, input_seq, attempt, run_id, lease_token FROM inputs
    WHERE status = 'running' AND lease_expires_at < ? ORDER BY id"""
    recovered: list[Entry] = []
    for input_id, session_id, input_seq, attempt, run_id, token in conn.execute(
        sql, (now.timestamp(),)
    ).fetchall():
        conn.execute(REQUEUE, (now.timestamp(), input_id, token))
        recovered += append_entries(conn, now, session_id, [interrupted(input_seq, attempt)], run_id)
        set_status(conn, session_id, SessionStatus.QUEUED, now)
    return recovered


def request_cancel(conn: sqlite3.Connection, owner: str, session_id: str) -> bool:
    if owned(conn, owner, session_id) is None:
        return False
    sql = "UPDATE inputs SET cancel_requested = 1 WHERE session_id = ? AND status = 'running'"
    return conn.execute(sql, (session_id,)).rowcount > 0


def load_team_state(conn: sqlite3.Connection, session_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT team_state FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
    if row is None or row[0] is None:
        return None
    state: dict[str, Any] = orjson.loads(row[0])
    return state


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    # Two counts, not GROUP BY status: each is answered from its partial index, never a scan of done inputs.
    queued, running = conn.execute(
        "SELECT (SELECT count(*) FROM inputs WHERE status = 'queued'),"
        " (SELECT count(*) FROM inputs WHERE status = 'running')"
    ).fetchone()
    return {"queued": int(queued), "running": int(running)}


def has_claimable(conn: sqlite3.Connection, now: datetime) -> bool:
    return conn.execute(CLAIMABLE, {"now": now.timestamp()}).fetchone() is not None
