"""The Store contract: a durable per-session log plus a FIFO input queue, with cursors and leases.

This docstring and the Protocol below are THE contract; every backend (memory, sqlite, postgresql) implements it
and `tests/test_store_contract.py` checks it on each of them.

Rules every backend keeps:

* **Seqs.** Each session's log entries are numbered 1, 2, 3, ... with no gap, whatever the concurrency. Nothing is
  renumbered; ``sessions.last_seq`` is the highest seq.
* **Commit before answer.** A verb returns only after its writes are durable (committed); a failed write raises
  (``StoreUnavailable``) and nothing of it is visible.
* **One running input per session, FIFO.** An input is claimable when it is ``queued``, its ``not_before`` has
  passed, its session has no ``running`` input and no older (smaller id) ``queued`` input. Sessions run in parallel.
* **Leases fence writes.** A claim carries a ``lease_token``. ``append``/``finish``/``retry``/``release``/
  ``take_answer`` raise ``LeaseLost`` (and write nothing) once the input is no longer running under that token:
  its lease was recovered, or its session was deleted.
* **Owners.** A session belongs to one owner. Verbs that take ``owner`` treat another owner's session exactly like a
  missing one (``None``/``False``/``NotFound``), so existence never leaks.
* **Session status** follows the queue: ``queued`` when inputs wait and none runs, ``running`` while one runs,
  ``awaiting_input`` after a ``UserInputRequestedEvent`` was appended until ``take_answer`` or the run ends,
  ``failed`` after a final ``run_failed`` with nothing queued behind it, else ``idle``.
* **Errors.** Driver errors become ``StoreUnavailable`` (unreachable, read-only, disk full, not a database),
  ``Conflict`` (duplicate ids) or ``IncompatibleDatabase`` (migrations from a newer version), ``from`` the original.
* **Answers belong to their run.** ``take_answer`` binds the answer to the asking input until that input ends:
  every later attempt of it (after a failure, a shutdown or a crash) gets the same answers in the same order.
* **A cancel is never undone.** An input whose run was asked to stop is never queued again: ``retry``,
  ``release`` and recovery end it with a ``run_cancelled`` instead.
* **Interruptions are capped.** Recovery re-queues an input whose process died, until it died
  ``max_interruptions`` times (the store's constructor argument): then it ends with a final ``run_failed``
  (``models.interruption`` decides, for every backend).
* **Drafts.** A session has at most one draft (the text streamed so far of a message not yet in the log).
  Appending the message itself (an entry whose ``metadata.id`` is the draft's ``message_id``) deletes it in the
  same transaction; ``finish``/``retry``/``release`` delete it (the run wrote the partial entry itself); lease
  recovery turns a dead run's draft into a partial entry (``models.partial``) before its lifecycle entry.
* **Team state.** ``claim`` and ``load_team_state`` return exactly what the last ``finish`` with a state saved
  (equal JSON, key order and NUL characters included). The durable backends store it as a head plus append-only
  pieces (``state_pieces.py``, migration 0006) so a save writes what the run added, not the whole state: the
  bytes written per turn do not grow with the session. ``Claim.state_manifest`` carries what the claim read.
* **Webhooks** (README "Webhooks"). Appending an entry that makes a webhook event (``rules.webhook_type``:
  ``run_completed``, ``run_cancelled``, a final ``run_failed``, a ``UserInputRequestedEvent``), by ANY verb,
  writes an outbox row in the same transaction when the session has a URL: its own (``create_session``'s
  ``webhook_url``), else the server default the store was built with (``webhook_url`` constructor argument,
  resolved when the entry is written; PostgreSQL: by the instance that writes it). The outbox verbs below
  deliver them at least once: a claimed row is leased, and comes back after its lease expires (process died).
* **Time** comes from the ``clock`` the backend was built with (tests pass a fake one).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, ClassVar, Protocol

from service.models import (
    Answer,
    CancelRequest,
    Claim,
    Draft,
    Enqueued,
    Entry,
    Frames,
    NewEntry,
    Page,
    Session,
    WebhookEvent,
)
from service.queue.state_pieces import HeldStates, PiecesMemo

Clock = Callable[[], datetime]
# Called with (session_id, last_seq) when another process committed entries (PostgreSQL NOTIFY).
CommitListener = Callable[[str, int], Awaitable[None]]

DEFAULT_PAGE = 100
READY_PROBE_S = 1.0  # how long ping() waits for its probe write (readiness must answer fast)
MAX_PAGE = 1000
EXPIRE_ENTRIES = 20_000  # log entries one expire_sessions call deletes at most (beyond its first session)


class Store(Protocol):
    """Durable per-session log + FIFO input queue. One running input per session; sessions in parallel."""

    dialect: ClassVar[str]  # "memory" | "sqlite" | "postgresql"

    async def open(self) -> None:
        """Connect and apply pending migrations. Raises IncompatibleDatabase / StoreUnavailable."""

    async def close(self) -> None:
        """Release connections; idempotent. Pending writes are committed or failed first, never dropped silently."""

    async def ping(self) -> bool:
        """True when the database answers, takes a write within ``READY_PROBE_S`` (a write lock held elsewhere,
        a read-only file or database, a full disk: False) and every known migration is applied."""

    # --- sessions, log, cursors -------------------------------------------------------------------------------
    async def create_session(
        self,
        owner: str,
        session_id: str | None,
        team: str,
        title: str | None,
        *,
        multitask_strategy: str = "enqueue",
        webhook_url: str | None = None,
    ) -> Session:
        """Create an idle session. ``session_id=None`` generates one (``s_`` + 16 hex chars).
        ``multitask_strategy``: the session's default for messages that arrive while a run works.
        ``webhook_url``: the session's own webhook URL (None: the server default; callers validate it).
        Raises Conflict when the id exists (whoever owns it)."""

    async def get_session(self, owner: str, session_id: str) -> Session | None:
        """The session, or None when missing or owned by someone else."""

    async def list_sessions(self, owner: str) -> list[Session]:
        """The owner's sessions, most recent activity (``updated_at``) first, ties by session_id."""

    async def delete_session(self, owner: str, session_id: str) -> bool:
        """Delete the session, its log, queue items, cursors and state. False when missing / not the owner.
        A run of it still going gets LeaseLost on its next write."""

    async def expire_sessions(self, idle_s: float, limit: int) -> list[str]:
        """Retention: delete (as ``delete_session`` does) up to ``limit`` sessions, of any owner, with no new
        log entry for ``idle_s`` seconds (``updated_at`` older than now - idle_s) and no queued or running
        input; oldest first. Returns their ids. A backend may take fewer per call so one call stays short
        (SQLite: about ``EXPIRE_ENTRIES`` log entries); callers repeat until it returns nothing. Safe with
        several processes at once: each expired session is deleted, and reported, by exactly one call
        (PostgreSQL: ``FOR UPDATE SKIP LOCKED``). Readers of these sessions end as for a deleted one (this
        process: the caller closes them in its hub; PostgreSQL rings the other instances)."""

    async def read_log(
        self,
        session_id: str,
        *,
        after: int | None = None,
        before: int | None = None,
        limit: int = DEFAULT_PAGE,
    ) -> Page:
        """A page of entries, oldest first, at most ``limit`` (callers clamp it to 1..MAX_PAGE).

        ``after=N``: entries with seq > N; ``has_more`` when entries beyond the page exist.
        ``before=N``: the ``limit`` entries just below seq N; ``has_more`` when older entries exist.
        Neither: ``after=0``. ``last_seq`` is the session's last seq (0 for an unknown session, which reads empty).
        Not owner-checked: callers check with ``get_session`` first."""

    async def read_frames(self, session_id: str, *, after: int, limit: int) -> Frames:
        """Replay's read: the same entries as ``read_log(after=after, limit=limit)``, pre-serialised
        (``Frames``: each frame byte for byte ``orjson.dumps(entry.to_json())``), so streaming a page costs no
        per-entry work on the event loop. Not owner-checked."""

    async def get_cursor(self, session_id: str, client_id: str) -> int | None:
        """The stored cursor of (session, client), or None."""

    async def set_cursor(self, session_id: str, client_id: str, seq: int) -> int:
        """Store max(old cursor, seq), clamped to [0, last_seq], and return the stored value (never moves back)."""

    # --- queue ------------------------------------------------------------------------------------------------
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
        """Append the user's ``TextMessage`` (source ``user``) and its queue item in ONE transaction.

        Creates the session (with ``team``) when absent; another owner's session raises NotFound.
        A ``client_msg_id`` already used in this session returns the first answer (``duplicate=True``) and writes
        nothing, also after a restart. More than ``max_queued`` queued (not running) inputs raises QueueFull.
        The input starts at attempt 1. Wakes ``wait_for_work`` waiters.

        ``strategy`` (None: the session's ``multitask_strategy``; ``rules.strategy``): ``reject`` raises Conflict
        (``rules.busy``, nothing written) while the session has a run working or inputs queued
        (``rules.rejects``); ``interrupt``/``rollback`` inputs are never taken as answers (``rules.may_answer``);
        the caller then asks the session's run to stop. ``Enqueued.strategy`` says which applied.

        ``trace_context`` (W3C trace headers, README "Tracing") is kept with the input and comes back as
        ``Claim.trace_context`` on every claim of it."""

    async def wait_for_work(self, timeout_s: float) -> None:
        """Return when work may have become claimable (enqueue, retry, release, recovery) or after timeout_s.
        Never raises for an unreachable database: it then just waits (callers find out when they claim)."""

    async def claim(self, worker_id: str, lease_s: float, held: HeldStates | None = None) -> Claim | None:
        """Take the oldest claimable input (see the rules above), mark it running under a fresh lease token and
        run id, set the session ``running``. None when nothing is claimable.

        In the same transaction, append the run's ``run_started`` entry (``models.started``: source ``system``,
        ``input_seq`` and ``attempt`` in its metadata, ``run_id`` = the new run id) and return it as
        ``Claim.started``, with the state saved by the session's last ``finish`` as ``Claim.team_state`` (None
        when there is none), so a run starts without further round trips. The caller publishes ``started``.

        ``held``: per session id, a state dict the caller holds for it (one it gave ``finish`` and will not
        change). A SQL store that knows the stored state is exactly that one (it saved it through this very
        object and the stored head is still the one it wrote: ``state_pieces.WrittenHeads``) returns that object
        instead of reading the state back, so the claim's cost does not grow with the conversation; memory://
        ignores it (it copies the state)."""

    async def append(self, claim: Claim, entries: Sequence[NewEntry]) -> list[Entry]:
        """Append entries of this run (``run_id`` = claim.run_id) atomically. A ``UserInputRequestedEvent`` sets
        the session ``awaiting_input``. LeaseLost if fenced."""

    async def save_draft(self, claim: Claim, draft: Draft) -> None:
        """Store ``draft`` as the session's draft (replacing any). LeaseLost if fenced."""

    async def read_draft(self, session_id: str) -> Draft | None:
        """The session's draft, or None. Not owner-checked (callers check with ``get_session`` first)."""

    async def heartbeat(self, claim: Claim, lease_s: float) -> bool:
        """Extend the lease to now + lease_s. False when the lease is lost (nothing is changed then)."""

    async def cancel_requested(self, claim: Claim) -> bool:
        """True once ``request_cancel`` was called for this running input (from any process)."""

    async def take_answer(self, claim: Claim, index: int) -> Answer | None:
        """Human input: the ``index``-th answer (0-based) of this claim's input. An answer an earlier attempt of
        the same input already took is given again; otherwise the session's oldest queued input becomes it: it
        is marked done (it is already in the log) and bound to this input (``inputs.answer_for``). The session
        goes back to ``running``. None when there is no such answer yet. LeaseLost if fenced."""

    async def rollback_requested(self, claim: Claim) -> bool:
        """True when an input with strategy ``rollback`` waits in the claim's session behind it: a stopped run
        then keeps the previous team state (README "Double-texting")."""

    async def finish(
        self, claim: Claim, entry: NewEntry, team_state: dict[str, Any] | None, memo: PiecesMemo | None = None
    ) -> Entry:
        """End the run: append ``entry`` (run_completed, run_cancelled or a final run_failed), mark the input done,
        save ``team_state`` (when not None) in the same transaction, and update the session's status. LeaseLost
        if fenced. ``memo``: the caller's record of its last save's plan (``state_pieces.PiecesMemo``, kept with a
        live team), so the SQL stores serialise and hash only what the run added; memory:// ignores it."""

    async def retry(self, claim: Claim, entry: NewEntry, not_before: datetime) -> list[Entry]:
        """The run failed and will be tried again: append ``entry`` (run_failed, retrying) and put the input back
        in the queue with attempt + 1 and failures + 1 (``Claim.failures`` of its next claim), claimable from
        ``not_before``. An input asked to stop (``request_cancel``) ends instead with a ``run_cancelled`` after
        ``entry``. Returns the appended entries. LeaseLost if fenced."""

    async def release(self, claim: Claim, entry: NewEntry) -> list[Entry]:
        """Graceful shutdown: append ``entry`` (run_interrupted) and put the input back in the queue with
        attempt + 1 (failures unchanged: an interruption is not a failure), claimable at once. An input asked to
        stop ends instead, as in ``retry``. Returns the appended entries. LeaseLost if fenced."""

    async def recover_expired(self) -> list[Entry]:
        """For each running input whose lease expired (its process died): append ``run_interrupted`` (with
        ``input_seq`` and ``attempt``) under that run's id, and re-queue the input with attempt + 1 and
        interruptions + 1, claimable at once; at the interruption cap, end it with a final ``run_failed``
        instead (``models.interruption``). Returns the appended entries (to publish)."""

    async def request_cancel(
        self, owner: str, session_id: str, input_seq: int | None = None
    ) -> CancelRequest:
        """Ask the session's run to stop. A running input is flagged (``running``; its run writes the outcome).
        An input waiting to be retried (queued again after a failure or an interruption, attempt > 1, at the
        head of its session) is ended here: marked done with a ``run_cancelled`` entry (``entry``). Nothing
        else is touched: inputs never started are not runs. Another owner's or a missing session: nothing.
        ``input_seq``: only the run of that input (``rules.targets``); another one is left alone."""

    async def reset_team_state(self, owner: str, session_id: str) -> Entry | None:
        """Forget the saved team state (the agents' memory) and append a ``team_reset`` entry; the log stays.
        None when the session is missing or another owner's. Conflict while an input of it is running."""

    async def load_team_state(self, session_id: str) -> dict[str, Any] | None:
        """The team state saved by the last ``finish`` with a state, or None."""

    # --- webhook outbox (README "Webhooks") ----------------------------------------------------------------
    async def claim_webhooks(self, lease_s: float, limit: int) -> list[WebhookEvent]:
        """Lease up to ``limit`` due outbox rows (pending, ``next_at`` passed, not leased or lease expired),
        oldest first, for ``lease_s`` seconds under a fresh token; each claim counts an attempt
        (``WebhookEvent.attempt``). Several processes at once never get the same row while its lease runs
        (PostgreSQL: ``FOR UPDATE SKIP LOCKED``)."""

    async def webhook_delivered(self, event: WebhookEvent) -> bool:
        """The receiver took it: the row is deleted. False (nothing changed) when the lease was lost."""

    async def webhook_failed(self, event: WebhookEvent, delay_s: float | None) -> bool:
        """The attempt failed: due again ``delay_s`` from now (lease released), or, with None, given up (kept
        as ``failed``, never claimed again). False (nothing changed) when the lease was lost."""

    async def counts(self) -> dict[str, int]:
        """Number of inputs by status (``queued``, ``running``), for metrics and tests."""

    async def listen(self, listener: CommitListener) -> None:
        """Call ``listener(session_id, last_seq)`` for entries committed by OTHER processes (PostgreSQL). Backends
        that serve one process only make this a no-op."""
