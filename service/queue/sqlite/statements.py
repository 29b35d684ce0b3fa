"""SQLite statements and the row -> model mapping.

Every statement of the SQLite store is here, named as its PostgreSQL twin where there is one (postgres/
statements.py, and the ``svc_`` functions of ``migrations/postgres/0005_verb_functions.sql`` and later); a rule
SQL decides carries the name it has in service/queue/rules.py (``CLAIMABLE``). functions.py runs them, one
function a verb. Times: entries and sessions hold ``stamp`` text; ``not_before``, ``lease_expires_at`` and the
webhook outbox's ``next_at`` are unix seconds.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from typing import Any

import orjson

from service.models import LIFECYCLE_TYPES, Entry, Session, SessionStatus, WebhookEvent, parse_iso

SESSION_COLS = "session_id, owner, team, title, status, last_seq, created_at, updated_at, multitask_strategy"
SESSION_READ = f"{SESSION_COLS}, webhook_url"  # what a Session shows
ENTRY_COLS = "seq, session_id, type, source, content, created_at, run_id, client_msg_id, metadata"

# --- sessions -------------------------------------------------------------------------------------------------
GET_SESSION = f"SELECT {SESSION_READ} FROM sessions WHERE session_id = ? AND owner = ?"
SESSION_EXISTS = "SELECT 1 FROM sessions WHERE session_id = ?"
INSERT_SESSION = f"INSERT INTO sessions ({SESSION_COLS}) VALUES (?, ?, ?, ?, 'idle', 0, ?, ?, ?)"
SET_SESSION_WEBHOOK = "UPDATE sessions SET webhook_url = ? WHERE session_id = ?"
# Newest activity first is sorted by the caller (stable: ties stay in session_id order).
LIST_SESSIONS = f"SELECT {SESSION_READ} FROM sessions WHERE owner = ? ORDER BY session_id"
# ON DELETE CASCADE (foreign_keys=ON) removes entries, inputs and cursors in the same statement; a run of
# this session then finds no row under its token and gets LeaseLost.
DELETE_SESSION = "DELETE FROM sessions WHERE session_id = ? AND owner = ?"
# Retention: the candidates, oldest first; the caller bounds how many entries one call deletes.
EXPIRABLE = """SELECT session_id, last_seq FROM sessions s
WHERE updated_at < ? AND status IN ('idle', 'failed')
  AND NOT EXISTS (SELECT 1 FROM inputs i WHERE i.session_id = s.session_id AND i.status IN ('queued', 'running'))
ORDER BY updated_at, session_id LIMIT ?"""
EXPIRE_SESSION = "DELETE FROM sessions WHERE session_id = ?"
SET_STATUS = "UPDATE sessions SET status = ?, updated_at = ? WHERE session_id = ?"
# The session an enqueue writes to: who owns it, what it is doing, its last seq, its strategy.
ENQUEUE_SESSION = "SELECT owner, status, last_seq, multitask_strategy FROM sessions WHERE session_id = ?"

# --- log ------------------------------------------------------------------------------------------------------
LAST_SEQ = "SELECT last_seq FROM sessions WHERE session_id = ?"
INSERT_ENTRY = f"INSERT INTO entries ({ENTRY_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
# One statement moves everything a write changes on the session (as svc_allocate); NULL keeps the old status.
# Parameters: ?1 last_seq, ?2 updated_at, ?3 status, ?4 session_id.
TOUCH = (
    "UPDATE sessions SET last_seq = ?1, updated_at = ?2, status = COALESCE(?3, status) WHERE session_id = ?4"
)
READ_AFTER = f"SELECT {ENTRY_COLS} FROM entries WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?"
READ_BEFORE = f"""SELECT {ENTRY_COLS} FROM entries WHERE session_id = ? AND seq > ? AND seq < ?
    ORDER BY seq DESC LIMIT ?"""
READ_FRAMES = f"""SELECT {ENTRY_COLS}, json_extract(metadata, '$.id') FROM entries
    WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?"""
# The user message an enqueue with this client_msg_id wrote (the UNIQUE index makes it at most one).
SEEN = "SELECT seq FROM entries WHERE session_id = ? AND client_msg_id = ?"

# --- cursors --------------------------------------------------------------------------------------------------
GET_CURSOR = "SELECT seq FROM cursors WHERE session_id = ? AND client_id = ?"
# Never backwards: the larger of the stored cursor and the one given (rules.cursor_seq).
SET_CURSOR = """INSERT INTO cursors (session_id, client_id, seq) VALUES (?, ?, ?)
        ON CONFLICT (session_id, client_id) DO UPDATE SET seq = max(seq, excluded.seq)"""

# --- team state (migration 0006: a head and its pieces) ---------------------------------------------------------
SAVE_STATE = """INSERT INTO team_states (session_id, state, updated_at) VALUES (?, ?, ?)
ON CONFLICT (session_id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at"""
INSERT_PIECE = "INSERT INTO state_pieces (session_id, path, idx, body) VALUES (?, ?, ?, ?)"
CLEAR_PIECES = "DELETE FROM state_pieces WHERE session_id = ?"
TRIM_PIECES = "DELETE FROM state_pieces WHERE session_id = ? AND path = ? AND idx >= ?"
LOAD_STATE = "SELECT state FROM team_states WHERE session_id = ?"
LOAD_PIECES = "SELECT path, body FROM state_pieces WHERE session_id = ? ORDER BY path, idx"
DELETE_STATE = "DELETE FROM team_states WHERE session_id = ?"

# --- queue ----------------------------------------------------------------------------------------------------
INSERT_INPUT = """INSERT INTO inputs (session_id, input_seq, content, status, attempt, not_before, created_at,
strategy, trace_context) VALUES (?, ?, ?, 'queued', 1, ?, ?, ?, ?)"""
QUEUED_COUNT = "SELECT count(*) FROM inputs WHERE session_id = ? AND status = 'queued'"

# Per-session FIFO and one running input per session, as a WHERE clause: the oldest queued input that is due,
# whose session has nothing running and no older queued input (a retry waiting on backoff keeps its place).
CLAIMABLE = """SELECT i.id, i.session_id, i.input_seq, i.content, i.attempt, s.owner, s.team, s.last_seq,
  i.failures, i.trace_context
FROM inputs AS i JOIN sessions AS s ON s.session_id = i.session_id
WHERE i.status = 'queued' AND i.not_before <= :now
  AND NOT EXISTS (SELECT 1 FROM inputs AS r WHERE r.session_id = i.session_id AND r.status = 'running')
  AND NOT EXISTS (SELECT 1 FROM inputs AS o WHERE o.session_id = i.session_id AND o.status = 'queued'
                  AND o.id < i.id)
ORDER BY i.id LIMIT 1"""
TAKE = """UPDATE inputs SET status = 'running', lease_token = ?, lease_expires_at = ?, worker_id = ?,
run_id = ?, cancel_requested = 0 WHERE id = ?"""
# Lease fencing: every write of a run names its token, and matches nothing once the input was recovered.
FENCE = """SELECT s.last_seq FROM inputs AS i JOIN sessions AS s ON s.session_id = i.session_id
WHERE i.id = ? AND i.lease_token = ? AND i.status = 'running'"""
DONE = """UPDATE inputs SET status = 'done', lease_token = NULL, lease_expires_at = NULL
WHERE id = ? AND lease_token = ? AND status = 'running'"""
REQUEUE = """UPDATE inputs SET status = 'queued', attempt = attempt + 1, failures = failures + ?,
interruptions = interruptions + ?, not_before = ?, lease_token = NULL,
lease_expires_at = NULL, worker_id = NULL, cancel_requested = 0
WHERE id = ? AND lease_token = ? AND status = 'running'"""
HEARTBEAT = (
    """UPDATE inputs SET lease_expires_at = ? WHERE id = ? AND lease_token = ? AND status = 'running'"""
)
CANCEL_FLAG = "SELECT cancel_requested FROM inputs WHERE id = ? AND lease_token = ? AND status = 'running'"
# rules.status_after_end asks it: do more inputs of the session wait?
MORE_QUEUED = "SELECT EXISTS (SELECT 1 FROM inputs WHERE session_id = ? AND status = 'queued')"
# Human input: the answers bound to an asking input, in order, and the session's oldest queued message.
ANSWERS = "SELECT input_seq, content FROM inputs WHERE answer_for = ? ORDER BY id LIMIT 1 OFFSET ?"
ANSWERS_TAKEN = "SELECT count(*) FROM inputs WHERE answer_for = ?"
OLDEST_QUEUED = """SELECT id, input_seq, content, strategy FROM inputs WHERE session_id = ? AND status = 'queued'
ORDER BY id"""
BIND_ANSWER = "UPDATE inputs SET status = 'done', answer_for = ? WHERE id = ?"
# Double-texting: a rollback message waits behind the run (README "Double-texting").
ROLLBACK_REQUESTED = (
    "SELECT 1 FROM inputs WHERE session_id = ? AND status = 'queued' AND strategy = 'rollback' AND id > ?"
)
# recover_expired. No ORDER BY: it would make SQLite walk the whole table in rowid order instead of using the
# lease index.
EXPIRED = """SELECT i.id, i.session_id, i.input_seq, i.attempt, i.run_id, i.lease_token, i.interruptions,
    i.cancel_requested, s.status
    FROM inputs AS i JOIN sessions AS s ON s.session_id = i.session_id
    WHERE i.status = 'running' AND i.lease_expires_at < ?"""
# The session's current run: its running input, else an input queued again after a failure or an interruption
# (attempt > 1) at the head of its queue (rules.is_run decides whether it is one).
CURRENT_RUN = """SELECT id, status, input_seq, attempt, run_id FROM inputs
WHERE session_id = ? AND status IN ('queued', 'running') ORDER BY status = 'running' DESC, id LIMIT 1"""
ASK_CANCEL = "UPDATE inputs SET cancel_requested = 1 WHERE id = ?"
END_QUEUED = "UPDATE inputs SET status = 'done' WHERE id = ?"
# Two counts, not GROUP BY status: each is answered from its partial index, never a scan of done inputs.
COUNTS = (
    "SELECT (SELECT count(*) FROM inputs WHERE status = 'queued'),"
    " (SELECT count(*) FROM inputs WHERE status = 'running')"
)

# --- drafts (migration 0004) ----------------------------------------------------------------------------------
SAVE_DRAFT = """INSERT INTO drafts (session_id, run_id, message_id, source, content, updated_at)
VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (session_id) DO UPDATE SET run_id = excluded.run_id,
message_id = excluded.message_id, source = excluded.source, content = excluded.content,
updated_at = excluded.updated_at"""
DROP_DRAFT = "DELETE FROM drafts WHERE session_id = ?"
READ_DRAFT = "SELECT run_id, message_id, source, content FROM drafts WHERE session_id = ?"


def drop_drafts_of(count: int) -> str:
    """The statement deleting the session's draft when it streamed one of ``count`` message ids."""
    marks = ", ".join("?" * count)
    return f"DELETE FROM drafts WHERE session_id = ? AND message_id IN ({marks})"


# --- webhook outbox (migration 0010) --------------------------------------------------------------------------
SET_WEBHOOK_DEFAULT = (
    "INSERT INTO webhook_default (id, url) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET url = excluded.url"
)
RELEASE_WEBHOOKS = (
    "UPDATE webhook_outbox SET lease_token = NULL, lease_expires_at = NULL WHERE lease_token IS NOT NULL"
)
DUE_WEBHOOKS = """SELECT id FROM webhook_outbox
WHERE status = 'pending' AND next_at <= ?1 AND (lease_expires_at IS NULL OR lease_expires_at <= ?1)
ORDER BY id LIMIT ?2"""
CLAIM_WEBHOOK = """UPDATE webhook_outbox SET attempts = attempts + 1, lease_token = ?, lease_expires_at = ?
WHERE id = ?
RETURNING webhook_id, url, session_id, run_id, input_seq, type, seq, created_at, attempts"""
WEBHOOK_DELIVERED = (
    "DELETE FROM webhook_outbox WHERE webhook_id = ? AND lease_token = ? AND status = 'pending'"
)
WEBHOOK_FAILED = """UPDATE webhook_outbox SET status = ?, next_at = ?, lease_token = NULL, lease_expires_at = NULL
        WHERE webhook_id = ? AND lease_token = ? AND status = 'pending'"""


# --- row mapping ----------------------------------------------------------------------------------------------
def stamp(ts: datetime) -> str:
    """Fixed-width ISO 8601 UTC with microseconds (``2026-11-24T10:00:00.123000+00:00``): sorts and compares as
    text, round-trips exactly. isoformat, not strftime: it is 3x cheaper, and this runs for every write."""
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def session_of(row: sqlite3.Row | tuple[Any, ...]) -> Session:
    sid, owner, team, title, status, last_seq, created, updated, strategy, webhook_url = row
    return Session(
        sid,
        owner,
        team,
        title,
        SessionStatus(status),
        last_seq,
        parse_iso(created),
        parse_iso(updated),
        strategy,
        webhook_url,
    )


def entry_of(row: sqlite3.Row | tuple[Any, ...]) -> Entry:
    seq, sid, type_, source, content, created, run_id, client_msg_id, metadata = row
    return Entry(
        seq, sid, type_, source, orjson.loads(content), parse_iso(created), run_id, client_msg_id,
        orjson.loads(metadata),
    )  # fmt: skip


_FRAME = (
    b'{"seq":%d,"session_id":%b,"type":%b,"source":%b,"content":%b,"created_at":"%bZ","run_id":%b,'
    b'"client_msg_id":%b,"metadata":%b}'
)


def frames_of(
    session_id: str, rows: list[tuple[Any, ...]]
) -> tuple[list[bytes], list[int], list[str | None]]:
    """``READ_FRAMES`` rows as frames, without parsing: content and metadata are stored as orjson's JSON text,
    so they are spliced in as they are; created_at's stored stamp (``...T10:00:00.123456+00:00``) cut to the
    API's milliseconds. Lifecycle entries (details also at the top level) take the generic way. Returns the
    frames, their seqs and their message ids."""
    sid = orjson.dumps(session_id)
    dumps = orjson.dumps
    frames: list[bytes] = []
    seqs: list[int] = []
    ids: list[str | None] = []
    for r in rows:
        seq, _, type_, source, content, created, run_id, client_msg_id, metadata, message_id = r
        if type_ in LIFECYCLE_TYPES:
            frames.append(dumps(entry_of(r[:9]).to_json()))
        else:
            frames.append(
                _FRAME
                % (
                    seq, sid, dumps(type_), dumps(source), content.encode(), created[:23].encode(),
                    dumps(run_id), dumps(client_msg_id), metadata.encode(),
                )
            )  # fmt: skip
        seqs.append(seq)
        ids.append(message_id if isinstance(message_id, str) else None)
    return frames, seqs, ids


def webhook_of(row: tuple[Any, ...], lease_token: str) -> WebhookEvent:
    """A ``CLAIM_WEBHOOK`` row, leased under ``lease_token``."""
    return WebhookEvent(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], parse_iso(row[7]), row[8], lease_token
    )
