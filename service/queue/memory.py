"""MemoryStore: the Store contract (store.py) in dicts, for ``memory://``, unit tests and benchmarks.

Nothing is durable: "commit" means "visible to every later call". Every verb runs its body without
awaiting inside one asyncio.Lock, so each verb is atomic like a transaction. Callers get fresh objects
(entries, states), never the store's own mutable state: a caller that mutates what it got cannot corrupt
the log.

Claiming is O(log n): a heap holds the input id of every session whose oldest pending input is queued
(its head). Entries go stale (input done, running, deleted, no longer the head) and are dropped lazily
when popped.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import secrets
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, ClassVar

from service.errors import Conflict, LeaseLost, NotFound
from service.models import (
    DEFAULT_MAX_INTERRUPTIONS,
    RUN_FAILED,
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
    utcnow,
)
from service.queue import rules
from service.queue.state_pieces import HeldStates, PiecesMemo
from service.queue.store import DEFAULT_PAGE, Clock, CommitListener

QUEUED = "queued"
RUNNING = "running"


def _clone(value: Any) -> Any:
    """A deep copy of JSON-like data (tuples become lists, as after a JSON round trip in the SQL backends)."""
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clone(v) for v in value]
    return value


def _copy_entry(entry: Entry) -> Entry:
    return Entry(
        seq=entry.seq,
        session_id=entry.session_id,
        type=entry.type,
        source=entry.source,
        content=_clone(entry.content),
        created_at=entry.created_at,
        run_id=entry.run_id,
        client_msg_id=entry.client_msg_id,
        metadata=_clone(entry.metadata),
    )


@dataclass(slots=True)
class _Session:
    session_id: str
    owner: str
    team: str
    title: str | None
    created_at: datetime
    updated_at: datetime
    log: list[Entry] = field(default_factory=list)
    pending: deque[int] = field(
        default_factory=deque
    )  # input ids not done, oldest first; a running one is [0]
    cursors: dict[str, int] = field(default_factory=dict)
    msg_ids: dict[str, int] = field(default_factory=dict)  # client_msg_id -> seq of its user message
    state: dict[str, Any] | None = None
    awaiting: bool = False
    failed: bool = False  # the last run ended with a final run_failed
    draft: Draft | None = None
    multitask_strategy: str = MultitaskStrategy.ENQUEUE
    webhook_url: str | None = None

    def public(self, status: SessionStatus) -> Session:
        return Session(
            self.session_id,
            self.owner,
            self.team,
            self.title,
            status,
            len(self.log),
            self.created_at,
            self.updated_at,
            self.multitask_strategy,
            self.webhook_url,
        )


@dataclass(slots=True)
class _Input:
    input_id: int
    session_id: str
    seq: int
    content: str
    not_before: datetime
    status: str = QUEUED
    attempt: int = 1
    failures: int = 0
    interruptions: int = 0
    answers: list[Answer] = field(default_factory=list)  # taken by this input's runs, in order
    strategy: str = MultitaskStrategy.ENQUEUE
    trace_context: dict[str, str] | None = None
    lease_token: str = ""
    lease_expires_at: datetime | None = None
    run_id: str = ""
    cancel: bool = False


@dataclass(slots=True)
class _Outbox:
    event: WebhookEvent  # attempt/lease_token: of the last claim
    attempts: int = 0
    failed: bool = False
    next_at: datetime | None = None
    lease_token: str = ""
    lease_expires_at: datetime | None = None


class MemoryStore:
    dialect: ClassVar[str] = "memory"

    def __init__(
        self,
        clock: Clock = utcnow,
        max_interruptions: int = DEFAULT_MAX_INTERRUPTIONS,
        webhook_url: str | None = None,
    ) -> None:
        self._clock = clock
        self._webhook_url = webhook_url
        self._outbox: dict[str, _Outbox] = {}  # by webhook_id, in the order written
        self._max_interruptions = max_interruptions
        self._lock = asyncio.Lock()
        self._sessions: dict[str, _Session] = {}
        self._inputs: dict[int, _Input] = {}
        self._heads: list[int] = []  # heap of input ids that may be claimable (see the module docstring)
        self._in_heap: set[int] = set()
        self._next_input_id = 1
        self._work = asyncio.Event()
        self._open = False

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False

    async def ping(self) -> bool:
        return self._open

    # --- sessions, log, cursors -------------------------------------------------------------------
    async def create_session(
        self,
        owner: str,
        session_id: str | None,
        team: str,
        title: str | None,
        *,
        multitask_strategy: str = MultitaskStrategy.ENQUEUE,
        webhook_url: str | None = None,
    ) -> Session:
        rules.check_labels(session_id=session_id, title=title)
        async with self._lock:
            if session_id is None:
                session_id = self._new_session_id()
            elif session_id in self._sessions:
                raise Conflict(f"session {session_id!r} already exists")
            row = self._create(owner, session_id, team, title)
            row.multitask_strategy = MultitaskStrategy(multitask_strategy)
            row.webhook_url = webhook_url
            return self._public(row)

    async def get_session(self, owner: str, session_id: str) -> Session | None:
        rules.check_labels(session_id=session_id)
        async with self._lock:
            row = self._owned(owner, session_id)
            return None if row is None else self._public(row)

    async def list_sessions(self, owner: str) -> list[Session]:
        async with self._lock:
            rows = sorted(
                (r for r in self._sessions.values() if r.owner == owner),
                key=lambda r: r.session_id,
            )
            # Stable sort: newest activity first, ties keep session_id order.
            rows.sort(key=lambda r: r.updated_at, reverse=True)
            return [self._public(r) for r in rows]

    async def delete_session(self, owner: str, session_id: str) -> bool:
        rules.check_labels(session_id=session_id)
        async with self._lock:
            row = self._owned(owner, session_id)
            if row is None:
                return False
            for input_id in row.pending:
                # Their heap entries go stale; a running claim finds no input: LeaseLost.
                del self._inputs[input_id]
            del self._sessions[session_id]
            self._drop_outbox({session_id})
            return True

    async def expire_sessions(self, idle_s: float, limit: int) -> list[str]:
        async with self._lock:
            cutoff = self._clock() - timedelta(seconds=idle_s)
            doomed = sorted(
                (r for r in self._sessions.values() if r.updated_at < cutoff and not r.pending),
                key=lambda r: (r.updated_at, r.session_id),
            )[: max(0, limit)]
            for row in doomed:
                del self._sessions[row.session_id]
            self._drop_outbox({row.session_id for row in doomed})
            return [row.session_id for row in doomed]

    async def read_log(
        self,
        session_id: str,
        *,
        after: int | None = None,
        before: int | None = None,
        limit: int = DEFAULT_PAGE,
    ) -> Page:
        rules.check_labels(session_id=session_id)
        async with self._lock:
            row = self._sessions.get(session_id)
            log = [] if row is None else row.log
            limit = max(0, limit)
            low = max(0, after or 0)  # entries with seq > low; log[i] has seq i + 1
            if before is None:
                chunk = log[low : low + limit]
                has_more = low + limit < len(log)
            else:
                end = max(low, min(before - 1, len(log)))
                start = max(low, end - limit)
                chunk = log[start:end]
                has_more = start > low
            return Page(session_id, [_copy_entry(e) for e in chunk], len(log), has_more)

    async def read_frames(self, session_id: str, *, after: int, limit: int) -> Frames:
        return Frames.of(await self.read_log(session_id, after=after, limit=limit))

    async def get_cursor(self, session_id: str, client_id: str) -> int | None:
        rules.check_labels(session_id=session_id, client_id=client_id)
        async with self._lock:
            row = self._sessions.get(session_id)
            return None if row is None else row.cursors.get(client_id)

    async def set_cursor(self, session_id: str, client_id: str, seq: int) -> int:
        rules.check_labels(session_id=session_id, client_id=client_id)
        async with self._lock:
            row = self._sessions.get(session_id)
            if row is None:
                return 0  # nothing to point into; the SQL backends cannot store it either (foreign key)
            stored = max(row.cursors.get(client_id, 0), rules.cursor_seq(seq, len(row.log)))
            row.cursors[client_id] = stored
            return stored

    # --- queue ------------------------------------------------------------------------------------
    async def enqueue(
        self,
        owner: str,
        session_id: str,
        content: str,
        client_msg_id: str | None,
        *,
        team: str = "default",
        max_queued: int | None = None,
        strategy: str | None = None,
        trace_context: dict[str, str] | None = None,
    ) -> Enqueued:
        rules.check_labels(session_id=session_id, client_msg_id=client_msg_id)
        async with self._lock:
            row = self._sessions.get(session_id)
            if row is None:
                row = self._create(owner, session_id, team, None)
            elif row.owner != owner:
                raise NotFound(f"session {session_id!r} not found")
            chosen = rules.strategy(strategy, row.multitask_strategy)
            if client_msg_id is not None and client_msg_id in row.msg_ids:
                return Enqueued(session_id, row.msg_ids[client_msg_id], client_msg_id, True, None, chosen)
            queued = self._queued_in(row)
            if rules.rejects(chosen, self._status(row), queued):
                raise rules.busy(session_id)
            if max_queued is not None and queued >= max_queued:
                raise rules.queue_full(session_id, queued, max_queued)
            entry = self._append(row, NewEntry("TextMessage", "user", content), None, client_msg_id)
            if client_msg_id is not None:
                row.msg_ids[client_msg_id] = entry.seq
            item = _Input(self._next_input_id, session_id, entry.seq, content, not_before=self._clock())
            item.strategy = chosen
            item.trace_context = None if not trace_context else dict(trace_context)
            self._next_input_id += 1
            self._inputs[item.input_id] = item
            row.pending.append(item.input_id)
            if len(row.pending) == 1:
                self._push_head(row)
            self._wake()
            return Enqueued(session_id, entry.seq, client_msg_id, False, _copy_entry(entry), chosen)

    async def wait_for_work(self, timeout_s: float) -> None:
        async with self._lock:
            if self._find_claimable(self._clock(), take=False) is not None:
                return
            event = self._work
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)

    async def claim(self, worker_id: str, lease_s: float, held: HeldStates | None = None) -> Claim | None:
        async with self._lock:
            now = self._clock()
            item = self._find_claimable(now, take=True)
            if item is None:
                return None
            item.status = RUNNING
            item.lease_token = new_lease_token()
            item.lease_expires_at = now + timedelta(seconds=lease_s)
            item.run_id = new_run_id()
            item.cancel = False
            row = self._sessions[item.session_id]
            entry = self._append(row, started(item.seq, item.attempt), item.run_id, None)
            return Claim(
                item.input_id,
                item.session_id,
                row.owner,
                row.team,
                item.seq,
                item.content,
                item.attempt,
                item.run_id,
                item.lease_token,
                worker_id,
                started=_copy_entry(entry),
                team_state=None if row.state is None else _clone(row.state),
                failures=item.failures,
                trace_context=None if item.trace_context is None else dict(item.trace_context),
            )

    async def append(self, claim: Claim, entries: Sequence[NewEntry]) -> list[Entry]:
        async with self._lock:
            row, _ = self._fenced(claim)
            out = [_copy_entry(self._append(row, new, claim.run_id, None)) for new in entries]
            if any(new.type == USER_INPUT_REQUESTED for new in entries):
                row.awaiting = True
            if row.draft is not None and row.draft.message_id in message_ids(entries):
                row.draft = None
            return out

    async def save_draft(self, claim: Claim, draft: Draft) -> None:
        async with self._lock:
            row, _ = self._fenced(claim)
            row.draft = draft

    async def read_draft(self, session_id: str) -> Draft | None:
        async with self._lock:
            row = self._sessions.get(session_id)
            return None if row is None else row.draft

    async def heartbeat(self, claim: Claim, lease_s: float) -> bool:
        async with self._lock:
            try:
                _, item = self._fenced(claim)
            except LeaseLost:
                return False
            item.lease_expires_at = self._clock() + timedelta(seconds=lease_s)
            return True

    async def cancel_requested(self, claim: Claim) -> bool:
        async with self._lock:
            item = self._inputs.get(claim.input_id)
            if item is None or item.status != RUNNING or item.lease_token != claim.lease_token:
                return True  # fenced (recovered or deleted): the run can no longer write, so it should stop
            return item.cancel

    async def take_answer(self, claim: Claim, index: int) -> Answer | None:
        async with self._lock:
            row, asking = self._fenced(claim)
            if index >= len(asking.answers):
                queued = [i for i in row.pending if self._inputs[i].status == QUEUED]
                if len(asking.answers) != index or not queued:
                    return None
                if not rules.may_answer(self._inputs[queued[0]].strategy):
                    return None  # sent to interrupt or roll back this run: it runs as its own input
                item = self._inputs.pop(queued[0])
                row.pending.remove(item.input_id)
                asking.answers.append(Answer(item.seq, item.content))
            row.awaiting = False
            row.updated_at = self._clock()
            return asking.answers[index]

    async def rollback_requested(self, claim: Claim) -> bool:
        async with self._lock:
            row = self._sessions.get(claim.session_id)
            return row is not None and any(
                i > claim.input_id and self._inputs[i].strategy == MultitaskStrategy.ROLLBACK
                for i in row.pending
            )

    async def finish(
        self, claim: Claim, entry: NewEntry, team_state: dict[str, Any] | None, memo: PiecesMemo | None = None
    ) -> Entry:
        async with self._lock:
            row, item = self._fenced(claim)
            if team_state is not None:
                row.state = _clone(team_state)
            return _copy_entry(self._end(row, item, entry, claim.run_id))

    async def retry(self, claim: Claim, entry: NewEntry, not_before: datetime) -> list[Entry]:
        async with self._lock:
            row, item = self._fenced(claim)
            item.failures += 1
            return [_copy_entry(e) for e in self._requeue(row, item, entry, claim.run_id, not_before)]

    async def release(self, claim: Claim, entry: NewEntry) -> list[Entry]:
        async with self._lock:
            row, item = self._fenced(claim)
            return [_copy_entry(e) for e in self._requeue(row, item, entry, claim.run_id, self._clock())]

    async def recover_expired(self) -> list[Entry]:
        async with self._lock:
            now = self._clock()
            dead = [
                i
                for i in self._inputs.values()
                if i.status == RUNNING and i.lease_expires_at is not None and i.lease_expires_at < now
            ]
            out = []
            for item in sorted(dead, key=lambda i: i.input_id):
                row = self._sessions[item.session_id]
                if row.draft is not None and row.draft.run_id == item.run_id:
                    # what the dead run had streamed of its last message
                    cut = partial(row.draft, PartialReason.INTERRUPTED)
                    out.append(_copy_entry(self._append(row, cut, item.run_id, None)))
                row.draft = None
                entry, final, counted = interruption(
                    item.seq,
                    item.attempt,
                    item.interruptions,
                    self._max_interruptions,
                    waiting_for_human=row.awaiting,
                    cancel_requested=item.cancel,
                    rolled_back=any(
                        i > item.input_id and self._inputs[i].strategy == MultitaskStrategy.ROLLBACK
                        for i in row.pending
                    ),
                )
                if final:
                    out.append(_copy_entry(self._end(row, item, entry, item.run_id)))
                else:
                    item.interruptions += int(counted)
                    out += [_copy_entry(e) for e in self._requeue(row, item, entry, item.run_id, now)]
            return out

    async def request_cancel(
        self, owner: str, session_id: str, input_seq: int | None = None
    ) -> CancelRequest:
        rules.check_labels(session_id=session_id)
        async with self._lock:
            row = self._owned(owner, session_id)
            if row is None or not row.pending:
                return CancelRequest()
            head = self._inputs[row.pending[0]]
            if not rules.targets(input_seq, head.seq):
                return CancelRequest()
            if head.status == RUNNING:
                head.cancel = True
                return CancelRequest(running=True)
            if head.attempt == 1:
                return CancelRequest()  # never started: not a run
            entry = self._end(row, head, retry_cancelled(head.seq, head.attempt - 1), head.run_id)
            return CancelRequest(entry=_copy_entry(entry))

    async def reset_team_state(self, owner: str, session_id: str) -> Entry | None:
        rules.check_labels(session_id=session_id)
        async with self._lock:
            row = self._owned(owner, session_id)
            if row is None:
                return None
            head = self._inputs[row.pending[0]] if row.pending else None
            if head is not None and rules.is_run(head.status, head.attempt):
                raise rules.run_in_progress(session_id)
            row.state = None
            return _copy_entry(self._append(row, team_reset(), None, None))

    async def load_team_state(self, session_id: str) -> dict[str, Any] | None:
        rules.check_labels(session_id=session_id)
        async with self._lock:
            row = self._sessions.get(session_id)
            return None if row is None or row.state is None else _clone(row.state)

    # --- webhook outbox ---------------------------------------------------------------------------
    async def claim_webhooks(self, lease_s: float, limit: int) -> list[WebhookEvent]:
        async with self._lock:
            now = self._clock()
            taken: list[WebhookEvent] = []
            for item in self._outbox.values():
                if len(taken) >= limit:
                    break
                if item.failed or (item.next_at is not None and item.next_at > now):
                    continue
                if item.lease_expires_at is not None and item.lease_expires_at > now:
                    continue
                item.attempts += 1
                item.lease_token = new_lease_token()
                item.lease_expires_at = now + timedelta(seconds=lease_s)
                item.event = replace(item.event, attempt=item.attempts, lease_token=item.lease_token)
                taken.append(item.event)
            return taken

    async def webhook_delivered(self, event: WebhookEvent) -> bool:
        async with self._lock:
            if self._leased(event) is None:
                return False
            del self._outbox[event.webhook_id]
            return True

    async def webhook_failed(self, event: WebhookEvent, delay_s: float | None) -> bool:
        async with self._lock:
            item = self._leased(event)
            if item is None:
                return False
            item.lease_token, item.lease_expires_at = "", None
            if delay_s is None:
                item.failed = True
            else:
                item.next_at = self._clock() + timedelta(seconds=delay_s)
            return True

    def _leased(self, event: WebhookEvent) -> _Outbox | None:
        item = self._outbox.get(event.webhook_id)
        if item is None or item.failed or item.lease_token != event.lease_token:
            return None
        return item

    def _drop_outbox(self, session_ids: set[str]) -> None:
        """A deleted session's outbox rows go with it (the SQL dialects: ON DELETE CASCADE)."""
        for webhook_id in [k for k, v in self._outbox.items() if v.event.session_id in session_ids]:
            del self._outbox[webhook_id]

    async def counts(self) -> dict[str, int]:
        async with self._lock:
            running = sum(1 for i in self._inputs.values() if i.status == RUNNING)
            return {QUEUED: len(self._inputs) - running, RUNNING: running}

    async def listen(self, listener: CommitListener) -> None:
        """One process only: nobody else commits, so there is nothing to listen to."""

    # --- internals (called with the lock held) ----------------------------------------------------
    def _new_session_id(self) -> str:
        while True:
            session_id = new_session_id()
            if session_id not in self._sessions:
                return session_id

    def _create(self, owner: str, session_id: str, team: str, title: str | None) -> _Session:
        now = self._clock()
        row = _Session(session_id, owner, team, title, now, now)
        self._sessions[session_id] = row
        return row

    def _owned(self, owner: str, session_id: str) -> _Session | None:
        row = self._sessions.get(session_id)
        return row if row is not None and row.owner == owner else None

    def _status(self, row: _Session) -> SessionStatus:
        if row.pending:
            if self._inputs[row.pending[0]].status == RUNNING:
                return SessionStatus.AWAITING_INPUT if row.awaiting else SessionStatus.RUNNING
            return SessionStatus.QUEUED
        return SessionStatus.FAILED if row.failed else SessionStatus.IDLE

    def _public(self, row: _Session) -> Session:
        return row.public(self._status(row))

    def _queued_in(self, row: _Session) -> int:
        return sum(1 for input_id in row.pending if self._inputs[input_id].status == QUEUED)

    def _append(self, row: _Session, new: NewEntry, run_id: str | None, client_msg_id: str | None) -> Entry:
        now = self._clock()
        entry = Entry(
            seq=len(row.log) + 1,
            session_id=row.session_id,
            type=new.type,
            source=new.source,
            content=_clone(new.content),
            created_at=now,
            run_id=run_id,
            client_msg_id=client_msg_id,
            metadata=_clone(new.metadata),
        )
        row.log.append(entry)
        row.updated_at = now
        self._outbox_for(row, entry)
        return entry

    def _outbox_for(self, row: _Session, entry: Entry) -> None:
        """The outbox row of a webhook event, written with the entry (the SQL dialects: a trigger)."""
        kind = rules.webhook_type(entry.type, entry.metadata)
        url = row.webhook_url or self._webhook_url
        if kind is None or url is None:
            return
        input_seq = entry.metadata.get("input_seq")
        if not isinstance(input_seq, int):
            head = self._inputs.get(row.pending[0]) if row.pending else None
            input_seq = head.seq if head is not None and head.status == RUNNING else None
        event = WebhookEvent(
            "msg_" + secrets.token_hex(16),
            url,
            row.session_id,
            entry.run_id,
            input_seq,
            kind,
            entry.seq,
            entry.created_at,
            0,
            "",
        )
        self._outbox[event.webhook_id] = _Outbox(event)

    def _fenced(self, claim: Claim) -> tuple[_Session, _Input]:
        item = self._inputs.get(claim.input_id)
        if item is None or item.status != RUNNING or item.lease_token != claim.lease_token:
            raise LeaseLost()
        return self._sessions[item.session_id], item

    def _end(self, row: _Session, item: _Input, entry: NewEntry, run_id: str) -> Entry:
        """The input is done: append its terminal ``entry``; the session's next input becomes its head."""
        written = self._append(row, entry, run_id, None)
        row.draft = None
        row.pending.remove(item.input_id)
        del self._inputs[item.input_id]
        row.awaiting = False
        row.failed = entry.type == RUN_FAILED
        if row.pending:
            self._push_head(row)
            self._wake()  # the session's next input became claimable
        return written

    def _requeue(
        self, row: _Session, item: _Input, entry: NewEntry, run_id: str, not_before: datetime
    ) -> list[Entry]:
        """Append ``entry`` and queue the input again, keeping its place; an input asked to stop ends instead
        (``run_cancelled``): a cancel is never undone by a retry, a shutdown or a crash."""
        written = self._append(row, entry, run_id, None)
        if item.cancel:
            return [written, self._end(row, item, retry_cancelled(item.seq, item.attempt), run_id)]
        item.status = QUEUED
        item.attempt += 1
        item.not_before = not_before
        item.lease_token = ""
        item.lease_expires_at = None
        item.cancel = False
        row.awaiting = False
        row.failed = False
        row.draft = None
        self._push_head(row)
        self._wake()
        return [written]

    def _push_head(self, row: _Session) -> None:
        head = row.pending[0]
        if head not in self._in_heap:
            self._in_heap.add(head)
            heapq.heappush(self._heads, head)

    def _find_claimable(self, now: datetime, *, take: bool) -> _Input | None:
        """The oldest queued, due session head. ``take`` removes it from the heap (the caller claims it)."""
        not_due: list[int] = []
        found: _Input | None = None
        while self._heads:
            input_id = heapq.heappop(self._heads)
            self._in_heap.discard(input_id)
            item = self._inputs.get(input_id)
            if (
                item is None
                or item.status != QUEUED
                or self._sessions[item.session_id].pending[0] != input_id
            ):
                continue  # stale: done, running, deleted, or no longer its session's head
            if item.not_before > now:
                not_due.append(input_id)
                continue
            found = item
            if not take:
                not_due.append(input_id)
            break
        for input_id in not_due:
            self._in_heap.add(input_id)
            heapq.heappush(self._heads, input_id)
        return found

    def _wake(self) -> None:
        # Wake every current waiter; later waiters wait on a fresh event.
        self._work.set()
        self._work = asyncio.Event()
