"""SqliteStore: the Store contract (service/queue/store.py) on SQLite, the embedded default backend.

One write connection driven by one writer task that group-commits (engine.py), one read connection,
WAL, ``synchronous=FULL`` by default (an acknowledged message survives power loss; NORMAL survives a process
crash but may lose the last commits on power loss). This class is the async face of the contract: each verb
runs one function of functions.py (its body: the twin of the verb's ``svc_`` function on PostgreSQL) in the
writer's transaction or on the reader; the queue rules are SQL (statements.py) and service/queue/rules.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar

from service.errors import StoreUnavailable
from service.models import (
    DEFAULT_MAX_INTERRUPTIONS,
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
    Session,
    WebhookEvent,
    utcnow,
)
from service.queue import rules
from service.queue.sqlite import functions as fn
from service.queue.sqlite.engine import WAL_CHECK_S, Engine, FileLock, wal_size
from service.queue.sqlite.schema import (
    check_synchronous,
    migrations_pending,
    probe_write_in_transaction,
)
from service.queue.state_pieces import HeldStates, PiecesMemo, WrittenHeads
from service.queue.store import EXPIRE_ENTRIES, READY_PROBE_S, Clock, CommitListener

DEFAULT_WAL_LIMIT = 64 * 1024 * 1024


class SqliteStore:
    dialect: ClassVar[str] = "sqlite"

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "FULL",
        clock: Clock = utcnow,
        exclusive: bool = False,
        max_interruptions: int = DEFAULT_MAX_INTERRUPTIONS,
        wal_limit_bytes: int = DEFAULT_WAL_LIMIT,
        wal_check_s: float = WAL_CHECK_S,
        webhook_url: str | None = None,
    ) -> None:
        """``wal_limit_bytes``: the WAL is brought back under this size (checked every ``wal_check_s``) once no
        reader holds it (README "Storage and durability").

        ``exclusive``: this process is the file's only service (the server sets it). It takes an OS lock on
        ``<path>.lock`` and, since no other process can then hold a lease, re-queues every input left running by
        a dead predecessor at once, instead of after its lease expires."""
        self.path = path
        self.exclusive = exclusive
        self._lock: FileLock | None = None
        self.synchronous = check_synchronous(synchronous)
        self.clock = clock
        self.max_interruptions = max_interruptions
        self.wal_limit_bytes = wal_limit_bytes
        self.webhook_url = webhook_url  # the server default (README "Webhooks"), kept in webhook_default
        # What ``claim``'s ``held`` is checked against, read by the writer thread during claims (a dict get each).
        self._written = WrittenHeads()
        self.engine = Engine(
            path, synchronous=self.synchronous, wal_limit_bytes=wal_limit_bytes, wal_check_s=wal_check_s
        )
        # Set by every commit that may have made work claimable (_wake), then replaced, so each wake reaches
        # every current waiter and later waiters wait on a fresh one (as PostgreSQL's Notifier.work_event).
        self._work = asyncio.Event()
        self._closed = False

    @property
    def commits(self) -> int:
        """Write transactions committed so far (group commit makes this far smaller than the writes)."""
        return self.engine.commits

    async def open(self) -> None:
        if self.exclusive:
            self._lock = FileLock.take(self.path + ".lock")
        try:
            await self.engine.open()
        except BaseException:
            self._release_lock()
            raise
        default = self.webhook_url
        await self.engine.write(lambda c: fn.set_webhook_default(c, default))
        if self.exclusive:
            await self.engine.write(fn.release_webhooks)
            now = self.clock()
            forever = now + timedelta(days=36500)
            cap = self.max_interruptions
            await self.engine.write(lambda c: fn.recover_expired(c, now, cap, cutoff=forever))

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.engine.close()
        self._release_lock()

    async def bound_wal(self) -> int:
        """Bring the WAL back under ``wal_limit_bytes`` now if no reader holds it (the writer also does this by
        itself every ``wal_check_s``); the WAL's size in bytes after."""
        return await self.engine.writer.bound_wal()

    async def next_wal_check(self) -> int:
        """Wait for the writer's next periodic WAL check; the WAL's size after it (tests)."""
        self.engine.writer.wal_checked.clear()
        await self.engine.writer.wal_checked.wait()
        return self.wal_size()

    def wal_size(self) -> int:
        """The WAL file's size in bytes (0 when there is none)."""
        return wal_size(self.path)

    async def pragmas(self) -> dict[str, Any]:
        """The write connection's settings as SQLite reports them (diagnostics; tests check they are honoured)."""
        return await self.engine.pragmas()

    async def ping(self) -> bool:
        try:
            if await self.engine.read(lambda c: migrations_pending(c.connection)):
                return False
            # A write through the writer, bounded: a lock held by another process makes it wait (busy_timeout).
            await asyncio.wait_for(self.engine.write(probe_write_in_transaction), READY_PROBE_S)
        except Exception:
            return False
        return True

    # --- sessions, log, cursors ---
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
        now, chosen = self.clock(), MultitaskStrategy(multitask_strategy)
        return await self.engine.write(
            lambda c: fn.create_session(c, now, owner, session_id, team, title, chosen, webhook_url)
        )

    async def get_session(self, owner: str, session_id: str) -> Session | None:
        rules.check_labels(session_id=session_id)
        return await self.engine.read(lambda c: fn.get_session(c, owner, session_id))

    async def list_sessions(self, owner: str) -> list[Session]:
        return await self.engine.read(lambda c: fn.list_sessions(c, owner))

    async def delete_session(self, owner: str, session_id: str) -> bool:
        rules.check_labels(session_id=session_id)
        return await self.engine.write(lambda c: fn.delete_session(c, owner, session_id))

    async def expire_sessions(self, idle_s: float, limit: int) -> list[str]:
        cutoff = self.clock() - timedelta(seconds=idle_s)
        return await self.engine.write(lambda c: fn.expire_sessions(c, cutoff, limit, EXPIRE_ENTRIES))

    async def read_log(
        self, session_id: str, *, after: int | None = None, before: int | None = None, limit: int = 100
    ) -> Page:
        rules.check_labels(session_id=session_id)
        return await self.engine.read(lambda c: fn.read_log(c, session_id, after, before, limit))

    async def read_frames(self, session_id: str, *, after: int, limit: int) -> Frames:
        return await self.engine.read(lambda c: fn.read_frames(c, session_id, after, limit))

    async def get_cursor(self, session_id: str, client_id: str) -> int | None:
        rules.check_labels(session_id=session_id, client_id=client_id)
        return await self.engine.read(lambda c: fn.get_cursor(c, session_id, client_id))

    async def set_cursor(self, session_id: str, client_id: str, seq: int) -> int:
        rules.check_labels(session_id=session_id, client_id=client_id)
        return await self.engine.write(lambda c: fn.set_cursor(c, session_id, client_id, seq))

    # --- queue ---
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
        now = self.clock()
        done = await self.engine.write(
            lambda c: fn.enqueue(
                c, now, owner, session_id, content, client_msg_id, team, max_queued, strategy, trace_context
            )
        )
        if not done.duplicate:
            self._wake()
        return done

    async def wait_for_work(self, timeout_s: float) -> None:
        # The timeout is also the fallback for work this process cannot see coming: another process's enqueue,
        # or a retry's not_before passing. The look is a read, no write lock: it sees every commit acknowledged
        # before this call, and the event is taken before it, so a commit the look does not see wakes us (its
        # _wake comes after its commit) rather than being found here.
        event = self._work
        now = self.clock()
        try:
            if await self.engine.read(lambda c: fn.claimable(c, now)):
                return
        except StoreUnavailable:
            pass  # the file cannot be read now: wait for a wake-up or the timeout; callers look again then
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)

    def _wake(self) -> None:
        """After a commit that may have made work claimable: wake every ``wait_for_work`` waiting now."""
        self._work.set()
        self._work = asyncio.Event()

    async def claim(self, worker_id: str, lease_s: float, held: HeldStates | None = None) -> Claim | None:
        now = self.clock()
        known = self._written.all_known(
            held
        )  # here, on the event loop that changes ``held``, not in the writer
        return await self.engine.write(lambda c: fn.claim(c, now, worker_id, lease_s, known.get))

    async def append(self, claim: Claim, entries: Sequence[NewEntry]) -> list[Entry]:
        now = self.clock()
        return await self.engine.write(lambda c: fn.append(c, now, claim, entries))

    async def save_draft(self, claim: Claim, draft: Draft) -> None:
        now = self.clock()
        await self.engine.write(lambda c: fn.save_draft(c, now, claim, draft))

    async def read_draft(self, session_id: str) -> Draft | None:
        return await self.engine.read(lambda c: fn.read_draft(c, session_id))

    async def heartbeat(self, claim: Claim, lease_s: float) -> bool:
        now = self.clock()
        return await self.engine.write(lambda c: fn.heartbeat(c, now, claim, lease_s))

    async def cancel_requested(self, claim: Claim) -> bool:
        return await self.engine.read(lambda c: fn.cancel_requested(c, claim))

    async def take_answer(self, claim: Claim, index: int) -> Answer | None:
        now = self.clock()
        return await self.engine.write(lambda c: fn.take_answer(c, now, claim, index))

    async def rollback_requested(self, claim: Claim) -> bool:
        return await self.engine.read(lambda c: fn.rollback_requested(c, claim))

    async def finish(
        self, claim: Claim, entry: NewEntry, team_state: dict[str, Any] | None, memo: PiecesMemo | None = None
    ) -> Entry:
        now = self.clock()
        done, head = await self.engine.write(lambda c: fn.finish(c, now, claim, entry, team_state, memo))
        if head is not None and team_state is not None:  # committed: the head written with that very state
            self._written.remember(claim.session_id, head, team_state)
        self._wake()  # the session's next input (if any) just became claimable
        return done

    async def retry(self, claim: Claim, entry: NewEntry, not_before: datetime) -> list[Entry]:
        now = self.clock()
        done = await self.engine.write(lambda c: fn.requeue(c, now, claim, entry, not_before, failed=True))
        self._wake()
        return done

    async def release(self, claim: Claim, entry: NewEntry) -> list[Entry]:
        now = self.clock()
        done = await self.engine.write(lambda c: fn.requeue(c, now, claim, entry, now, failed=False))
        self._wake()
        return done

    async def recover_expired(self) -> list[Entry]:
        now = self.clock()
        cap = self.max_interruptions
        recovered = await self.engine.write(lambda c: fn.recover_expired(c, now, cap))
        if recovered:
            self._wake()
        return recovered

    async def request_cancel(
        self, owner: str, session_id: str, input_seq: int | None = None
    ) -> CancelRequest:
        rules.check_labels(session_id=session_id)
        now = self.clock()
        done = await self.engine.write(lambda c: fn.cancel(c, now, owner, session_id, input_seq))
        if done.entry is not None:
            self._wake()  # the session's next input (if any) just became claimable
        return done

    async def reset_team_state(self, owner: str, session_id: str) -> Entry | None:
        rules.check_labels(session_id=session_id)
        now = self.clock()
        return await self.engine.write(lambda c: fn.reset(c, now, owner, session_id))

    async def load_team_state(self, session_id: str) -> dict[str, Any] | None:
        rules.check_labels(session_id=session_id)
        return (await self.engine.read(lambda c: fn.load_team_state(c, session_id)))[0]

    # --- webhook outbox ---
    async def claim_webhooks(self, lease_s: float, limit: int) -> list[WebhookEvent]:
        now = self.clock()
        return await self.engine.write(lambda c: fn.claim_webhooks(c, now, lease_s, limit))

    async def webhook_delivered(self, event: WebhookEvent) -> bool:
        return await self.engine.write(lambda c: fn.webhook_delivered(c, event))

    async def webhook_failed(self, event: WebhookEvent, delay_s: float | None) -> bool:
        now = self.clock()
        return await self.engine.write(lambda c: fn.webhook_failed(c, now, event, delay_s))

    async def counts(self) -> dict[str, int]:
        return await self.engine.read(fn.counts)

    async def listen(self, listener: CommitListener) -> None:
        """One process per SQLite file is the supported shape: nothing to listen to."""
