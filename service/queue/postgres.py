"""PostgresStore: the Store contract (store.py) on PostgreSQL, for several service instances on one database.

* Seqs: ``UPDATE sessions SET last_seq = last_seq + n RETURNING last_seq`` inside the writing transaction; the
  session row lock serialises the writers of one session. Every log/queue write locks the session row first
  (then input rows), so there is one lock order and no deadlock.
* Claim: the per-session FIFO rule is a WHERE clause; the chosen session's row is then locked with
  ``FOR UPDATE SKIP LOCKED`` and the rule re-checked under that lock, so two claimers (in any processes) never
  run two inputs of one session, and a busy session never blocks a claimer.
* Leases fence writes in SQL (``FENCE``). All times come from the injected clock, never ``now()``.
* After each commit that appends entries, a ``service_log`` doorbell ('<session_id> <last_seq> <instance>');
  after one that makes work claimable or asks for a cancel, a ``service_work`` one ('<session_id> <instance>').
  They are sent right after the commit, batched (postgres_outbox.py); the listening side is postgres_notify.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, ClassVar

from service.errors import Conflict, LeaseLost, NotFound, QueueFull
from service.models import (
    RUN_FAILED,
    USER_INPUT_REQUESTED,
    Answer,
    CancelRequest,
    Claim,
    Draft,
    Enqueued,
    Entry,
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
from service.queue import postgres_sql as q
from service.queue.postgres_base import PostgresBase

_CLAIM_TRIES = 5


class PostgresStore(PostgresBase):
    dialect: ClassVar[str] = "postgresql"

    # --- queue ----------------------------------------------------------------------------------------------
    async def enqueue(
        self,
        owner: str,
        session_id: str,
        content: str,
        client_msg_id: str | None,
        *,
        team: str = "default",
        max_queued: int | None = None,
    ) -> Enqueued:
        now = self._clock()
        async with self._tx() as conn:
            await conn.execute(q.INSERT_SESSION, session_id, owner, team, None, now)
            session = await conn.fetchrow(q.LOCK_SESSION, session_id)
            if session is None or session["owner"] != owner:  # None: deleted between the two statements
                raise NotFound(f"session {session_id!r} not found")
            if client_msg_id is not None:
                seq = await conn.fetchval(q.FIND_CLIENT_MSG, session_id, client_msg_id)
                if seq is not None:
                    return Enqueued(session_id, seq, client_msg_id, True, None)
            if (
                max_queued is not None
                and await conn.fetchval(q.COUNT_QUEUED_IN_SESSION, session_id) >= max_queued
            ):
                raise QueueFull()
            busy = session["status"] in (SessionStatus.RUNNING.value, SessionStatus.AWAITING_INPUT.value)
            user_msg = NewEntry(type="TextMessage", source="user", content=content)
            status = None if busy else SessionStatus.QUEUED
            [entry] = await self._append(
                conn, session_id, [user_msg], now=now, run_id=None, client_msg_id=client_msg_id, status=status
            )
            await conn.execute(q.INSERT_INPUT, session_id, entry.seq, content, now)
            self._notify(conn, q.WORK_CHANNEL, session_id)
        self.notifier.wake_work()
        return Enqueued(session_id, entry.seq, client_msg_id, False, entry)

    async def wait_for_work(self, timeout_s: float) -> None:
        await self.notifier.wait_for_work(timeout_s)

    async def claim(self, worker_id: str, lease_s: float) -> Claim | None:
        now = self._clock()
        for _ in range(_CLAIM_TRIES):
            settled, claim = await self._try_claim(worker_id, lease_s, now)
            if settled:
                return claim
        return None  # raced every time: someone else is claiming this work; a wake-up follows their commit

    async def _try_claim(self, worker_id: str, lease_s: float, now: datetime) -> tuple[bool, Claim | None]:
        async with self._tx() as conn:
            # One statement finds the oldest claimable input whose session no other transaction holds, and
            # locks that session; busy sessions are skipped, not waited for.
            session_id = await conn.fetchval(q.PICK_SESSION, now)
            if session_id is None:
                return True, None
            # The pick saw the statement's snapshot; the rule is re-checked under the lock on fresh data.
            input_id = await conn.fetchval(q.SESSION_HEAD, session_id, now)
            if input_id is None:
                return False, None
            run_id, token = new_run_id(), new_lease_token()
            expires = now + timedelta(seconds=lease_s)
            row = await conn.fetchrow(q.TAKE_INPUT, input_id, token, expires, worker_id, run_id)
            # The run's first entry comes with the claim (and its saved state with TAKE_INPUT): the run starts
            # without another round trip.
            [entry] = await self._append(
                conn,
                session_id,
                [started(row["input_seq"], row["attempt"])],
                now=now,
                run_id=run_id,
                status=SessionStatus.RUNNING,
            )
        return True, Claim(
            input_id=row["id"],
            session_id=row["session_id"],
            owner=row["owner"],
            team=row["team"],
            input_seq=row["input_seq"],
            content=row["content"],
            attempt=row["attempt"],
            run_id=run_id,
            lease_token=token,
            worker_id=worker_id,
            started=entry,
            team_state=row["team_state"],
            failures=row["failures"],
        )

    @asynccontextmanager
    async def _fenced(self, claim: Claim) -> AsyncIterator[Any]:
        """A transaction holding the session lock, in which ``claim`` still owns its input."""
        async with self._tx() as conn:
            await conn.fetchrow(q.LOCK_SESSION, claim.session_id)
            if await conn.fetchval(q.FENCE, claim.input_id, claim.lease_token) is None:
                raise LeaseLost()
            yield conn

    async def append(self, claim: Claim, entries: Sequence[NewEntry]) -> list[Entry]:
        asks = any(e.type == USER_INPUT_REQUESTED for e in entries)
        ids = message_ids(entries)
        async with self._fenced(claim) as conn:
            written = await self._append(
                conn,
                claim.session_id,
                entries,
                now=self._clock(),
                run_id=claim.run_id,
                status=SessionStatus.AWAITING_INPUT if asks else None,
            )
            if ids:  # the message a draft was streaming is now in the log
                await conn.execute(q.RETIRE_DRAFT, claim.session_id, ids)
        return written

    async def save_draft(self, claim: Claim, draft: Draft) -> None:
        async with self._fenced(claim) as conn:
            await conn.execute(
                q.SAVE_DRAFT,
                claim.session_id,
                draft.run_id,
                draft.message_id,
                draft.source,
                draft.text,
                self._clock(),
            )
            # Readers on other instances re-read the session (finding no new entry) and resume from the draft.
            self._notify(conn, q.LOG_CHANNEL, claim.session_id, 0)

    async def read_draft(self, session_id: str) -> Draft | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(q.READ_DRAFT, session_id)
        return None if row is None else Draft(row["run_id"], row["message_id"], row["source"], row["content"])

    async def heartbeat(self, claim: Claim, lease_s: float) -> bool:
        expires = self._clock() + timedelta(seconds=lease_s)
        async with self._tx() as conn:
            return await conn.fetchval(q.HEARTBEAT, claim.input_id, claim.lease_token, expires) is not None

    async def cancel_requested(self, claim: Claim) -> bool:
        async with self._conn() as conn:
            flag = await conn.fetchval(q.CANCEL_FLAG, claim.input_id, claim.lease_token)
        # Fenced (recovered, finished or deleted): the run can no longer write, so it should stop too.
        return True if flag is None else bool(flag)

    async def take_answer(self, claim: Claim, index: int) -> Answer | None:
        async with self._fenced(claim) as conn:
            row = await conn.fetchrow(q.NTH_ANSWER, claim.input_id, index)
            if row is None:
                if await conn.fetchval(q.COUNT_ANSWERS, claim.input_id) != index:
                    return None
                row = await conn.fetchrow(q.OLDEST_QUEUED, claim.session_id)
                if row is None:
                    return None
                await conn.execute(q.BIND_ANSWER, claim.input_id, row["id"])
            await conn.execute(q.SET_STATUS, claim.session_id, SessionStatus.RUNNING.value, self._clock())
        return Answer(seq=row["input_seq"], content=row["content"])

    async def finish(self, claim: Claim, entry: NewEntry, team_state: dict[str, Any] | None) -> Entry:
        async with self._fenced(claim) as conn:
            await conn.execute(q.MARK_DONE, claim.input_id)
            done, more = await self._ended(conn, claim.session_id, entry, claim.run_id, team_state)
        if more:
            self.notifier.wake_work()
        return done

    async def _ended(
        self,
        conn: Any,
        session_id: str,
        entry: NewEntry,
        run_id: str | None,
        team_state: dict[str, Any] | None = None,
    ) -> tuple[Entry, bool]:
        """Append the terminal ``entry`` of an input just marked done (the caller holds the session lock); the
        session is queued when more inputs wait (and other instances are told: True), else failed or idle."""
        more = bool(await conn.fetchval(q.HAS_QUEUED, session_id))
        await conn.execute(q.DROP_DRAFT, session_id)
        failed = SessionStatus.FAILED if entry.type == RUN_FAILED else SessionStatus.IDLE
        status = SessionStatus.QUEUED if more else failed
        [done] = await self._append(
            conn, session_id, [entry], now=self._clock(), run_id=run_id, status=status
        )
        if team_state is not None:
            await conn.execute(q.SAVE_STATE, session_id, team_state)
        if more:
            self._notify(conn, q.WORK_CHANNEL, session_id)
        return done, more

    async def retry(self, claim: Claim, entry: NewEntry, not_before: datetime) -> list[Entry]:
        return await self._requeue(claim, entry, not_before, failed=True)

    async def release(self, claim: Claim, entry: NewEntry) -> list[Entry]:
        return await self._requeue(claim, entry, self._clock(), failed=False)

    async def _requeue(
        self, claim: Claim, entry: NewEntry, not_before: datetime, *, failed: bool
    ) -> list[Entry]:
        """The input goes back to the queue, keeping its place, with attempt + 1; an input asked to stop ends
        instead (``run_cancelled``): a cancel is never undone by a retry or a stop."""
        async with self._fenced(claim) as conn:
            if await conn.fetchval(q.OWN_CANCEL_FLAG, claim.input_id):
                await conn.execute(q.MARK_DONE, claim.input_id)
                written = await self._append(
                    conn, claim.session_id, [entry], now=self._clock(), run_id=claim.run_id
                )
                stop = retry_cancelled(claim.input_seq, claim.attempt)
                ended, _ = await self._ended(conn, claim.session_id, stop, claim.run_id)
                return [*written, ended]
            await conn.execute(q.REQUEUE, claim.input_id, not_before, int(failed))
            await conn.execute(q.DROP_DRAFT, claim.session_id)
            written = await self._append(
                conn,
                claim.session_id,
                [entry],
                now=self._clock(),
                run_id=claim.run_id,
                status=SessionStatus.QUEUED,
            )
            self._notify(conn, q.WORK_CHANNEL, claim.session_id)
        self.notifier.wake_work()
        return written

    async def recover_expired(self) -> list[Entry]:
        now = self._clock()
        async with self._conn() as conn:
            sessions = [r["session_id"] for r in await conn.fetch(q.EXPIRED, now)]
        recovered: list[Entry] = []
        for session_id in dict.fromkeys(sessions):
            # One transaction per session: the condition is re-checked under its lock, so two instances
            # recovering at once interrupt each run once.
            async with self._tx() as conn:
                await conn.fetchrow(q.LOCK_SESSION, session_id)
                row = await conn.fetchrow(q.EXPIRED_IN_SESSION, session_id, now)
                if row is None:
                    continue
                draft = await conn.fetchrow(q.READ_DRAFT, session_id)
                if draft is not None:
                    await conn.execute(q.DROP_DRAFT, session_id)
                    if draft["run_id"] == row["run_id"]:  # what the dead run had streamed of its last message
                        cut = Draft(draft["run_id"], draft["message_id"], draft["source"], draft["content"])
                        recovered += await self._append(
                            conn,
                            session_id,
                            [partial(cut, PartialReason.INTERRUPTED)],
                            now=now,
                            run_id=row["run_id"],
                        )
                entry, final = interruption(
                    row["input_seq"], row["attempt"], row["interruptions"], self._max_interruptions
                )
                if final or row["cancel_requested"]:  # at the cap, or asked to stop before it died: it ends
                    await conn.execute(q.MARK_DONE, row["id"])
                    if not final:
                        recovered += await self._append(
                            conn, session_id, [entry], now=now, run_id=row["run_id"]
                        )
                        entry = retry_cancelled(row["input_seq"], row["attempt"])
                    recovered.append((await self._ended(conn, session_id, entry, row["run_id"]))[0])
                    continue
                await conn.execute(q.REQUEUE_EXPIRED, row["id"], now)
                recovered += await self._append(
                    conn, session_id, [entry], now=now, run_id=row["run_id"], status=SessionStatus.QUEUED
                )
                self._notify(conn, q.WORK_CHANNEL, session_id)
        if recovered:
            self.notifier.wake_work()
        return recovered

    async def request_cancel(self, owner: str, session_id: str) -> CancelRequest:
        async with self._tx() as conn:
            session = await conn.fetchrow(q.LOCK_SESSION, session_id)
            if session is None or session["owner"] != owner:
                return CancelRequest()
            row = await conn.fetchrow(q.CURRENT_RUN, session_id)
            if row is None or (row["status"] == "queued" and row["attempt"] == 1):
                return CancelRequest()  # nothing runs, and inputs never started are not runs
            if row["status"] == "running":
                await conn.execute(q.SET_CANCEL, row["id"])
                self._notify(conn, q.WORK_CHANNEL, session_id)  # wakes the instance running it
                done = CancelRequest(running=True)
            else:
                await conn.execute(q.MARK_DONE, row["id"])
                entry = retry_cancelled(row["input_seq"], row["attempt"] - 1)
                ended, _ = await self._ended(conn, session_id, entry, row["run_id"])
                done = CancelRequest(entry=ended)
        self.notifier.wake_work()
        return done

    async def reset_team_state(self, owner: str, session_id: str) -> Entry | None:
        async with self._tx() as conn:
            session = await conn.fetchrow(q.LOCK_SESSION, session_id)
            if session is None or session["owner"] != owner:
                return None
            if await conn.fetchval(q.HAS_RUNNING, session_id):
                raise Conflict(f"session {session_id!r} has a run in progress: cancel it first")
            await conn.execute(q.DROP_STATE, session_id)
            [entry] = await self._append(conn, session_id, [team_reset()], now=self._clock(), run_id=None)
        return entry

    async def counts(self) -> dict[str, int]:
        async with self._conn() as conn:
            rows = await conn.fetch(q.COUNTS)
        return {"queued": 0, "running": 0} | {r["status"]: int(r["n"]) for r in rows}
