"""PostgreSQL statements and the row -> model mapping.

Writes are not here: every write verb is an SQL function (``migrations/postgres/0005_verb_functions.sql``) called
through ``BATCH`` by the group-committing writer (engine.py). Reads are plain statements on the pool (asyncpg
prepares and caches each one per connection). Every time in SQL is ``now() + $offset seconds``: the database's
clock (README "Deploying on PostgreSQL", "One clock"), never an instance's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from service.errors import BadRequest
from service.models import Entry, NewEntry, Session, SessionStatus
from service.queue.state_pieces import Manifest, PiecesMemo, StateSave, plan_save

LOG_CHANNEL = "service_log"  # payload "<session_id> <last_seq> <instance_id>": entries were committed
WORK_CHANNEL = "service_work"  # payload "<session_id> <instance_id>": work may be claimable, or a cancel

# The writer's one statement: a list of verb calls in, their answers out, one transaction.
BATCH = "SELECT svc_batch($1::text::json, $2::float8)"  # text in: the store encodes each call itself
# The database's clock as this store sees it ($1: the test offset, 0 in production).
DB_NOW = "SELECT now() + $1::float8 * interval '1 second'"

SESSION_COLS = "session_id, owner, team, title, status, last_seq, created_at, updated_at, multitask_strategy, webhook_url"
ENTRY_COLS = "session_id, seq, type, source, content, run_id, client_msg_id, metadata, created_at"

GET_SESSION = f"SELECT {SESSION_COLS} FROM sessions WHERE session_id = $1 AND owner = $2"
# Retention, outside the writer (its own transaction on a pool connection, so a sweep never delays acks): the
# expired rows are locked SKIP LOCKED, so instances sweeping at once each delete different sessions, once.
# $1 idle seconds, $2 limit, $3 clock offset (tests). No ORDER BY: updated_at has no index (migration 0013: the
# session row's updates stay heap-only), so each batch is a scan that stops at its limit, not a full scan and
# a sort per batch; every session it finds is expired anyway.
EXPIRE_SESSIONS = """WITH doomed AS (
  SELECT session_id FROM sessions s
  WHERE updated_at < now() + $3 * interval '1 second' - $1 * interval '1 second'
    AND status IN ('idle', 'failed')
    AND NOT EXISTS (SELECT 1 FROM inputs i WHERE i.session_id = s.session_id AND i.status IN ('queued', 'running'))
  LIMIT $2
  FOR UPDATE SKIP LOCKED)
DELETE FROM sessions s USING doomed d WHERE s.session_id = d.session_id RETURNING s.session_id"""
# Webhook outbox (migration 0010). $1 lease_s, $2 limit, $3 the clock offset (seconds).
CLAIM_WEBHOOKS = """WITH due AS (
  SELECT id FROM webhook_outbox
  WHERE status = 'pending' AND next_at <= now() + $3 * interval '1 second'
    AND (lease_expires_at IS NULL OR lease_expires_at <= now() + $3 * interval '1 second')
  ORDER BY id LIMIT $2
  FOR UPDATE SKIP LOCKED)
UPDATE webhook_outbox o
SET attempts = o.attempts + 1,
    lease_token = md5(random()::text || clock_timestamp()::text || o.id::text),
    lease_expires_at = now() + ($3 + $1) * interval '1 second'
FROM due WHERE o.id = due.id
RETURNING o.id, o.webhook_id, o.url, o.session_id, o.run_id, o.input_seq, o.type, o.seq, o.created_at,
          o.attempts, o.lease_token"""
WEBHOOK_DELIVERED = """DELETE FROM webhook_outbox WHERE webhook_id = $1 AND lease_token = $2 AND status = 'pending'
RETURNING id"""
# $3 delay in seconds (NULL: give up), $4 the clock offset.
WEBHOOK_FAILED = """UPDATE webhook_outbox
SET status = CASE WHEN $3::float8 IS NULL THEN 'failed' ELSE 'pending' END,
    next_at = CASE WHEN $3::float8 IS NULL THEN next_at
                   ELSE now() + ($4 + $3::float8) * interval '1 second' END,
    lease_token = NULL, lease_expires_at = NULL
WHERE webhook_id = $1 AND lease_token = $2 AND status = 'pending' RETURNING id"""
LIST_SESSIONS = f"SELECT {SESSION_COLS} FROM sessions WHERE owner = $1 ORDER BY updated_at DESC, session_id"
# The head and the pieces of the saved state (migration 0006), in one statement (one snapshot).
LOAD_STATE = "SELECT team_state, svc_pieces(session_id) AS pieces FROM sessions WHERE session_id = $1"
LAST_SEQ = "SELECT last_seq FROM sessions WHERE session_id = $1"
RECENT_SESSIONS = "SELECT session_id, last_seq FROM sessions WHERE updated_at >= $1 AND last_seq > 0"
READ_AFTER = f"SELECT {ENTRY_COLS} FROM entries WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
READ_BEFORE = f"""
SELECT {ENTRY_COLS} FROM entries WHERE session_id = $1 AND seq < $2 AND seq > $3 ORDER BY seq DESC LIMIT $4"""
GET_CURSOR = "SELECT seq FROM cursors WHERE session_id = $1 AND client_id = $2"
NOTIFY_MANY = "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS n(c, p)"
CANCEL_FLAG = "SELECT cancel_requested FROM inputs WHERE id = $1 AND lease_token = $2 AND status = 'running'"
COUNTS = "SELECT status, count(*) AS n FROM inputs WHERE status IN ('queued', 'running') GROUP BY status"
# recover_expired: candidates by the database's clock; svc_requeue re-checks each under its session lock.
EXPIRED = """
SELECT i.id, i.session_id, i.input_seq, i.attempt, i.run_id, i.lease_token, i.interruptions, i.cancel_requested,
       s.status, EXISTS (SELECT 1 FROM inputs r WHERE r.session_id = i.session_id AND r.status = 'queued'
                         AND r.strategy = 'rollback' AND r.id > i.id) AS rollback
FROM inputs i JOIN sessions s ON s.session_id = i.session_id
WHERE i.status = 'running' AND i.lease_expires_at < now() + $1::float8 * interval '1 second' ORDER BY i.id"""
# Double-texting: a rollback message waits behind the run (README "Double-texting").
ROLLBACK_REQUESTED = """
SELECT EXISTS (SELECT 1 FROM inputs WHERE session_id = $1 AND status = 'queued' AND strategy = 'rollback'
               AND id > $2)"""
READ_DRAFT = "SELECT run_id, message_id, source, content FROM drafts WHERE session_id = $1"
# The session's current run (rules.is_run decides whether it is one), owner-checked.
CURRENT_RUN = """
SELECT i.id, i.status, i.input_seq, i.attempt, i.run_id FROM inputs i JOIN sessions s ON s.session_id = i.session_id
WHERE i.session_id = $1 AND s.owner = $2 AND i.status IN ('queued', 'running')
ORDER BY i.status = 'running' DESC, i.id LIMIT 1"""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def from_us(us: int) -> datetime:
    """A time the SQL functions return as integer microseconds since the epoch (exact, unlike a float)."""
    return _EPOCH + timedelta(microseconds=us)


def planned_save(
    state: Mapping[str, Any], stored: Manifest | None, memo: PiecesMemo | None = None
) -> StateSave:
    """``state_pieces.plan_save``, with BadRequest for what JSON cannot carry (as ``json_text``)."""
    try:
        return plan_save(state, stored, memo)
    except orjson.JSONEncodeError as exc:
        raise BadRequest(f"the database cannot store this value: {exc}") from exc


def json_text(value: Any) -> str:
    """A JSON value as the SQL functions take it: JSON text in a string (see 0005_verb_functions.sql: a NUL in
    content survives only this way). BadRequest for what JSON cannot carry (a lone surrogate)."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError as exc:
        raise BadRequest(f"the database cannot store this value: {exc}") from exc


def new_entry_json(entry: NewEntry) -> dict[str, Any]:
    """An entry to append, as the SQL functions take it."""
    return {
        "type": entry.type,
        "source": entry.source,
        "content": json_text(entry.content),
        "metadata": json_text(entry.metadata),
    }


def appended(
    session_id: str,
    news: Sequence[NewEntry],
    last: int,
    at: datetime,
    run_id: str | None,
    client_msg_id: str | None = None,
) -> list[Entry]:
    """The entries a function numbered up to ``last`` at ``at``, as the log now holds them."""
    first = last - len(news) + 1
    return [
        Entry(first + i, session_id, e.type, e.source, e.content, at, run_id, client_msg_id, e.metadata)
        for i, e in enumerate(news)
    ]


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
        multitask_strategy=row["multitask_strategy"],
        webhook_url=row["webhook_url"],
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
