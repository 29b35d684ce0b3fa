"""The queue's rules, each decided once (README "The one contract").

The memory store and SQLite's verb bodies (sqlite/functions.py) call these functions; where SQL decides a rule,
it is written in statements that carry the same names (``CLAIMABLE``, ``STATUS_AFTER_END``, ...), and the
contract suite checks that all three backends agree. Pure functions only: no I/O, no clock.
"""

from __future__ import annotations

import re

from service.errors import BadRequest, Conflict, QueueFull
from service.models import (
    RUN_CANCELLED,
    RUN_COMPLETED,
    RUN_FAILED,
    USER_INPUT_REQUESTED,
    MultitaskStrategy,
    SessionStatus,
)

# C0 controls (NUL included) and DEL. PostgreSQL's text cannot hold NUL at all, and a control character in an
# id or a title is never what a client meant: refused everywhere, so every backend answers the same.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_label(value: str | None, what: str) -> None:
    """An id (session, client, client_msg_id) or a title: BadRequest when it holds a control character.
    Message content is not a label: it keeps every character."""
    if value is not None and _CONTROL.search(value):
        raise BadRequest(f"{what} must not contain control characters (NUL, newline, tab, ...)")


def check_labels(**labels: str | None) -> None:
    """``check_label`` for each keyword (its name is the label's name in the message)."""
    for what, value in labels.items():
        check_label(value, what)


def queue_full(session_id: str, queued: int, limit: int) -> QueueFull:
    """The one QueueFull every backend raises when ``queued`` inputs wait and ``limit`` is reached."""
    return QueueFull(f"session {session_id!r} already has {queued} queued inputs (limit {limit})")


def status_after_enqueue(current: SessionStatus) -> SessionStatus:
    """A running or awaiting session stays so; an idle, failed or queued one now has work waiting."""
    if current in (SessionStatus.RUNNING, SessionStatus.AWAITING_INPUT):
        return current
    return SessionStatus.QUEUED


def status_after_end(entry_type: str, more_queued: bool) -> SessionStatus:
    """An input ended (done): queued when more inputs wait, else failed (a final run_failed) or idle."""
    if more_queued:
        return SessionStatus.QUEUED
    return SessionStatus.FAILED if entry_type == RUN_FAILED else SessionStatus.IDLE


def is_run(status: str, attempt: int) -> bool:
    """Whether a session's head input is a run ``request_cancel`` can end: a running input, or one queued again
    after a failure or an interruption (attempt > 1). Inputs never started are not runs."""
    return status == "running" or attempt > 1


def strategy(value: str | None, session_default: str) -> MultitaskStrategy:
    """The multitask strategy of a message: its own, else its session's (README "Double-texting")."""
    return MultitaskStrategy(value or session_default)


def rejects(chosen: MultitaskStrategy, status: SessionStatus, queued: int) -> bool:
    """``reject`` refuses a message while the session has a run working or messages waiting. A session waiting
    for a human (``awaiting_input``, nothing queued) takes the message: it is the answer, not a new run."""
    return chosen is MultitaskStrategy.REJECT and (status is SessionStatus.RUNNING or queued > 0)


def busy(session_id: str) -> Conflict:
    """The one Conflict every backend raises for a refused ``reject`` message."""
    return Conflict(
        f"session {session_id!r} has a run in progress or messages waiting (multitask_strategy 'reject')"
    )


def may_answer(input_strategy: str) -> bool:
    """Whether a queued message may be taken as the answer to a human-input request: not one sent to interrupt
    or roll back the run (it must run as its own input)."""
    return input_strategy not in (MultitaskStrategy.INTERRUPT, MultitaskStrategy.ROLLBACK)


def run_in_progress(session_id: str) -> Conflict:
    """The one Conflict for a reset while the session has a run: running, waiting for a human, or a failed or
    interrupted one waiting to be retried (``is_run``): its retry would start from wiped memory."""
    return Conflict(f"session {session_id!r} has a run in progress: cancel it first")


def cursor_seq(seq: int, last_seq: int) -> int:
    """Where ``set_cursor(seq)`` may point: clamped to [0, last_seq]. The store then keeps the larger of it and
    the stored cursor, so a cursor never moves back."""
    return min(max(seq, 0), last_seq)


def targets(wanted_input_seq: int | None, input_seq: int) -> bool:
    """Whether a cancel aimed at ``wanted_input_seq`` (None: whatever runs) reaches the run of ``input_seq``: a
    cancel sent for one run never stops the next one (a double-clicked Cancel button)."""
    return wanted_input_seq is None or wanted_input_seq == input_seq


def webhook_type(entry_type: str, metadata: dict[str, object]) -> str | None:
    """The webhook event an appended entry makes (README "Webhooks"), or None: ``run_completed``,
    ``run_cancelled``, a final ``run_failed`` (``retrying`` not true) and ``awaiting_input`` (a
    ``UserInputRequestedEvent``). The SQL dialects mirror it in the ``entries_webhook`` trigger (migration 0010;
    on PostgreSQL its types are ``svc_webhook_type``, migration 0013)."""
    if entry_type == USER_INPUT_REQUESTED:
        return "awaiting_input"
    if entry_type in (RUN_COMPLETED, RUN_CANCELLED):
        return entry_type
    if entry_type == RUN_FAILED and metadata.get("retrying") is not True:
        return entry_type
    return None
