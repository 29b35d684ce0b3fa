"""The queue rules in SQL: the SQLite store's queue verbs (enqueue, claim, the fenced writes of a run,
recovery). Same conventions as ops.py: each function runs on a cursor inside the writer's transaction
(or a read transaction) and never commits; the single writer's lock makes SELECT-then-UPDATE atomic.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

import orjson

from service.errors import LeaseLost, NotFound
from service.models import (
    RUN_FAILED,
    USER_INPUT_REQUESTED,
    Answer,
    CancelRequest,
    Claim,
    Draft,
    Enqueued,
    Entry,
    MultitaskStrategy,
    NewEntry,
    PartialReason,
    SessionStatus,
    interruption,
    message_ids,
    new_lease_token,
    new_run_id,
    partial,
    retry_cancelled,
    started,
    team_reset,
)
from service.queue import rules
from service.queue.sqlite.ops import (
    Db,
    append_entries,
    create_session,
    load_team_state,
    owned,
    set_status,
)
from service.queue.sqlite.schema import stamp
from service.queue.state_pieces import StateSave, plan_save

INSERT_INPUT = """INSERT INTO inputs (session_id, input_seq, content, status, attempt, not_before, created_at,
strategy, trace_context) VALUES (?, ?, ?, 'queued', 1, ?, ?, ?, ?)"""

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


def enqueue(
    db: Db,
    now: datetime,
    owner: str,
    session_id: str,
    content: str,
    client_msg_id: str | None,
    team: str,
    max_queued: int | None,
    strategy: str | None = None,
    trace_context: dict[str, str] | None = None,
) -> Enqueued:
    sql = "SELECT owner, status, last_seq, multitask_strategy FROM sessions WHERE session_id = ?"
    row = db.execute(sql, (session_id,)).fetchone()
    if row is None:
        create_session(db, now, owner, session_id, team, None)
        row = (owner, SessionStatus.IDLE.value, 0, MultitaskStrategy.ENQUEUE.value)
    elif row[0] != owner:
        raise NotFound(f"session {session_id!r} not found")
    chosen = rules.strategy(strategy, row[3])
    checks = max_queued is not None or chosen is MultitaskStrategy.REJECT
    if client_msg_id is not None and checks:
        # A duplicate is answered before the queue limit or the strategy is looked at (it enqueues nothing).
        seen = _seen(db, session_id, client_msg_id)
        if seen is not None:
            return replace(seen, strategy=chosen)
    if checks:
        sql = "SELECT count(*) FROM inputs WHERE session_id = ? AND status = 'queued'"
        (queued,) = db.execute(sql, (session_id,)).fetchone()
        if rules.rejects(chosen, SessionStatus(row[1]), queued):
            raise rules.busy(session_id)
        if max_queued is not None and queued >= max_queued:
            raise rules.queue_full(session_id, queued, max_queued)
    # A running (or awaiting) session stays so; an idle or failed one now has work waiting.
    status = SessionStatus.QUEUED if row[1] in (SessionStatus.IDLE, SessionStatus.FAILED) else None
    user = NewEntry("TextMessage", "user", content)
    try:
        (entry,) = append_entries(
            db, now, session_id, [user], None, client_msg_id, last=row[2], status=status
        )
    except sqlite3.IntegrityError:
        # The UNIQUE index on (session_id, client_msg_id) found the duplicate: one statement fewer on the common
        # path than looking first. Only the failed INSERT was undone, and it ran before anything else.
        seen = None if client_msg_id is None else _seen(db, session_id, client_msg_id)
        if seen is None:
            raise
        return replace(seen, strategy=chosen)
    trace = orjson.dumps(trace_context).decode() if trace_context else None
    db.execute(
        INSERT_INPUT, (session_id, entry.seq, content, now.timestamp(), stamp(now), chosen.value, trace)
    )
    return Enqueued(session_id, entry.seq, client_msg_id, False, entry, chosen)


def _seen(db: Db, session_id: str, client_msg_id: str) -> Enqueued | None:
    sql = "SELECT seq FROM entries WHERE session_id = ? AND client_msg_id = ?"
    row = db.execute(sql, (session_id, client_msg_id)).fetchone()
    return None if row is None else Enqueued(session_id, int(row[0]), client_msg_id, True, None)


def claim(db: Db, now: datetime, worker_id: str, lease_s: float) -> Claim | None:
    row = db.execute(CLAIMABLE, {"now": now.timestamp()}).fetchone()
    if row is None:
        return None
    input_id, session_id, input_seq, content, attempt, owner, team, last, failures, trace = row
    token, run_id = new_lease_token(), new_run_id()
    db.execute(TAKE, (token, now.timestamp() + lease_s, worker_id, run_id, input_id))
    # The run's first entry and its saved state come with the claim: two round trips to the writer fewer.
    (entry,) = append_entries(
        db, now, session_id, [started(input_seq, attempt)], run_id, last=last, status=SessionStatus.RUNNING
    )
    state, manifest = load_team_state(db, session_id)
    return Claim(
        input_id, session_id, owner, team, input_seq, content, attempt, run_id, token, worker_id,
        started=entry, team_state=state, state_manifest=manifest, failures=failures,
        trace_context=None if trace is None else orjson.loads(trace),
    )  # fmt: skip


def fence(db: Db, claim: Claim) -> int:
    """LeaseLost unless the claim still holds its input; else the session's last seq."""
    row = db.execute(FENCE, (claim.input_id, claim.lease_token)).fetchone()
    if row is None:
        raise LeaseLost()
    return int(row[0])


def append(db: Db, now: datetime, claim: Claim, news: Sequence[NewEntry]) -> list[Entry]:
    last = fence(db, claim)
    asks = any(n.type == USER_INPUT_REQUESTED for n in news)
    status = SessionStatus.AWAITING_INPUT if asks else None
    written = append_entries(db, now, claim.session_id, news, claim.run_id, last=last, status=status)
    ids = message_ids(news)
    if ids:  # the message a draft was streaming is now in the log
        marks = ", ".join("?" * len(ids))
        db.execute(
            f"DELETE FROM drafts WHERE session_id = ? AND message_id IN ({marks})", (claim.session_id, *ids)
        )
    return written


SAVE_DRAFT = """INSERT INTO drafts (session_id, run_id, message_id, source, content, updated_at)
VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (session_id) DO UPDATE SET run_id = excluded.run_id,
message_id = excluded.message_id, source = excluded.source, content = excluded.content,
updated_at = excluded.updated_at"""
DROP_DRAFT = "DELETE FROM drafts WHERE session_id = ?"


def save_draft(db: Db, now: datetime, claim: Claim, draft: Draft) -> None:
    fence(db, claim)
    args = (claim.session_id, draft.run_id, draft.message_id, draft.source, draft.text, stamp(now))
    db.execute(SAVE_DRAFT, args)


def read_draft(db: Db, session_id: str) -> Draft | None:
    sql = "SELECT run_id, message_id, source, content FROM drafts WHERE session_id = ?"
    row = db.execute(sql, (session_id,)).fetchone()
    return None if row is None else Draft(row[0], row[1], row[2], row[3])


def heartbeat(db: Db, now: datetime, claim: Claim, lease_s: float) -> bool:
    cur = db.execute(HEARTBEAT, (now.timestamp() + lease_s, claim.input_id, claim.lease_token))
    return cur.rowcount > 0


def cancel_requested(db: Db, claim: Claim) -> bool:
    sql = "SELECT cancel_requested FROM inputs WHERE id = ? AND lease_token = ? AND status = 'running'"
    row = db.execute(sql, (claim.input_id, claim.lease_token)).fetchone()
    # Fenced (recovered, or its session deleted): the run can no longer write anything, so it should stop too.
    return row is None or bool(row[0])


ANSWERS = "SELECT input_seq, content FROM inputs WHERE answer_for = ? ORDER BY id LIMIT 1 OFFSET ?"
OLDEST_QUEUED = """SELECT id, input_seq, content, strategy FROM inputs WHERE session_id = ? AND status = 'queued'
ORDER BY id"""
BIND_ANSWER = "UPDATE inputs SET status = 'done', answer_for = ? WHERE id = ?"


def take_answer(db: Db, now: datetime, claim: Claim, index: int) -> Answer | None:
    fence(db, claim)
    row = db.execute(ANSWERS, (claim.input_id, index)).fetchone()
    if row is None:
        (taken,) = db.execute(
            "SELECT count(*) FROM inputs WHERE answer_for = ?", (claim.input_id,)
        ).fetchone()
        queued = db.execute(OLDEST_QUEUED, (claim.session_id,)).fetchone()
        if taken != index or queued is None or not rules.may_answer(queued[3]):
            return None  # no answer yet, or the next message was sent to interrupt or roll back this run
        db.execute(BIND_ANSWER, (claim.input_id, queued[0]))
        row = queued[1:3]
    set_status(db, claim.session_id, SessionStatus.RUNNING, now)
    return Answer(int(row[0]), row[1])


def rollback_requested(db: Db, claim: Claim) -> bool:
    sql = (
        "SELECT 1 FROM inputs WHERE session_id = ? AND status = 'queued' AND strategy = 'rollback' AND id > ?"
    )
    return db.execute(sql, (claim.session_id, claim.input_id)).fetchone() is not None


def finish(db: Db, now: datetime, claim: Claim, entry: NewEntry, team_state: dict[str, Any] | None) -> Entry:
    if db.execute(DONE, (claim.input_id, claim.lease_token)).rowcount == 0:
        raise LeaseLost()
    save = None if team_state is None else plan_save(team_state, claim.state_manifest)
    return _ended(db, now, claim.session_id, entry, claim.run_id, save)


def _ended(
    db: Db,
    now: datetime,
    session_id: str,
    entry: NewEntry,
    run_id: str | None,
    team_state: StateSave | None = None,
) -> Entry:
    """Append the terminal ``entry`` of an input just marked done; the session is queued when more inputs
    wait, else failed (a final run_failed) or idle."""
    status = SessionStatus.FAILED if entry.type == RUN_FAILED else SessionStatus.IDLE
    db.execute(DROP_DRAFT, (session_id,))
    (done,) = append_entries(
        db, now, session_id, [entry], run_id, status=status, queued_first=True, team_state=team_state
    )
    return done


def requeue(
    db: Db, now: datetime, claim: Claim, entry: NewEntry, not_before: datetime, *, failed: bool
) -> list[Entry]:
    """retry() (failed) and release(): the input goes back to the queue, keeping its place, with attempt + 1;
    an input asked to stop ends instead (``run_cancelled``): a cancel is never undone by a retry or a stop."""
    sql = "SELECT cancel_requested FROM inputs WHERE id = ? AND lease_token = ? AND status = 'running'"
    flag = db.execute(sql, (claim.input_id, claim.lease_token)).fetchone()
    if flag is None:
        raise LeaseLost()
    if flag[0]:
        db.execute(DONE, (claim.input_id, claim.lease_token))
        written = append_entries(db, now, claim.session_id, [entry], claim.run_id)
        stop = retry_cancelled(claim.input_seq, claim.attempt)
        return [*written, _ended(db, now, claim.session_id, stop, claim.run_id)]
    db.execute(REQUEUE, (int(failed), 0, not_before.timestamp(), claim.input_id, claim.lease_token))
    db.execute(DROP_DRAFT, (claim.session_id,))
    status = SessionStatus.QUEUED
    return append_entries(db, now, claim.session_id, [entry], claim.run_id, status=status)


def recover_expired(
    db: Db, now: datetime, max_interruptions: int, cutoff: datetime | None = None
) -> list[Entry]:
    """Re-queue (or, at the interruption cap, end) running inputs whose lease expired before ``cutoff``."""
    # No ORDER BY: it would make SQLite walk the whole table in rowid order instead of using the lease index.
    sql = """SELECT i.id, i.session_id, i.input_seq, i.attempt, i.run_id, i.lease_token, i.interruptions,
    i.cancel_requested, s.status, EXISTS (SELECT 1 FROM inputs AS r WHERE r.session_id = i.session_id
      AND r.status = 'queued' AND r.strategy = 'rollback' AND r.id > i.id)
    FROM inputs AS i JOIN sessions AS s ON s.session_id = i.session_id
    WHERE i.status = 'running' AND i.lease_expires_at < ?"""
    recovered: list[Entry] = []
    for input_id, session_id, input_seq, attempt, run_id, token, died, stop, status, rollback in sorted(
        db.execute(sql, ((cutoff or now).timestamp(),))
    ):
        draft = read_draft(db, session_id)
        if draft is not None:
            db.execute(DROP_DRAFT, (session_id,))
            if draft.run_id == run_id:  # what the dead run had streamed of its last message
                cut = partial(draft, PartialReason.INTERRUPTED)
                recovered += append_entries(db, now, session_id, [cut], run_id)
        waiting = status == SessionStatus.AWAITING_INPUT
        entry, final, counted = interruption(
            input_seq,
            attempt,
            died,
            max_interruptions,
            waiting_for_human=waiting,
            cancel_requested=bool(stop),
            rolled_back=bool(rollback),
        )
        if final:  # at the cap, or asked to stop before it died: it ends here
            db.execute(DONE, (input_id, token))
            recovered.append(_ended(db, now, session_id, entry, run_id))
            continue
        db.execute(REQUEUE, (0, int(counted), now.timestamp(), input_id, token))  # not a failure
        recovered += append_entries(db, now, session_id, [entry], run_id, status=SessionStatus.QUEUED)
    return recovered


# The session's current run: its running input, else an input queued again after a failure or an interruption
# (attempt > 1) at the head of its queue. Inputs never started are not runs.
CURRENT_RUN = """SELECT id, status, input_seq, attempt, run_id FROM inputs
WHERE session_id = ? AND status IN ('queued', 'running') ORDER BY status = 'running' DESC, id LIMIT 1"""


def request_cancel(
    db: Db, now: datetime, owner: str, session_id: str, wanted: int | None = None
) -> CancelRequest:
    if owned(db, owner, session_id) is None:
        return CancelRequest()
    row = db.execute(CURRENT_RUN, (session_id,)).fetchone()
    if row is None:
        return CancelRequest()
    input_id, status, input_seq, attempt, run_id = row
    if not rules.targets(wanted, input_seq):
        return CancelRequest()
    if status == "running":
        db.execute("UPDATE inputs SET cancel_requested = 1 WHERE id = ?", (input_id,))
        return CancelRequest(running=True)
    if attempt == 1:
        return CancelRequest()
    db.execute("UPDATE inputs SET status = 'done' WHERE id = ?", (input_id,))
    return CancelRequest(entry=_ended(db, now, session_id, retry_cancelled(input_seq, attempt - 1), run_id))


def reset_team_state(db: Db, now: datetime, owner: str, session_id: str) -> Entry | None:
    if owned(db, owner, session_id) is None:
        return None
    head = db.execute(CURRENT_RUN, (session_id,)).fetchone()
    if head is not None and rules.is_run(head[1], head[3]):
        raise rules.run_in_progress(session_id)
    db.execute("DELETE FROM team_states WHERE session_id = ?", (session_id,))
    db.execute("DELETE FROM state_pieces WHERE session_id = ?", (session_id,))
    (entry,) = append_entries(db, now, session_id, [team_reset()], None)
    return entry


def counts(db: Db) -> dict[str, int]:
    # Two counts, not GROUP BY status: each is answered from its partial index, never a scan of done inputs.
    queued, running = db.execute(
        "SELECT (SELECT count(*) FROM inputs WHERE status = 'queued'),"
        " (SELECT count(*) FROM inputs WHERE status = 'running')"
    ).fetchone()
    return {"queued": int(queued), "running": int(running)}


def has_claimable(db: Db, now: datetime) -> bool:
    return db.execute(CLAIMABLE, {"now": now.timestamp()}).fetchone() is not None
