"""The domain objects and their JSON shape, in one place."""

from __future__ import annotations

import enum
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

# Lifecycle entry types written by the service itself (AutoGen's own types keep their names).
RUN_STARTED = "run_started"
RUN_COMPLETED = "run_completed"
RUN_CANCELLED = "run_cancelled"
RUN_FAILED = "run_failed"
RUN_INTERRUPTED = "run_interrupted"
LIFECYCLE_TYPES = frozenset({RUN_STARTED, RUN_COMPLETED, RUN_CANCELLED, RUN_FAILED, RUN_INTERRUPTED})
USER_INPUT_REQUESTED = "UserInputRequestedEvent"
SYSTEM_SOURCE = "system"
# Written by POST /sessions/{id}/reset: the agents' memory (team state) was cleared; the log is kept.
TEAM_RESET = "team_reset"
# A run whose process dies this many times ends with a final run_failed (README "Guarantees"); the setting
# ``max_interruptions`` overrides it.
DEFAULT_MAX_INTERRUPTIONS = 5


class MultitaskStrategy(enum.StrEnum):
    """What a message does when it arrives while the session has a run working (README "Double-texting")."""

    ENQUEUE = "enqueue"  # wait behind it (the default)
    REJECT = "reject"  # refused (409) while a run works or messages wait; nothing is written
    INTERRUPT = "interrupt"  # the run is cancelled (the agents remember it), then this message runs
    ROLLBACK = (
        "rollback"  # the run is cancelled and forgotten (the agents' state as before it), then this runs
    )


class SessionStatus(enum.StrEnum):
    IDLE = "idle"
    QUEUED = "queued"
    RUNNING = "running"
    AWAITING_INPUT = "awaiting_input"
    FAILED = "failed"


def new_session_id() -> str:
    return "s_" + secrets.token_hex(8)


def new_run_id() -> str:
    return "r_" + secrets.token_hex(8)


def new_lease_token() -> str:
    """Fences a run's writes; never shown to clients (unlike the run id)."""
    return secrets.token_hex(16)


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(ts: datetime) -> str:
    """ISO 8601 UTC with milliseconds and a Z, as in the README's log entries: 2026-11-24T10:00:00.123Z."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True, slots=True)
class Session:
    session_id: str
    owner: str
    team: str
    title: str | None
    status: SessionStatus
    last_seq: int
    created_at: datetime
    updated_at: datetime
    multitask_strategy: str = "enqueue"  # the session's default (README "Double-texting")
    webhook_url: str | None = None  # the session's own (README "Webhooks"); None: the server default, if any

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "team": self.team,
            "title": self.title,
            "status": self.status.value,
            "last_seq": self.last_seq,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "multitask_strategy": self.multitask_strategy,
            "webhook_url": self.webhook_url,
        }


@dataclass(frozen=True, slots=True)
class NewEntry:
    """An entry to append; the store gives it its seq, session, run id and time."""

    type: str
    source: str
    content: Any
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    session_id: str
    type: str
    source: str
    content: Any
    created_at: datetime
    run_id: str | None = None
    client_msg_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "seq": self.seq,
            "session_id": self.session_id,
            "type": self.type,
            "source": self.source,
            "content": self.content,
            "created_at": iso(self.created_at),
            "run_id": self.run_id,
            "client_msg_id": self.client_msg_id,
            "metadata": self.metadata,
        }
        if self.type in LIFECYCLE_TYPES:
            # Lifecycle details (input_seq, attempt, stop_reason, error, retrying) also stand at the top level,
            # where the README's "Log entries" names them; metadata keeps them too, so every entry has one shape.
            for key, value in self.metadata.items():
                body.setdefault(key, value)
        return body


def ephemeral(session_id: str, item: dict[str, Any]) -> dict[str, Any]:
    """A live-only frame (a streaming chunk): ``seq`` is null and it is never replayed."""
    return {"seq": None, "session_id": session_id, **item}


CHUNK = "ModelClientStreamingChunkEvent"


def chunk_frame(
    session_id: str,
    draft: Draft,
    text: str,
    offset: int,
    *,
    created_at: datetime,
    metadata: dict[str, Any] | None = None,
    resumed: bool = False,
) -> dict[str, Any]:
    """A live frame with streamed text of ``draft``'s message (README "Streaming"): the log entry's keys with
    ``seq`` null, plus ``full_message_id`` (the ``metadata.id`` of the durable message that follows), ``offset``
    (characters of the message before ``text``) and, on the frame that catches a reader up, ``resumed``."""
    frame = ephemeral(
        session_id,
        {
            "type": CHUNK,
            "source": draft.source,
            "content": text,
            "created_at": iso(created_at),
            "run_id": draft.run_id,
            "client_msg_id": None,
            "metadata": metadata or {},
            "full_message_id": draft.message_id,
            "offset": offset,
        },
    )
    if resumed:
        frame["resumed"] = True
    return frame


@dataclass(frozen=True, slots=True)
class Page:
    session_id: str
    messages: list[Entry]
    last_seq: int
    has_more: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "messages": [e.to_json() for e in self.messages],
            "last_seq": self.last_seq,
            "has_more": self.has_more,
        }


@dataclass(frozen=True, slots=True)
class Frames:
    """A page of log entries pre-serialised for replay: ``frames[i]`` is ``orjson.dumps(entry.to_json())`` of
    the entry with seq ``seqs[i]`` (byte for byte), ``message_ids[i]`` its ``metadata.id`` when a string."""

    session_id: str
    frames: list[bytes]
    seqs: list[int]
    message_ids: list[str | None]
    last_seq: int
    has_more: bool

    @classmethod
    def of(cls, page: Page) -> Frames:
        """From a page of entries (the generic way; SQLite builds them from its rows without parsing)."""
        ids = [e.metadata.get("id") for e in page.messages]
        return cls(
            page.session_id,
            [orjson.dumps(e.to_json()) for e in page.messages],
            [e.seq for e in page.messages],
            [i if isinstance(i, str) else None for i in ids],
            page.last_seq,
            page.has_more,
        )


@dataclass(frozen=True, slots=True)
class Enqueued:
    """The answer to an enqueue. ``duplicate`` is True when ``client_msg_id`` was seen before (nothing enqueued)."""

    session_id: str
    seq: int
    client_msg_id: str | None
    duplicate: bool
    entry: Entry | None  # the new log entry; None for a duplicate
    strategy: str = "enqueue"  # the multitask strategy that applied (the message's, else the session's)

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "client_msg_id": self.client_msg_id, "status": "queued"}


@dataclass(frozen=True, slots=True)
class Claim:
    """One input taken by one worker under a lease. ``lease_token`` fences every write of this run."""

    input_id: int
    session_id: str
    owner: str
    team: str
    input_seq: int
    content: str
    attempt: int
    run_id: str
    lease_token: str
    worker_id: str
    # What the claiming transaction also did, so the run needs no further round trip to start: the run's
    # ``run_started`` entry (to publish) and the team state saved by the session's last run. Not part of the
    # claim's identity (compare=False; the dict would also make it unhashable).
    started: Entry | None = field(default=None, compare=False)
    team_state: dict[str, Any] | None = field(default=None, compare=False)
    # Which pieces of that state are stored (``state_pieces.Manifest``; None: unknown or the memory backend), so
    # ``finish`` writes only the pieces the run added. Opaque to everyone but the store that made the claim.
    state_manifest: Any = field(default=None, compare=False)
    # Attempts of this input that failed (interrupted ones do not count): what the retry policy decides on.
    failures: int = 0
    # The trace context of the request that enqueued the input (W3C headers; README "Tracing"), or None.
    trace_context: dict[str, str] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Answer:
    """A queued user message taken as the answer to a pending human-input request."""

    seq: int
    content: str


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """What ``Store.request_cancel`` did. ``running``: a running input was flagged to stop (its run writes the
    ``run_cancelled``). ``entry``: the ``run_cancelled`` the store wrote itself for an input that was waiting to
    be retried (publish it)."""

    running: bool = False
    entry: Entry | None = None

    @property
    def cancelled(self) -> bool:
        return self.running or self.entry is not None


@dataclass(frozen=True, slots=True)
class Draft:
    """The text streamed so far of a message not yet in the log. ``message_id`` is AutoGen's message id: the
    chunks' ``full_message_id`` and the ``metadata.id`` of the durable message that will replace it."""

    run_id: str
    message_id: str
    source: str
    text: str


class PartialReason(enum.StrEnum):
    """Why a streamed message ended before it was complete (``metadata.partial_reason``)."""

    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    STALLED = "stalled"


def partial(draft: Draft, reason: PartialReason) -> NewEntry:
    """The durable entry for a message cut off mid-stream: a ``TextMessage`` holding the text streamed so far,
    with the chunks' id and ``partial: true`` (README "Streaming")."""
    return NewEntry(
        type="TextMessage",
        source=draft.source,
        content=draft.text,
        metadata={"id": draft.message_id, "partial": True, "partial_reason": reason.value},
    )


def message_ids(entries: Sequence[NewEntry]) -> list[str]:
    """AutoGen message ids among ``entries`` (``metadata.id``): appending one of them retires its draft."""
    return [str(e.metadata["id"]) for e in entries if isinstance(e.metadata.get("id"), str)]


def lifecycle(type_: str, content: str, **details: Any) -> NewEntry:
    """A run lifecycle entry (source ``system``); ``details`` go to metadata (and the top level of its JSON)."""
    return NewEntry(type=type_, source=SYSTEM_SOURCE, content=content, metadata=details)


def interrupted(input_seq: int, attempt: int) -> NewEntry:
    return lifecycle(
        RUN_INTERRUPTED,
        "The run was interrupted (the process running it stopped or lost its lease); its input is queued again.",
        input_seq=input_seq,
        attempt=attempt,
        retrying=True,
    )


def interruption(
    input_seq: int,
    attempt: int,
    interruptions: int,
    max_interruptions: int,
    *,
    waiting_for_human: bool = False,
    cancel_requested: bool = False,
    rolled_back: bool = False,
) -> tuple[NewEntry, bool, bool]:
    """What lease recovery writes for a run that died with its process, decided here for every backend:
    ``(entry, final, counted)``.

    * Asked to stop before it died: it ends with ``run_cancelled`` (a cancel is never undone), marked
      ``rolled_back`` when a rollback message asked (README "Double-texting").
    * Below ``max_interruptions`` deaths (``interruptions``: earlier ones) it is queued again (``run_interrupted``);
      at the cap it ends with a final ``run_failed``, so a message that kills the process cannot re-queue itself
      forever. ``max_interruptions`` 0 means no cap.
    * A run that was only waiting for a human when the process died is not counted (``counted`` False): the
      message crashed nothing."""
    if cancel_requested:
        return retry_cancelled(input_seq, attempt, rolled_back=rolled_back), True, False
    if waiting_for_human:
        return interrupted(input_seq, attempt), False, False
    died = interruptions + 1
    if max_interruptions <= 0 or died < max_interruptions:
        return interrupted(input_seq, attempt), False, True
    error = (
        f"the service stopped abruptly while running this message {died} times (limit {max_interruptions}); "
        "it will not be tried again"
    )
    final = lifecycle(
        RUN_FAILED, f"Run failed: {error}", error=error, retrying=False, input_seq=input_seq, attempt=attempt
    )
    return final, True, True


def retry_cancelled(input_seq: int, attempt: int, *, rolled_back: bool = False) -> NewEntry:
    """The ``run_cancelled`` of an input whose run was asked to stop but did not get to write it (it waited to be
    retried, or its process died); ``rolled_back`` as a rollback's (README "Double-texting")."""
    details: dict[str, Any] = {"input_seq": input_seq, "attempt": attempt}
    if rolled_back:
        details["rolled_back"] = True
    return lifecycle(RUN_CANCELLED, "Run cancelled (its pending retry will not run).", **details)


def team_reset() -> NewEntry:
    return NewEntry(
        type=TEAM_RESET,
        source=SYSTEM_SOURCE,
        content="The agents' memory was reset; the conversation log is kept.",
    )


def started(input_seq: int, attempt: int) -> NewEntry:
    """The ``run_started`` entry that ``claim`` appends in its own transaction."""
    text = "Run started." if attempt == 1 else f"Run started (attempt {attempt})."
    return lifecycle(RUN_STARTED, text, input_seq=input_seq, attempt=attempt)


WEBHOOK_TYPES = ("run_completed", "run_failed", "run_cancelled", "awaiting_input")


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """One outbox row claimed for delivery (README "Webhooks"). ``webhook_id`` is the same on every attempt;
    ``attempt`` counts this one (1-based); ``lease_token`` fences ``webhook_delivered``/``webhook_failed``."""

    webhook_id: str
    url: str
    session_id: str
    run_id: str | None
    input_seq: int | None
    type: str  # one of WEBHOOK_TYPES
    last_seq: int  # the seq of the entry that made the event
    created_at: datetime  # the entry's
    attempt: int
    lease_token: str

    def payload(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "run_id": self.run_id,
            "input_seq": self.input_seq,
            "type": self.type,
            "last_seq": self.last_seq,
            "created_at": iso(self.created_at),
        }
