"""PostgreSQL statements of PostgresStore and the row -> model mapping. Every time is a parameter from the
store's clock (never now()), so a fake clock drives leases and backoff exactly as on the other backends."""

from __future__ import annotations

from typing import Any

from service.models import Entry, Session, SessionStatus

LOG_CHANNEL = "service_log"  # payload "<session_id> <last_seq> <instance_id>": entries were committed
WORK_CHANNEL = "service_work"  # payload "<session_id> <instance_id>": work may be claimable, or a cancel

SESSION_COLS = "session_id, owner, team, title, status, last_seq, created_at, updated_at"
ENTRY_COLS = "session_id, seq, type, source, content, run_id, client_msg_id, metadata, created_at"

# --- sessions -----------------------------------------------------------------------------------------------
INSERT_SESSION = f"""
INSERT INTO sessions (session_id, owner, team, title, status, last_seq, created_at, updated_at)
VALUES ($1, $2, $3, $4, 'idle', 0, $5, $5)
ON CONFLICT (session_id) DO NOTHING
RETURNING {SESSION_COLS}"""
GET_SESSION = f"SELECT {SESSION_COLS} FROM sessions WHERE session_id = $1 AND owner = $2"
LIST_SESSIONS = f"SELECT {SESSION_COLS} FROM sessions WHERE owner = $1 ORDER BY updated_at DESC, session_id"
DELETE_SESSION = "DELETE FROM sessions WHERE session_id = $1 AND owner = $2 RETURNING session_id"
# Every write to a session's log or queue takes this row lock first (then input rows): one lock order, no
# deadlock, and a consistent view of the session's inputs while it is held. NO KEY UPDATE (what an UPDATE
# of sessions takes anyway): the foreign-key checks of concurrent inserts (KEY SHARE) neither block it nor
# make claimers skip the session.
LOCK_SESSION = "SELECT owner, status, last_seq FROM sessions WHERE session_id = $1 FOR NO KEY UPDATE"
# Seq allocation: the session row lock serialises writers, so the n new seqs are contiguous.
ALLOCATE_SEQS = """
UPDATE sessions SET last_seq = last_seq + $2, updated_at = $3, status = COALESCE($4, status)
WHERE session_id = $1 RETURNING last_seq"""
SET_STATUS = "UPDATE sessions SET status = $2, updated_at = $3 WHERE session_id = $1"
SAVE_STATE = "UPDATE sessions SET team_state = $2 WHERE session_id = $1"
LOAD_STATE = "SELECT team_state FROM sessions WHERE session_id = $1"
LAST_SEQ = "SELECT last_seq FROM sessions WHERE session_id = $1"
RECENT_SESSIONS = "SELECT session_id, last_seq FROM sessions WHERE updated_at >= $1 AND last_seq > 0"

# --- log ----------------------------------------------------------------------------------------------------
INSERT_ENTRY = f"INSERT INTO entries ({ENTRY_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
READ_AFTER = f"SELECT {ENTRY_COLS} FROM entries WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
READ_BEFORE = f"""
SELECT {ENTRY_COLS} FROM entries WHERE session_id = $1 AND seq < $2 AND seq > $3 ORDER BY seq DESC LIMIT $4"""
FIND_CLIENT_MSG = "SELECT seq FROM entries WHERE session_id = $1 AND client_msg_id = $2"
NOTIFY_MANY = "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS n(c, p)"

# --- cursors ------------------------------------------------------------------------------------------------
GET_CURSOR = "SELECT seq FROM cursors WHERE session_id = $1 AND client_id = $2"
# Never backwards, clamped to [0, last_seq]; an unknown session stores nothing (no row to join).
SET_CURSOR = """
INSERT INTO cursors (session_id, client_id, seq)
SELECT s.session_id, $2, LEAST(GREATEST($3::bigint, 0), s.last_seq) FROM sessions s WHERE s.session_id = $1
ON CONFLICT (session_id, client_id) DO UPDATE SET seq = GREATEST(cursors.seq, EXCLUDED.seq)
RETURNING seq"""

# --- queue --------------------------------------------------------------------------------------------------
COUNT_QUEUED_IN_SESSION = "SELECT count(*) FROM inputs WHERE session_id = $1 AND status = 'queued'"
INSERT_INPUT = """
INSERT INTO inputs (session_id, input_seq, content, status, attempt, not_before, created_at)
VALUES ($1, $2, $3, 'queued', 1, $4, $4)"""
# The per-session FIFO rule: queued, due, no running input in its session, no older queued one. A session
# with a running input is also 'running'/'awaiting_input': that test is re-evaluated on the newest row version
# when the lock waits on a concurrent claimer, so a fresh claim is skipped rather than locked.
PICK_SESSION = """
SELECT s.session_id FROM inputs i JOIN sessions s ON s.session_id = i.session_id
WHERE i.status = 'queued' AND i.not_before <= $1 AND s.status NOT IN ('running', 'awaiting_input')
  AND NOT EXISTS (SELECT 1 FROM inputs r WHERE r.session_id = i.session_id AND r.status = 'running')
  AND NOT EXISTS (
    SELECT 1 FROM inputs o WHERE o.session_id = i.session_id AND o.status = 'queued' AND o.id < i.id)
ORDER BY i.id LIMIT 1
FOR NO KEY UPDATE OF s SKIP LOCKED"""
# Re-checked under the session row lock: the head of the session's queue, if due and nothing runs.
SESSION_HEAD = """
SELECT i.id FROM inputs i
WHERE i.session_id = $1 AND i.status = 'queued' AND i.not_before <= $2
  AND NOT EXISTS (SELECT 1 FROM inputs r WHERE r.session_id = $1 AND r.status = 'running')
  AND NOT EXISTS (SELECT 1 FROM inputs o WHERE o.session_id = $1 AND o.status = 'queued' AND o.id < i.id)
ORDER BY i.id LIMIT 1"""
TAKE_INPUT = """
UPDATE inputs i SET status = 'running', lease_token = $2, lease_expires_at = $3, worker_id = $4, run_id = $5,
    cancel_requested = FALSE
FROM sessions s WHERE i.id = $1 AND s.session_id = i.session_id
RETURNING i.id, i.session_id, s.owner, s.team, i.input_seq, i.content, i.attempt, s.team_state, i.failures"""
# The lease fence: the input still runs under this token. FOR UPDATE: nothing changes it until we commit.
FENCE = "SELECT id FROM inputs WHERE id = $1 AND lease_token = $2 AND status = 'running' FOR UPDATE"
HEARTBEAT = """
UPDATE inputs SET lease_expires_at = $3 WHERE id = $1 AND lease_token = $2 AND status = 'running'
RETURNING id"""
CANCEL_FLAG = "SELECT cancel_requested FROM inputs WHERE id = $1 AND lease_token = $2 AND status = 'running'"
OWN_CANCEL_FLAG = "SELECT cancel_requested FROM inputs WHERE id = $1"
MARK_DONE = "UPDATE inputs SET status = 'done', lease_token = NULL, lease_expires_at = NULL WHERE id = $1"
REQUEUE = """
UPDATE inputs SET status = 'queued', attempt = attempt + 1, failures = failures + $3, not_before = $2,
    lease_token = NULL,
    lease_expires_at = NULL, worker_id = NULL, cancel_requested = FALSE
WHERE id = $1"""
HAS_QUEUED = "SELECT EXISTS (SELECT 1 FROM inputs WHERE session_id = $1 AND status = 'queued')"
OLDEST_QUEUED = """
SELECT id, input_seq, content FROM inputs WHERE session_id = $1 AND status = 'queued' ORDER BY id LIMIT 1"""
# Answers belong to the input whose run asked (README "Guarantees"): the index-th one, or how many there are.
NTH_ANSWER = "SELECT input_seq, content FROM inputs WHERE answer_for = $1 ORDER BY id LIMIT 1 OFFSET $2"
COUNT_ANSWERS = "SELECT count(*) FROM inputs WHERE answer_for = $1"
BIND_ANSWER = "UPDATE inputs SET status = 'done', answer_for = $1 WHERE id = $2"
EXPIRED = "SELECT session_id FROM inputs WHERE status = 'running' AND lease_expires_at < $1 ORDER BY id"
# Re-checked under the session lock; the row lock of the UPDATE also waits for a concurrent heartbeat.
EXPIRED_IN_SESSION = """
SELECT id, input_seq, attempt, run_id, interruptions, cancel_requested FROM inputs
WHERE session_id = $1 AND status = 'running' AND lease_expires_at < $2 FOR UPDATE"""
REQUEUE_EXPIRED = """
UPDATE inputs SET status = 'queued', attempt = attempt + 1, interruptions = interruptions + 1, not_before = $2,
    lease_token = NULL, lease_expires_at = NULL, worker_id = NULL, cancel_requested = FALSE
WHERE id = $1"""
# The session's current run: its running input, else an input queued again after a failure or an interruption
# (attempt > 1) at the head of its queue. Inputs never started are not runs.
CURRENT_RUN = """
SELECT id, status, input_seq, attempt, run_id FROM inputs
WHERE session_id = $1 AND status IN ('queued', 'running') ORDER BY status = 'running' DESC, id LIMIT 1"""
SET_CANCEL = "UPDATE inputs SET cancel_requested = TRUE WHERE id = $1"
# Drafts (README "Streaming"): one per session.
SAVE_DRAFT = """
INSERT INTO drafts (session_id, run_id, message_id, source, content, updated_at) VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (session_id) DO UPDATE SET run_id = EXCLUDED.run_id, message_id = EXCLUDED.message_id,
    source = EXCLUDED.source, content = EXCLUDED.content, updated_at = EXCLUDED.updated_at"""
READ_DRAFT = "SELECT run_id, message_id, source, content FROM drafts WHERE session_id = $1"
DROP_DRAFT = "DELETE FROM drafts WHERE session_id = $1"
# Appending the message a draft was streaming retires the draft.
RETIRE_DRAFT = "DELETE FROM drafts WHERE session_id = $1 AND message_id = ANY($2::text[])"
HAS_RUNNING = "SELECT EXISTS (SELECT 1 FROM inputs WHERE session_id = $1 AND status = 'running')"
DROP_STATE = "UPDATE sessions SET team_state = NULL WHERE session_id = $1"
COUNTS = "SELECT status, count(*) AS n FROM inputs WHERE status IN ('queued', 'running') GROUP BY status"


def session_of(row: Any) -> Session:
    return Session(
        session_id=row["session_id"],
        owner=row["owner"],
        team=row["team"],
        title=row["title"],
        status=SessionStatus(row["status"]),
        last_seq=row["last_seq"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def entry_of(row: Any) -> Entry:
    return Entry(
        seq=row["seq"],
        session_id=row["session_id"],
        type=row["type"],
        source=row["source"],
        content=row["content"],
        created_at=row["created_at"],
        run_id=row["run_id"],
        client_msg_id=row["client_msg_id"],
        metadata=row["metadata"],
    )
