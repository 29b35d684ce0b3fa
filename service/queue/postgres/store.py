"""PostgresStore: the Store contract (service/queue/store.py) on PostgreSQL, for several instances on one database.

* Every write verb is one call of an SQL function (``migrations/postgres/0005_verb_functions.sql``), group-
  committed by the engine's writer: concurrent verbs share one statement, one transaction and one flush.
* Seqs: the session row lock (``FOR NO KEY UPDATE``, taken first by every write of a session; input rows after
  it) serialises one session's writers, so seqs are contiguous; one lock order, no deadlock.
* Claim: the per-session FIFO rule is a WHERE clause (``svc_pick``); the chosen session is locked with
  ``SKIP LOCKED`` and the rule re-checked under the lock, so a busy session never blocks a claimer.
* One clock: lease expiry, ``not_before`` and every timestamp are the database's ``now()`` (README "Deploying
  on PostgreSQL"); this instance's clock only turns ``retry``'s ``not_before`` into a delay.
* After a commit that appended entries, a ``service_log`` doorbell; after one that made work claimable or
  asked for a cancel, a ``service_work`` one, batched just after the commit (outbox.py, notify.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, ClassVar

import asyncpg

from service.errors import Conflict, LeaseLost, NotFound, ServiceError, StoreUnavailable
from service.models import (
    DEFAULT_MAX_INTERRUPTIONS,
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
from service.queue import rules, safe_url
from service.queue.migrate import load_migrations, pending
from service.queue.postgres import statements as q
from service.queue.postgres.engine import DEFAULT_WRITERS, Engine
from service.queue.postgres.errors import CONNECT_TIMEOUT_S, DRIVER_ERRORS, translate
from service.queue.postgres.notify import Notifier
from service.queue.postgres.outbox import Outbox
from service.queue.postgres.schema import applied_versions, migrate
from service.queue.state_pieces import (
    HeldStates,
    Manifest,
    PiecesMemo,
    WrittenHeads,
    assemble,
    manifest_of,
)
from service.queue.store import DEFAULT_PAGE, READY_PROBE_S, Clock, CommitListener

_CANCEL_TRIES = 5
Doorbell = tuple[str, str, int]  # (channel, session_id, last_seq)


def _no_offset() -> float:
    return 0.0


class PostgresStore:
    dialect: ClassVar[str] = "postgresql"

    def __init__(
        self,
        dsn: str,
        *,
        clock: Clock = utcnow,
        db_clock_offset: Callable[[], float] | None = None,
        min_size: int = 1,
        max_size: int = 10,
        writers: int = DEFAULT_WRITERS,
        max_interruptions: int = DEFAULT_MAX_INTERRUPTIONS,
        webhook_url: str | None = None,
    ) -> None:
        """``db_clock_offset``: seconds added to the database's clock (tests move it as they move ``clock``;
        None in production: the database's clock as it is). ``webhook_url``: the server default webhook URL,
        given to every connection as the setting ``svc.webhook_url`` that the outbox trigger reads (migration
        0010), so it is resolved when an entry is written, by the instance that writes it. ``writers``: the
        connections that group-commit at once (engine.py; setting ``pg_writers``)."""
        self._dsn = dsn
        self._clock = clock
        self._max_interruptions = max_interruptions
        offset = db_clock_offset or _no_offset
        settings = {"svc.webhook_url": webhook_url or ""}
        self.engine = Engine(
            dsn, offset, min_size=min_size, max_size=max_size, writers=writers, server_settings=settings
        )
        self.instance_id = uuid.uuid4().hex[:12]
        self.notifier = Notifier(dsn, self.instance_id, offset, self._recent_sessions)
        self._outbox = Outbox(self.engine.notify, self.instance_id)
        self._written = WrittenHeads()  # what claim's ``held`` is checked against

    @property
    def commits(self) -> int:
        return self.engine.commits

    # --- lifetime -----------------------------------------------------------------------------------------------
    async def open(self) -> None:
        where = safe_url(self._dsn)
        try:
            conn = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT_S)
            try:
                await migrate(conn)
            finally:
                await conn.close()
            await self.engine.open()
            await self.notifier.start()
            self._outbox.start()
        except DRIVER_ERRORS as exc:
            await self.close()
            raise StoreUnavailable(f"cannot open the PostgreSQL database {where}: {exc}") from exc
        except ServiceError:
            await self.close()
            raise

    async def close(self) -> None:
        # The listener first: its catch-up after a lost connection reads through the engine's pool.
        await self.notifier.stop()
        await self.engine.close()
        await self._outbox.stop()

    async def ping(self) -> bool:
        try:
            return await asyncio.wait_for(self._probe(), READY_PROBE_S)
        except Exception:  # unreachable, read-only, too slow: not ready, whatever the cause
            return False

    async def _probe(self) -> bool:
        async with self.engine.conn() as conn:
            if pending(load_migrations("postgres"), await applied_versions(conn)):
                return False
            # A read-only database (default_transaction_read_only) or a standby takes no write.
            writable: bool = await conn.fetchval(
                "SELECT current_setting('transaction_read_only') = 'off' AND NOT pg_is_in_recovery()"
            )
        return writable

    # --- the writer ---------------------------------------------------------------------------------------------
    async def _call(self, op: dict[str, Any]) -> Any:
        """One verb call, durable when this returns; a rule it broke raised as the service's error."""
        answer = await self.engine.call(op)
        if isinstance(answer, dict) and "err" in answer:
            raise _refusal(answer, op)
        return answer

    def _ring(self, doorbells: list[Doorbell]) -> None:
        """After a commit: tell other instances (NOTIFY, batched) and wake this one's idle workers."""
        self._outbox.post(doorbells)
        if any(channel == q.WORK_CHANNEL for channel, _, _ in doorbells):
            self.notifier.wake_work()

    # --- sessions, log, cursors ---------------------------------------------------------------------------------
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
        sid = session_id if session_id is not None else new_session_id()
        chosen = MultitaskStrategy(multitask_strategy)
        op = {"op": "create_session", "session": sid, "owner": owner, "team": team, "title": title}
        done = await self._call({**op, "multitask_strategy": chosen.value, "webhook_url": webhook_url})
        at = q.from_us(done["at"])
        return Session(sid, owner, team, title, SessionStatus.IDLE, 0, at, at, chosen.value, webhook_url)

    async def get_session(self, owner: str, session_id: str) -> Session | None:
        rules.check_labels(session_id=session_id)
        async with self.engine.conn() as conn:
            row = await conn.fetchrow(q.GET_SESSION, session_id, owner)
        return None if row is None else q.session_of(row)

    async def list_sessions(self, owner: str) -> list[Session]:
        async with self.engine.conn() as conn:
            return [q.session_of(row) for row in await conn.fetch(q.LIST_SESSIONS, owner)]

    async def delete_session(self, owner: str, session_id: str) -> bool:
        rules.check_labels(session_id=session_id)
        done = await self._call({"op": "delete_session", "session": session_id, "owner": owner})
        if done["deleted"]:
            # Seq 0: every instance's readers re-read the log, find it shorter than their cursor, and end.
            self._ring([(q.LOG_CHANNEL, session_id, 0)])
        return bool(done["deleted"])

    async def expire_sessions(self, idle_s: float, limit: int) -> list[str]:
        async with self.engine.conn() as conn:
            rows = await conn.fetch(q.EXPIRE_SESSIONS, float(idle_s), max(0, limit), self.engine.offset())
        ids = sorted(str(row[0]) for row in rows)
        if ids:
            # As for a delete: every instance's readers re-read, find the log gone, and end.
            self._ring([(q.LOG_CHANNEL, sid, 0) for sid in ids])
        return ids

    async def read_log(
        self,
        session_id: str,
        *,
        after: int | None = None,
        before: int | None = None,
        limit: int = DEFAULT_PAGE,
    ) -> Page:
        rules.check_labels(session_id=session_id)
        limit = max(0, limit)  # callers clamp to 1..MAX_PAGE
        async with self.engine.snapshot() as conn:
            last_seq = await conn.fetchval(q.LAST_SEQ, session_id) or 0
            if before is not None:
                rows = list(
                    reversed(await conn.fetch(q.READ_BEFORE, session_id, before, after or 0, limit + 1))
                )
                has_more = len(rows) > limit
                rows = rows[1:] if has_more else rows
            else:
                rows = await conn.fetch(q.READ_AFTER, session_id, after or 0, limit + 1)
                has_more = len(rows) > limit
                rows = rows[:limit]
        return Page(session_id, [q.entry_of(r) for r in rows], last_seq, has_more)

    async def read_frames(self, session_id: str, *, after: int, limit: int) -> Frames:
        return Frames.of(await self.read_log(session_id, after=after, limit=limit))

    async def get_cursor(self, session_id: str, client_id: str) -> int | None:
        rules.check_labels(session_id=session_id, client_id=client_id)
        async with self.engine.conn() as conn:
            value = await conn.fetchval(q.GET_CURSOR, session_id, client_id)
        return None if value is None else int(value)

    async def set_cursor(self, session_id: str, client_id: str, seq: int) -> int:
        rules.check_labels(session_id=session_id, client_id=client_id)
        done = await self._call({"op": "set_cursor", "session": session_id, "client": client_id, "seq": seq})
        return int(done["seq"])

    async def load_team_state(self, session_id: str) -> dict[str, Any] | None:
        rules.check_labels(session_id=session_id)
        async with self.engine.conn() as conn:
            row = await conn.fetchrow(q.LOAD_STATE, session_id)
        return None if row is None else assemble(row["team_state"], row["pieces"])[0]

    async def listen(self, listener: CommitListener) -> None:
        self.notifier.add_listener(listener)

    async def _recent_sessions(self, since: datetime) -> list[tuple[str, int]]:
        async with self.engine.conn() as conn:
            return [(r["session_id"], r["last_seq"]) for r in await conn.fetch(q.RECENT_SESSIONS, since)]

    # --- queue --------------------------------------------------------------------------------------------------
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
        op = {
            "trace": trace_context or None,
            "strategy": None if strategy is None else MultitaskStrategy(strategy).value,
            "op": "enqueue",
            "session": session_id,
            "owner": owner,
            "team": team,
            "content": q.json_text(content),
            "client_msg_id": client_msg_id,
            "max_queued": max_queued,
        }
        done = await self._call(op)
        chosen = MultitaskStrategy(done["strategy"])
        if "dup" in done:
            return Enqueued(session_id, int(done["dup"]), client_msg_id, True, None, chosen)
        user = NewEntry("TextMessage", "user", content)
        [entry] = q.appended(session_id, [user], done["seq"], q.from_us(done["at"]), None, client_msg_id)
        self._ring([(q.LOG_CHANNEL, session_id, entry.seq), (q.WORK_CHANNEL, session_id, 0)])
        return Enqueued(session_id, entry.seq, client_msg_id, False, entry, chosen)

    async def wait_for_work(self, timeout_s: float) -> None:
        # Taken before looking: a commit the look does not see (on another writer or instance) still wakes it.
        event = self.notifier.work_event()
        try:
            if (await self._call({"op": "claimable"}))["claimable"]:
                return
        except StoreUnavailable:
            pass  # the database is away: wait for a wake-up or the timeout; callers look again then
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), max(0.0, timeout_s))

    async def claim(self, worker_id: str, lease_s: float, held: HeldStates | None = None) -> Claim | None:
        run_id, token = new_run_id(), new_lease_token()
        op: dict[str, Any] = {
            "op": "claim",
            "worker": worker_id,
            "lease_s": lease_s,
            "token": token,
            "run": run_id,
        }
        # The states the caller holds that are the ones this store last saved: svc_claim leaves the pieces out
        # when the session it claims still has that head (migration 0014), and the claim hands the dict back.
        known = self._written.all_known(held)
        if known:
            op["held"] = {session_id: digest for session_id, (digest, _) in known.items()}
        got = await self._call(op)
        if got is None:
            return None
        sid, input_seq, attempt = got["session"], got["input_seq"], got["attempt"]
        [entry] = q.appended(sid, [started(input_seq, attempt)], got["seq"], q.from_us(got["at"]), run_id)
        self._ring([(q.LOG_CHANNEL, sid, entry.seq)])
        state: dict[str, Any] | None
        manifest: Manifest | None
        if got.get("held"):
            state, manifest = known[sid][1], manifest_of(got["state"])
        else:
            state, manifest = assemble(got["state"], got.get("pieces"))
        return Claim(
            got["input"], sid, got["owner"], got["team"], input_seq, got["content"], attempt, run_id, token,
            worker_id, started=entry, team_state=state, state_manifest=manifest, failures=got["failures"],
            trace_context=got.get("trace"),
        )  # fmt: skip

    def _fenced(self, claim: Claim, op: str, **args: Any) -> dict[str, Any]:
        return {
            "op": op,
            "session": claim.session_id,
            "input": claim.input_id,
            "token": claim.lease_token,
            "run": claim.run_id,
            **args,
        }

    async def append(self, claim: Claim, entries: Sequence[NewEntry]) -> list[Entry]:
        asks = any(e.type == USER_INPUT_REQUESTED for e in entries)
        news = [q.new_entry_json(e) for e in entries]
        ids = message_ids(entries)
        done = await self._call(self._fenced(claim, "append", entries=news, asks=asks, ids=ids))
        if done["seq"] is None:
            return []
        out = q.appended(claim.session_id, entries, done["seq"], q.from_us(done["at"]), claim.run_id)
        self._ring([(q.LOG_CHANNEL, claim.session_id, done["seq"])])
        return out

    async def save_draft(self, claim: Claim, draft: Draft) -> None:
        op = self._fenced(
            claim,
            "save_draft",
            message=draft.message_id,
            source=draft.source,
            content=q.json_text(draft.text),
        )
        op["run"] = draft.run_id
        await self._call(op)
        # Readers on other instances re-read the session (finding no new entry) and resume from the draft.
        self._ring([(q.LOG_CHANNEL, claim.session_id, 0)])

    async def read_draft(self, session_id: str) -> Draft | None:
        async with self.engine.conn() as conn:
            row = await conn.fetchrow(q.READ_DRAFT, session_id)
        return None if row is None else Draft(row["run_id"], row["message_id"], row["source"], row["content"])

    async def heartbeat(self, claim: Claim, lease_s: float) -> bool:
        done = await self._call(self._fenced(claim, "heartbeat", lease_s=lease_s))
        return bool(done["alive"])

    async def cancel_requested(self, claim: Claim) -> bool:
        async with self.engine.conn() as conn:
            flag = await conn.fetchval(q.CANCEL_FLAG, claim.input_id, claim.lease_token)
        # Fenced (recovered, finished or deleted): the run can no longer write, so it should stop too.
        return True if flag is None else bool(flag)

    async def take_answer(self, claim: Claim, index: int) -> Answer | None:
        done = await self._call(self._fenced(claim, "take_answer", index=index))
        answer = done["answer"]
        return None if answer is None else Answer(answer["seq"], answer["content"])

    def _ended(self, session_id: str, entry: NewEntry, run_id: str | None, done: dict[str, Any]) -> Entry:
        [written] = q.appended(session_id, [entry], done["seq"], q.from_us(done["at"]), run_id)
        doorbells = [(q.LOG_CHANNEL, session_id, written.seq)]
        if done.get("work"):
            doorbells.append((q.WORK_CHANNEL, session_id, 0))
        self._ring(doorbells)
        return written

    async def rollback_requested(self, claim: Claim) -> bool:
        async with self.engine.conn() as conn:
            return bool(await conn.fetchval(q.ROLLBACK_REQUESTED, claim.session_id, claim.input_id))

    async def finish(
        self, claim: Claim, entry: NewEntry, team_state: dict[str, Any] | None, memo: PiecesMemo | None = None
    ) -> Entry:
        args: dict[str, Any] = {"entry": q.new_entry_json(entry)}
        if team_state is not None:
            # Only what the run added is sent and written (state_pieces.py); the head is small.
            save = q.planned_save(team_state, claim.state_manifest, memo)
            args["state"] = save.head
            args["clear"] = save.clear
            args["pieces"] = [{"path": w.path, "keep": w.keep, "items": w.items_json()} for w in save.writes]
        done = await self._call(self._fenced(claim, "finish", **args))
        if team_state is not None:  # committed: the head written with that very state
            self._written.remember(claim.session_id, args["state"], team_state)
        return self._ended(claim.session_id, entry, claim.run_id, done)

    async def retry(self, claim: Claim, entry: NewEntry, not_before: datetime) -> list[Entry]:
        # The policy's not_before is on this instance's clock; the database gets the delay and adds it to its own.
        delay_s = (not_before - self._clock()).total_seconds()
        return await self._requeue(claim, entry, delay_s=delay_s, failed=1)

    async def release(self, claim: Claim, entry: NewEntry) -> list[Entry]:
        return await self._requeue(claim, entry, delay_s=0.0, failed=0)

    async def _requeue(self, claim: Claim, entry: NewEntry, *, delay_s: float, failed: int) -> list[Entry]:
        stop = retry_cancelled(claim.input_seq, claim.attempt)
        op = self._fenced(
            claim,
            "requeue",
            entry=q.new_entry_json(entry),
            cancelled=q.new_entry_json(stop),
            delay_s=delay_s,
            failed=failed,
            interrupted=0,
        )
        done = await self._call(op)
        return self._requeued(claim.session_id, claim.run_id, entry, stop, done)

    def _requeued(
        self, session_id: str, run_id: str, entry: NewEntry, stop: NewEntry, done: dict[str, Any]
    ) -> list[Entry]:
        """The entries svc_requeue appended, in order: a dead run's partial entry, ``entry``, and the
        ``run_cancelled`` of an input that had been asked to stop."""
        news: list[NewEntry] = []
        cut = done.get("partial")
        if cut is not None:
            draft = Draft(run_id, cut["message_id"], cut["source"], cut["content"])
            news.append(partial(draft, PartialReason.INTERRUPTED))
        news.append(entry)
        if done.get("cancelled"):
            news.append(stop)
        written = q.appended(session_id, news, done["seq"], q.from_us(done["at"]), run_id)
        doorbells = [(q.LOG_CHANNEL, session_id, written[-1].seq)]
        if done.get("work"):
            doorbells.append((q.WORK_CHANNEL, session_id, 0))
        self._ring(doorbells)
        return written

    async def recover_expired(self) -> list[Entry]:
        async with self.engine.conn() as conn:
            rows = await conn.fetch(q.EXPIRED, self.engine.offset())

        async def recover(row: Any) -> list[Entry]:
            entry, final, counted = interruption(
                row["input_seq"],
                row["attempt"],
                row["interruptions"],
                self._max_interruptions,
                waiting_for_human=row["status"] == SessionStatus.AWAITING_INPUT.value,
                cancel_requested=bool(row["cancel_requested"]),
                rolled_back=bool(row["rollback"]),
            )
            stop = retry_cancelled(row["input_seq"], row["attempt"])
            op = {
                "op": "requeue",
                "session": row["session_id"],
                "input": row["id"],
                "token": row["lease_token"],
                "run": row["run_id"],
                "entry": q.new_entry_json(entry),
                "cancelled": q.new_entry_json(stop),
                "delay_s": 0.0,
                "failed": 0,
                "interrupted": int(counted),
                "expired": True,
                "final": final,
            }
            try:
                done = await self._call(op)
            except LeaseLost:
                return []  # heartbeated, finished or recovered by another instance meanwhile
            return self._requeued(row["session_id"], row["run_id"], entry, stop, done)

        # Concurrently: the writer commits them together.
        recovered = await asyncio.gather(*(recover(row) for row in rows))
        return [entry for entries in recovered for entry in entries]

    async def request_cancel(
        self, owner: str, session_id: str, input_seq: int | None = None
    ) -> CancelRequest:
        rules.check_labels(session_id=session_id)
        for _ in range(_CANCEL_TRIES):
            async with self.engine.conn() as conn:
                row = await conn.fetchrow(q.CURRENT_RUN, session_id, owner)
            if row is None or not rules.is_run(row["status"], row["attempt"]):
                return CancelRequest()
            if not rules.targets(input_seq, row["input_seq"]):
                return CancelRequest()  # (svc_cancel acts on this input's id: a later run is never reached)
            op: dict[str, Any] = {
                "op": "cancel",
                "session": session_id,
                "owner": owner,
                "input": row["id"],
                "status": row["status"],
                "attempt": row["attempt"],
                "run": row["run_id"],
            }
            entry = retry_cancelled(row["input_seq"], row["attempt"] - 1)
            op["entry"] = q.new_entry_json(entry)
            try:
                done = await self._call(op)
            except _Changed:
                continue  # the run moved on between the read and the lock: look again
            except NotFound:
                return CancelRequest()
            if done.get("running"):
                self._ring([(q.WORK_CHANNEL, session_id, 0)])  # wakes the instance running it
                return CancelRequest(running=True)
            return CancelRequest(entry=self._ended(session_id, entry, row["run_id"], done))
        return CancelRequest()

    async def reset_team_state(self, owner: str, session_id: str) -> Entry | None:
        rules.check_labels(session_id=session_id)
        async with self.engine.conn() as conn:
            head = await conn.fetchrow(q.CURRENT_RUN, session_id, owner)
        if head is not None and rules.is_run(head["status"], head["attempt"]):
            raise rules.run_in_progress(session_id)  # (svc_reset re-checks a running input under the lock)
        entry = team_reset()
        try:
            done = await self._call(
                {"op": "reset", "session": session_id, "owner": owner, "entry": q.new_entry_json(entry)}
            )
        except NotFound:
            return None
        return self._ended(session_id, entry, None, done)

    # --- webhook outbox (on a pool connection: short statements, never through the writer) -----------------
    async def claim_webhooks(self, lease_s: float, limit: int) -> list[WebhookEvent]:
        async with self.engine.conn() as conn:
            rows = await conn.fetch(q.CLAIM_WEBHOOKS, float(lease_s), max(0, limit), self.engine.offset())
        return [
            WebhookEvent(
                r["webhook_id"],
                r["url"],
                r["session_id"],
                r["run_id"],
                r["input_seq"],
                r["type"],
                r["seq"],
                r["created_at"],
                r["attempts"],
                r["lease_token"],
            )
            for r in sorted(rows, key=lambda r: int(r["id"]))
        ]

    async def webhook_delivered(self, event: WebhookEvent) -> bool:
        async with self.engine.conn() as conn:
            row = await conn.fetchrow(q.WEBHOOK_DELIVERED, event.webhook_id, event.lease_token)
        return row is not None

    async def webhook_failed(self, event: WebhookEvent, delay_s: float | None) -> bool:
        offset = self.engine.offset()
        async with self.engine.conn() as conn:
            row = await conn.fetchrow(q.WEBHOOK_FAILED, event.webhook_id, event.lease_token, delay_s, offset)
        return row is not None

    async def counts(self) -> dict[str, int]:
        async with self.engine.conn() as conn:
            rows = await conn.fetch(q.COUNTS)
        return {"queued": 0, "running": 0} | {r["status"]: int(r["n"]) for r in rows}


class _Changed(ServiceError):
    """The session's current run changed between request_cancel's read and its locked re-check."""


def _refusal(answer: dict[str, Any], op: dict[str, Any]) -> ServiceError:
    """The service error for a rule an SQL function refused (it wrote nothing)."""
    err, session_id = answer["err"], str(op.get("session"))
    if err == "lease_lost":
        return LeaseLost()
    if err == "not_found":
        return NotFound(f"session {session_id!r} not found")
    if err == "queue_full":
        return rules.queue_full(session_id, int(answer["queued"]), int(op["max_queued"]))
    if err == "busy":
        return rules.busy(session_id)
    if err == "conflict":
        if op["op"] == "reset":
            return rules.run_in_progress(session_id)
        return Conflict(f"session {session_id!r} already exists")
    if err == "changed":
        return _Changed()
    return translate(RuntimeError(f"unknown refusal {err!r}"))
