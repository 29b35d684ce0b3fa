"""The synchronous bodies of the SQLite store's verbs, one function a verb: the twin of PostgreSQL's verb
functions (``migrations/postgres/0005_verb_functions.sql`` and later), each named as its function there without
``svc_`` (``enqueue`` is ``svc_enqueue``, ``cancel`` ``svc_cancel``, ``end`` ``svc_end``); the reads are named
as the store's verbs. Their SQL and row mapping are in statements.py; the queue rules they apply are decided in
service/queue/rules.py, or are SQL that carries the rule's name (``CLAIMABLE``).

Each function runs on a cursor of the writer connection inside the writer's transaction, or of the reader
connection inside a read transaction (engine.py); none of them commits. (A cursor rather than the connection: a
connection's ``execute`` creates a cursor per call, a measurable share of these small statements.) Because the
single writer holds SQLite's write lock for the whole batch, a SELECT followed by an UPDATE is atomic here.

Sections: sessions, log and cursors; the queue (enqueue, claim, the fenced writes of a run, recovery); the
webhook outbox (README "Webhooks"), whose rows the ``entries_webhook`` trigger (migration 0010) writes in the
transaction of their entry.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

import orjson

from service.errors import Conflict, LeaseLost, NotFound
from service.models import (
    USER_INPUT_REQUESTED,
    Answer,
    CancelRequest,
    Claim,
    Draft,
    Enqueued,
    Entry,
    Frames,
    MultitaskStrategy,
    NewEntry,
    Page,
    PartialReason,
    Session,
    SessionStatus,
    WebhookEvent,
    interruption,
    message_ids,
    new_lease_token,
    new_run_id,
    new_session_id,
    partial,
    retry_cancelled,
    started,
    team_reset,
)
from service.queue import rules
from service.queue.sqlite import statements as q
from service.queue.sqlite.statements import stamp
from service.queue.state_pieces import (
    MANIFEST,
    Manifest,
    PiecesMemo,
    StateSave,
    assemble,
    head_digest,
    manifest_of,
    plan_save,
)

Db = sqlite3.Cursor
Known = (
    tuple[str, dict[str, Any]] | None
)  # (head digest, the state the claimer holds): WrittenHeads.all_known


# --- sessions -------------------------------------------------------------------------------------------------
def get_session(db: Db, owner: str, session_id: str) -> Session | None:
    row = db.execute(q.GET_SESSION, (session_id, owner)).fetchone()
    return None if row is None else q.session_of(row)


def create_session(
    db: Db,
    now: datetime,
    owner: str,
    session_id: str | None,
    team: str,
    title: str | None,
    multitask_strategy: str = "enqueue",
    webhook_url: str | None = None,
) -> Session:
    sid = session_id or new_session_id()
    if db.execute(q.SESSION_EXISTS, (sid,)).fetchone() is not None:
        raise Conflict(f"session {sid!r} already exists")
    db.execute(q.INSERT_SESSION, (sid, owner, team, title, stamp(now), stamp(now), multitask_strategy))
    if webhook_url is not None:
        db.execute(q.SET_SESSION_WEBHOOK, (webhook_url, sid))
    return Session(sid, owner, team, title, SessionStatus.IDLE, 0, now, now, multitask_strategy, webhook_url)


def list_sessions(db: Db, owner: str) -> list[Session]:
    sessions = [q.session_of(row) for row in db.execute(q.LIST_SESSIONS, (owner,))]
    sessions.sort(key=lambda s: s.updated_at, reverse=True)  # stable: ties stay in session_id order
    return sessions


def delete_session(db: Db, owner: str, session_id: str) -> bool:
    return db.execute(q.DELETE_SESSION, (session_id, owner)).rowcount > 0


def expire_sessions(db: Db, cutoff: datetime, limit: int, max_entries: int) -> list[str]:
    """Delete up to ``limit`` idle sessions last written before ``cutoff``, stopping once about ``max_entries``
    log entries are taken (at least one session), so one call never holds the writer long."""
    ids: list[str] = []
    entries = 0
    for sid, last_seq in db.execute(q.EXPIRABLE, (stamp(cutoff), max(0, limit))).fetchall():
        if ids and entries + int(last_seq) > max_entries:
            break
        ids.append(sid)
        entries += int(last_seq)
    db.executemany(q.EXPIRE_SESSION, [(sid,) for sid in ids])
    return ids


def set_status(db: Db, session_id: str, status: SessionStatus, now: datetime) -> None:
    db.execute(q.SET_STATUS, (status.value, stamp(now), session_id))


# --- log, cursors and team state ------------------------------------------------------------------------------
def last_seq(db: Db, session_id: str) -> int:
    """The session's last seq; 0 for an unknown session (its log is empty)."""
    row = db.execute(q.LAST_SEQ, (session_id,)).fetchone()
    return 0 if row is None else int(row[0])


def append_entries(
    db: Db,
    now: datetime,
    session_id: str,
    news: Sequence[NewEntry],
    run_id: str | None,
    client_msg_id: str | None = None,
    *,
    last: int | None = None,
    status: SessionStatus | None = None,
    team_state: StateSave | None = None,
) -> list[Entry]:
    """Number the entries after the session's last seq (contiguous: the writer lock serialises appends) and
    update the session in the same statement (svc_allocate and svc_insert_entries). ``last`` saves a read when
    the caller already has last_seq; ``status`` None keeps the session's status."""
    if last is None:
        (last,) = db.execute(q.LAST_SEQ, (session_id,)).fetchone()
    assert last is not None
    created = stamp(now)
    entries = []
    for seq, new in enumerate(news, start=last + 1):
        entry = Entry(
            seq, session_id, new.type, new.source, new.content, now, run_id, client_msg_id, dict(new.metadata)
        )
        db.execute(
            q.INSERT_ENTRY,
            (seq, session_id, entry.type, entry.source, orjson.dumps(entry.content).decode(), created, run_id,
             client_msg_id, orjson.dumps(entry.metadata).decode()),
        )  # fmt: skip
        entries.append(entry)
    db.execute(q.TOUCH, (last + len(entries), created, status and status.value, session_id))
    if team_state is not None:
        save_team_state(db, session_id, team_state, created)
    return entries


def save_team_state(db: Db, session_id: str, save: StateSave, created: str) -> None:
    """Write a planned save (``state_pieces.plan_save``): the head, and only the pieces that changed."""
    if save.clear:
        db.execute(q.CLEAR_PIECES, (session_id,))
    for write in save.writes:
        if not save.clear:
            db.execute(q.TRIM_PIECES, (session_id, write.path, write.keep))
        db.executemany(
            q.INSERT_PIECE,
            [(session_id, write.path, write.keep + i, body) for i, body in enumerate(write.items)],
        )
    db.execute(q.SAVE_STATE, (session_id, save.head, created))


def read_log(db: Db, session_id: str, after: int | None, before: int | None, limit: int) -> Page:
    last = last_seq(db, session_id)
    low, limit = max(0, after or 0), max(0, limit)  # a negative LIMIT means "no limit" to SQLite
    if before is None:
        rows = db.execute(q.READ_AFTER, (session_id, low, limit + 1)).fetchall()
        return Page(session_id, [q.entry_of(r) for r in rows[:limit]], last, len(rows) > limit)
    rows = db.execute(q.READ_BEFORE, (session_id, low, before, limit + 1)).fetchall()
    page = [q.entry_of(r) for r in reversed(rows[:limit])]
    return Page(session_id, page, last, len(rows) > limit)


def read_frames(db: Db, session_id: str, after: int, limit: int) -> Frames:
    """``read_log(after=...)`` pre-serialised (statements.frames_of)."""
    last = last_seq(db, session_id)
    low, limit = max(0, after), max(0, limit)
    rows = db.execute(q.READ_FRAMES, (session_id, low, limit + 1)).fetchall()
    frames, seqs, ids = q.frames_of(session_id, rows[:limit])
    return Frames(session_id, frames, seqs, ids, last, len(rows) > limit)


def get_cursor(db: Db, session_id: str, client_id: str) -> int | None:
    row = db.execute(q.GET_CURSOR, (session_id, client_id)).fetchone()
    return None if row is None else int(row[0])


def set_cursor(db: Db, session_id: str, client_id: str, seq: int) -> int:
    row = db.execute(q.LAST_SEQ, (session_id,)).fetchone()
    if row is None:
        return 0  # an unknown session has an empty log: the cursor clamps to 0 and there is nothing to keep
    db.execute(q.SET_CURSOR, (session_id, client_id, rules.cursor_seq(seq, int(row[0]))))
    stored = get_cursor(db, session_id, client_id)
    assert stored is not None
    return stored


def load_team_state(
    db: Db, session_id: str, known: Known = None
) -> tuple[dict[str, Any] | None, Manifest | None]:
    """The saved state reassembled from its head and pieces, and the manifest of what is stored; ``known``'s state
    itself when the stored head has ``known``'s digest (``state_pieces.WrittenHeads``)."""
    row = db.execute(q.LOAD_STATE, (session_id,)).fetchone()
    if row is None:
        return None, None
    head = orjson.loads(row[0])
    if not isinstance(head, dict) or MANIFEST not in head:
        return head, None  # saved whole, before migration 0006
    if known is not None and head_digest(row[0]) == known[0]:
        return known[1], manifest_of(head)
    bodies: dict[str, list[str]] = {}
    for path, body in db.execute(q.LOAD_PIECES, (session_id,)):
        bodies.setdefault(path, []).append(body)
    # One parse per list: the stored item texts joined into one JSON array.
    pieces = {path: orjson.loads("[" + ",".join(items) + "]") for path, items in bodies.items()}
    return assemble(head, pieces)


# --- queue ----------------------------------------------------------------------------------------------------
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
    row = db.execute(q.ENQUEUE_SESSION, (session_id,)).fetchone()
    if row is None:
        create_session(db, now, owner, session_id, team, None)
        row = (owner, SessionStatus.IDLE.value, 0, MultitaskStrategy.ENQUEUE.value)
    elif row[0] != owner:
        raise NotFound(f"session {session_id!r} not found")
    current = SessionStatus(row[1])
    chosen = rules.strategy(strategy, row[3])
    checks = max_queued is not None or chosen is MultitaskStrategy.REJECT
    if client_msg_id is not None and checks:
        # A duplicate is answered before the queue limit or the strategy is looked at (it enqueues nothing).
        seen = _seen(db, session_id, client_msg_id)
        if seen is not None:
            return replace(seen, strategy=chosen)
    if checks:
        (queued,) = db.execute(q.QUEUED_COUNT, (session_id,)).fetchone()
        if rules.rejects(chosen, current, queued):
            raise rules.busy(session_id)
        if max_queued is not None and queued >= max_queued:
            raise rules.queue_full(session_id, queued, max_queued)
    status = rules.status_after_enqueue(current)
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
        q.INSERT_INPUT, (session_id, entry.seq, content, now.timestamp(), stamp(now), chosen.value, trace)
    )
    return Enqueued(session_id, entry.seq, client_msg_id, False, entry, chosen)


def _seen(db: Db, session_id: str, client_msg_id: str) -> Enqueued | None:
    row = db.execute(q.SEEN, (session_id, client_msg_id)).fetchone()
    return None if row is None else Enqueued(session_id, int(row[0]), client_msg_id, True, None)


def claimable(db: Db, now: datetime) -> bool:
    return db.execute(q.CLAIMABLE, {"now": now.timestamp()}).fetchone() is not None


def claim(
    db: Db,
    now: datetime,
    worker_id: str,
    lease_s: float,
    known: Callable[[str], Known] | None = None,
) -> Claim | None:
    row = db.execute(q.CLAIMABLE, {"now": now.timestamp()}).fetchone()
    if row is None:
        return None
    input_id, session_id, input_seq, content, attempt, owner, team, last, failures, trace = row
    token, run_id = new_lease_token(), new_run_id()
    db.execute(q.TAKE, (token, now.timestamp() + lease_s, worker_id, run_id, input_id))
    # The run's first entry and its saved state come with the claim: two round trips to the writer fewer.
    (entry,) = append_entries(
        db, now, session_id, [started(input_seq, attempt)], run_id, last=last, status=SessionStatus.RUNNING
    )
    state, manifest = load_team_state(db, session_id, None if known is None else known(session_id))
    return Claim(
        input_id, session_id, owner, team, input_seq, content, attempt, run_id, token, worker_id,
        started=entry, team_state=state, state_manifest=manifest, failures=failures,
        trace_context=None if trace is None else orjson.loads(trace),
    )  # fmt: skip


def fenced(db: Db, claim: Claim) -> int:
    """LeaseLost unless the claim still holds its input; else the session's last seq."""
    row = db.execute(q.FENCE, (claim.input_id, claim.lease_token)).fetchone()
    if row is None:
        raise LeaseLost()
    return int(row[0])


def append(db: Db, now: datetime, claim: Claim, news: Sequence[NewEntry]) -> list[Entry]:
    last = fenced(db, claim)
    asks = any(n.type == USER_INPUT_REQUESTED for n in news)
    status = SessionStatus.AWAITING_INPUT if asks else None
    written = append_entries(db, now, claim.session_id, news, claim.run_id, last=last, status=status)
    ids = message_ids(news)
    if ids:  # the message a draft was streaming is now in the log
        db.execute(q.drop_drafts_of(len(ids)), (claim.session_id, *ids))
    return written


def save_draft(db: Db, now: datetime, claim: Claim, draft: Draft) -> None:
    fenced(db, claim)
    args = (claim.session_id, draft.run_id, draft.message_id, draft.source, draft.text, stamp(now))
    db.execute(q.SAVE_DRAFT, args)


def read_draft(db: Db, session_id: str) -> Draft | None:
    row = db.execute(q.READ_DRAFT, (session_id,)).fetchone()
    return None if row is None else Draft(row[0], row[1], row[2], row[3])


def heartbeat(db: Db, now: datetime, claim: Claim, lease_s: float) -> bool:
    cur = db.execute(q.HEARTBEAT, (now.timestamp() + lease_s, claim.input_id, claim.lease_token))
    return cur.rowcount > 0


def cancel_requested(db: Db, claim: Claim) -> bool:
    row = db.execute(q.CANCEL_FLAG, (claim.input_id, claim.lease_token)).fetchone()
    # Fenced (recovered, or its session deleted): the run can no longer write anything, so it should stop too.
    return row is None or bool(row[0])


def take_answer(db: Db, now: datetime, claim: Claim, index: int) -> Answer | None:
    fenced(db, claim)
    row = db.execute(q.ANSWERS, (claim.input_id, index)).fetchone()
    if row is None:
        (taken,) = db.execute(q.ANSWERS_TAKEN, (claim.input_id,)).fetchone()
        queued = db.execute(q.OLDEST_QUEUED, (claim.session_id,)).fetchone()
        if taken != index or queued is None or not rules.may_answer(queued[3]):
            return None  # no answer yet, or the next message was sent to interrupt or roll back this run
        db.execute(q.BIND_ANSWER, (claim.input_id, queued[0]))
        row = queued[1:3]
    set_status(db, claim.session_id, SessionStatus.RUNNING, now)
    return Answer(int(row[0]), row[1])


def rollback_requested(db: Db, claim: Claim) -> bool:
    return _rollback_waits(db, claim.session_id, claim.input_id)


def _rollback_waits(db: Db, session_id: str, input_id: int) -> bool:
    """A rollback message queued behind the input (README "Double-texting")."""
    return db.execute(q.ROLLBACK_REQUESTED, (session_id, input_id)).fetchone() is not None


def finish(
    db: Db,
    now: datetime,
    claim: Claim,
    entry: NewEntry,
    team_state: dict[str, Any] | None,
    memo: PiecesMemo | None = None,
) -> tuple[Entry, str | None]:
    """The run's terminal entry, and the state head written (None: the state was left as it was)."""
    if db.execute(q.DONE, (claim.input_id, claim.lease_token)).rowcount == 0:
        raise LeaseLost()
    save = None if team_state is None else plan_save(team_state, claim.state_manifest, memo)
    return end(db, now, claim.session_id, entry, claim.run_id, save), None if save is None else save.head


def end(
    db: Db,
    now: datetime,
    session_id: str,
    entry: NewEntry,
    run_id: str | None,
    team_state: StateSave | None = None,
) -> Entry:
    """Append the terminal ``entry`` of an input just marked done; the session's status after it is
    ``rules.status_after_end``: queued when more inputs wait, else failed (a final run_failed) or idle."""
    more = bool(db.execute(q.MORE_QUEUED, (session_id,)).fetchone()[0])
    db.execute(q.DROP_DRAFT, (session_id,))
    status = rules.status_after_end(entry.type, more)
    (done,) = append_entries(db, now, session_id, [entry], run_id, status=status, team_state=team_state)
    return done


def requeue(
    db: Db, now: datetime, claim: Claim, entry: NewEntry, not_before: datetime, *, failed: bool
) -> list[Entry]:
    """retry() (failed) and release(): the input goes back to the queue, keeping its place, with attempt + 1;
    an input asked to stop ends instead (``run_cancelled``): a cancel is never undone by a retry or a stop."""
    flag = db.execute(q.CANCEL_FLAG, (claim.input_id, claim.lease_token)).fetchone()
    if flag is None:
        raise LeaseLost()
    if flag[0]:
        db.execute(q.DONE, (claim.input_id, claim.lease_token))
        written = append_entries(db, now, claim.session_id, [entry], claim.run_id)
        stop = retry_cancelled(claim.input_seq, claim.attempt)
        return [*written, end(db, now, claim.session_id, stop, claim.run_id)]
    db.execute(q.REQUEUE, (int(failed), 0, not_before.timestamp(), claim.input_id, claim.lease_token))
    db.execute(q.DROP_DRAFT, (claim.session_id,))
    status = SessionStatus.QUEUED
    return append_entries(db, now, claim.session_id, [entry], claim.run_id, status=status)


def recover_expired(
    db: Db, now: datetime, max_interruptions: int, cutoff: datetime | None = None
) -> list[Entry]:
    """Re-queue (or, at the interruption cap, end) running inputs whose lease expired before ``cutoff``."""
    recovered: list[Entry] = []
    for input_id, session_id, input_seq, attempt, run_id, token, died, stop, status in sorted(
        db.execute(q.EXPIRED, ((cutoff or now).timestamp(),))
    ):
        draft = read_draft(db, session_id)
        if draft is not None:
            db.execute(q.DROP_DRAFT, (session_id,))
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
            rolled_back=_rollback_waits(db, session_id, input_id),
        )
        if final:  # at the cap, or asked to stop before it died: it ends here
            db.execute(q.DONE, (input_id, token))
            recovered.append(end(db, now, session_id, entry, run_id))
            continue
        db.execute(q.REQUEUE, (0, int(counted), now.timestamp(), input_id, token))  # not a failure
        recovered += append_entries(db, now, session_id, [entry], run_id, status=SessionStatus.QUEUED)
    return recovered


def cancel(db: Db, now: datetime, owner: str, session_id: str, wanted: int | None = None) -> CancelRequest:
    if get_session(db, owner, session_id) is None:
        return CancelRequest()
    row = db.execute(q.CURRENT_RUN, (session_id,)).fetchone()
    if row is None:
        return CancelRequest()
    input_id, status, input_seq, attempt, run_id = row
    if not rules.is_run(status, attempt) or not rules.targets(wanted, input_seq):
        return CancelRequest()
    if status == "running":
        db.execute(q.ASK_CANCEL, (input_id,))
        return CancelRequest(running=True)
    db.execute(q.END_QUEUED, (input_id,))
    return CancelRequest(entry=end(db, now, session_id, retry_cancelled(input_seq, attempt - 1), run_id))


def reset(db: Db, now: datetime, owner: str, session_id: str) -> Entry | None:
    if get_session(db, owner, session_id) is None:
        return None
    head = db.execute(q.CURRENT_RUN, (session_id,)).fetchone()
    if head is not None and rules.is_run(head[1], head[3]):
        raise rules.run_in_progress(session_id)
    db.execute(q.DELETE_STATE, (session_id,))
    db.execute(q.CLEAR_PIECES, (session_id,))
    (entry,) = append_entries(db, now, session_id, [team_reset()], None)
    return entry


def counts(db: Db) -> dict[str, int]:
    queued, running = db.execute(q.COUNTS).fetchone()
    return {"queued": int(queued), "running": int(running)}


# --- webhook outbox -------------------------------------------------------------------------------------------
def set_webhook_default(db: Db, url: str | None) -> None:
    """The server default URL for sessions without their own (this process's constructor argument)."""
    db.execute(q.SET_WEBHOOK_DEFAULT, (url,))


def release_webhooks(db: Db) -> None:
    """At the start of the file's only process: no other process can be delivering, so every lease is stale."""
    db.execute(q.RELEASE_WEBHOOKS)


def claim_webhooks(db: Db, now: datetime, lease_s: float, limit: int) -> list[WebhookEvent]:
    at = now.timestamp()
    ids = [row[0] for row in db.execute(q.DUE_WEBHOOKS, (at, max(0, limit))).fetchall()]
    events = []
    for row_id in ids:
        token = new_lease_token()
        row = db.execute(q.CLAIM_WEBHOOK, (token, at + lease_s, row_id)).fetchone()
        events.append(q.webhook_of(row, token))
    return events


def webhook_delivered(db: Db, event: WebhookEvent) -> bool:
    return db.execute(q.WEBHOOK_DELIVERED, (event.webhook_id, event.lease_token)).rowcount == 1


def webhook_failed(db: Db, now: datetime, event: WebhookEvent, delay_s: float | None) -> bool:
    status, next_at = ("failed", 0.0) if delay_s is None else ("pending", now.timestamp() + delay_s)
    cur = db.execute(q.WEBHOOK_FAILED, (status, next_at, event.webhook_id, event.lease_token))
    return cur.rowcount == 1
