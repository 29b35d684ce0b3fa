"""The Store contract (service/queue/store.py), checked on every backend via the `store` fixture.

Time only moves through FakeClock; every assertion is about what the store returns or keeps.
"""

from __future__ import annotations

import asyncio
import copy
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from service.errors import BadRequest, Conflict, LeaseLost, NotFound, QueueFull
from service.models import (
    RUN_CANCELLED,
    RUN_COMPLETED,
    RUN_FAILED,
    RUN_INTERRUPTED,
    RUN_STARTED,
    TEAM_RESET,
    USER_INPUT_REQUESTED,
    Answer,
    CancelRequest,
    Claim,
    Draft,
    NewEntry,
    SessionStatus,
    interrupted,
    iso,
    lifecycle,
)
from service.queue import Store, open_store
from tests.conftest import BACKENDS, STORE_URL, FakeClock

ALICE = "alice"
BOB = "bob"
LEASE_S = 30.0
T0 = datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)  # FakeClock's start
ENTRY_KEYS = {
    "seq",
    "session_id",
    "type",
    "source",
    "content",
    "created_at",
    "run_id",
    "client_msg_id",
    "metadata",
}


# --- helpers --------------------------------------------------------------------------------------
DB_SLACK_S = (
    5.0  # PostgreSQL stamps by the database's clock, moved to the fake one: equal give or take a moment
)


def is_now(store: Store, ts: datetime, clock: FakeClock) -> bool:
    """``ts`` is the store's "now": the fake clock's time exactly (memory, SQLite), or the database's clock
    (PostgreSQL, offset to read the fake time) within DB_SLACK_S: far from the real time, so a time taken
    from anywhere else fails."""
    if store.dialect == "postgresql":
        return abs((ts - clock.now).total_seconds()) < DB_SLACK_S
    return ts == clock.now


async def claim_one(store: Store, lease_s: float = LEASE_S, worker_id: str = "w1") -> Claim:
    claim = await store.claim(worker_id, lease_s)
    assert claim is not None
    return claim


def said(text: str) -> NewEntry:
    return NewEntry(type="TextMessage", source="assistant", content=text)


def completed() -> NewEntry:
    return lifecycle(RUN_COMPLETED, "run completed", stop_reason="done")


def failed(*, retrying: bool) -> NewEntry:
    return lifecycle(RUN_FAILED, "run failed", error="boom", retrying=retrying)


async def seqs(store: Store, session_id: str, **kw: Any) -> list[int]:
    return [e.seq for e in (await store.read_log(session_id, **kw)).messages]


async def status(store: Store, session_id: str, owner: str = ALICE) -> SessionStatus:
    session = await store.get_session(owner, session_id)
    assert session is not None
    return session.status


async def log_json(store: Store, session_id: str) -> list[dict[str, Any]]:
    return [e.to_json() for e in (await store.read_log(session_id, limit=1000)).messages]


@asynccontextmanager
async def reopened(store: Store, request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Store]:
    """Close ``store`` and open the same database again, as a restarted process would."""
    await store.close()
    again = open_store(request.node.stash[STORE_URL], clock=clock, db_clock_offset=clock.db_offset)
    await again.open()
    try:
        yield again
    finally:
        await again.close()


# --- sessions -------------------------------------------------------------------------------------
async def test_create_and_get_session(store: Store, clock: FakeClock) -> None:
    created = await store.create_session(ALICE, "s1", "default", "First chat")
    assert created.session_id == "s1"
    assert created.owner == ALICE
    assert created.team == "default"
    assert created.title == "First chat"
    assert created.status is SessionStatus.IDLE
    assert created.last_seq == 0
    assert created.created_at == created.updated_at
    assert is_now(store, created.created_at, clock)
    assert await store.get_session(ALICE, "s1") == created
    assert await store.get_session(BOB, "s1") is None
    assert await store.get_session(ALICE, "nope") is None
    assert await store.ping()


async def test_create_session_generates_ids(store: Store) -> None:
    a = await store.create_session(ALICE, None, "default", None)
    b = await store.create_session(ALICE, None, "default", None)
    assert re.fullmatch(r"s_[0-9a-f]{16}", a.session_id)
    assert a.session_id != b.session_id
    assert a.title is None


async def test_a_session_shows_its_own_webhook_url(store: Store) -> None:
    hook = "https://example.com/hooks/s1"
    created = await store.create_session(ALICE, "s1", "default", None, webhook_url=hook)
    await store.create_session(ALICE, "s2", "default", None)
    assert created.webhook_url == hook
    assert await store.get_session(ALICE, "s1") == created
    listed = {s.session_id: s.webhook_url for s in await store.list_sessions(ALICE)}
    assert listed == {"s1": hook, "s2": None}  # s2 uses the server's default, if any
    assert created.to_json()["webhook_url"] == hook


async def test_create_session_conflict_whoever_owns_it(store: Store) -> None:
    await store.create_session(ALICE, "s1", "default", None)
    with pytest.raises(Conflict):
        await store.create_session(ALICE, "s1", "default", None)
    with pytest.raises(Conflict):
        await store.create_session(BOB, "s1", "other", None)
    session = await store.get_session(ALICE, "s1")
    assert session is not None and session.team == "default"


async def test_list_sessions_newest_activity_first(store: Store, clock: FakeClock) -> None:
    for sid in ("a", "b", "c"):
        await store.create_session(ALICE, sid, "default", None)
        clock.advance(1)
    await store.create_session(BOB, "bobs", "default", None)
    assert [s.session_id for s in await store.list_sessions(ALICE)] == ["c", "b", "a"]
    clock.advance(1)
    await store.enqueue(ALICE, "a", "hello", None)
    listed = await store.list_sessions(ALICE)
    assert [s.session_id for s in listed] == ["a", "c", "b"]
    assert is_now(store, listed[0].updated_at, clock)
    assert listed[0].last_seq == 1
    assert [s.session_id for s in await store.list_sessions(BOB)] == ["bobs"]
    assert await store.list_sessions("carol") == []


async def test_list_sessions_ties_by_session_id(store: Store) -> None:
    # Created together, so some share one time on every backend (on PostgreSQL: calls in one group commit share
    # its now(); with two writers, the three may be cut into two batches, x and y together).
    await asyncio.gather(*(store.create_session(ALICE, sid, "default", None) for sid in ("y", "x", "z")))
    listed = await store.list_sessions(ALICE)
    assert len({s.updated_at for s in listed}) < len(listed)  # a tie to break
    newest_first = sorted(listed, key=lambda s: s.session_id)
    newest_first.sort(key=lambda s: s.updated_at, reverse=True)  # stable: ties stay by session id
    assert [s.session_id for s in listed] == [s.session_id for s in newest_first]


async def test_delete_session_removes_everything_and_fences_its_run(store: Store) -> None:
    await store.enqueue(ALICE, "s1", "one", "m1")
    first = await claim_one(store)
    await store.finish(first, completed(), {"memory": ["one"]})
    await store.enqueue(ALICE, "s1", "two", "m2")
    await store.enqueue(ALICE, "s1", "three", "m3")
    running = await claim_one(store)
    await store.append(running, [said("working")])
    await store.set_cursor("s1", "phone", 3)
    await store.enqueue(ALICE, "other", "keep me", None)

    assert not await store.delete_session(BOB, "s1")
    assert await store.get_session(ALICE, "s1") is not None
    assert await store.delete_session(ALICE, "s1")

    assert await store.get_session(ALICE, "s1") is None
    assert [s.session_id for s in await store.list_sessions(ALICE)] == ["other"]
    page = await store.read_log("s1")
    assert (page.messages, page.last_seq, page.has_more) == ([], 0, False)
    assert await store.get_cursor("s1", "phone") is None
    assert await store.load_team_state("s1") is None
    assert await store.counts() == {"queued": 1, "running": 0}
    with pytest.raises(LeaseLost):
        await store.append(running, [said("too late")])
    with pytest.raises(LeaseLost):
        await store.finish(running, completed(), {"x": 1})
    assert not await store.heartbeat(running, LEASE_S)
    assert not await store.delete_session(ALICE, "s1")

    # Only the other session's input is left; the deleted one's queued input is gone with it.
    other = await claim_one(store)
    assert other.session_id == "other"
    assert await store.claim("w1", LEASE_S) is None

    # The id can be used again and starts from nothing: seq 1, client_msg_ids forgotten.
    again = await store.enqueue(ALICE, "s1", "fresh", "m1")
    assert (again.seq, again.duplicate) == (1, False)
    assert await store.load_team_state("s1") is None


# --- the log --------------------------------------------------------------------------------------
async def test_read_log_of_empty_and_unknown_sessions(store: Store) -> None:
    await store.create_session(ALICE, "empty", "default", None)
    for sid in ("empty", "unknown"):
        for kw in ({}, {"after": 0}, {"after": 5}, {"before": 1}, {"before": 10}):
            page = await store.read_log(sid, **kw)  # type: ignore[arg-type]
            assert page.session_id == sid
            assert (page.messages, page.last_seq, page.has_more) == ([], 0, False)


async def _five(store: Store) -> None:
    for n in range(1, 6):
        await store.enqueue(ALICE, "s1", f"message {n}", None)


@pytest.mark.parametrize(
    ("after", "limit", "expected", "has_more"),
    [
        (None, 100, [1, 2, 3, 4, 5], False),
        (0, 2, [1, 2], True),
        (2, 2, [3, 4], True),
        (3, 2, [4, 5], False),
        (4, 1, [5], False),
        (0, 1, [1], True),
        (0, 5, [1, 2, 3, 4, 5], False),
        (5, 10, [], False),
        (9, 10, [], False),
    ],
)
async def test_read_log_after(
    store: Store, after: int | None, limit: int, expected: list[int], has_more: bool
) -> None:
    await _five(store)
    page = await store.read_log("s1", after=after, limit=limit)
    assert [e.seq for e in page.messages] == expected
    assert page.has_more is has_more
    assert page.last_seq == 5


@pytest.mark.parametrize(
    ("before", "limit", "expected", "has_more"),
    [
        (6, 2, [4, 5], True),
        (6, 5, [1, 2, 3, 4, 5], False),
        (100, 3, [3, 4, 5], True),
        (3, 2, [1, 2], False),
        (3, 5, [1, 2], False),
        (2, 1, [1], False),
        (4, 1, [3], True),
        (1, 10, [], False),
    ],
)
async def test_read_log_before(
    store: Store, before: int, limit: int, expected: list[int], has_more: bool
) -> None:
    await _five(store)
    page = await store.read_log("s1", before=before, limit=limit)
    assert [e.seq for e in page.messages] == expected
    assert page.has_more is has_more
    assert page.last_seq == 5


async def test_read_log_returns_copies(store: Store) -> None:
    await store.enqueue(ALICE, "s1", "call a tool", None)
    claim = await claim_one(store)
    calls = [{"id": "c1", "name": "calculator", "arguments": '{"expr": "1+1"}'}]
    [written] = await store.append(claim, [NewEntry("ToolCallRequestEvent", "assistant", calls, {"k": [1]})])
    assert written.content == calls and written.metadata == {"k": [1]}
    first = (await store.read_log("s1")).messages[written.seq - 1]
    first.content[0]["name"] = "mutated"
    first.metadata["k"].append(2)
    written.metadata["k"].append(3)
    again = (await store.read_log("s1")).messages[written.seq - 1]
    assert again.content == calls
    assert again.metadata == {"k": [1]}


# --- cursors --------------------------------------------------------------------------------------
async def test_cursors_never_move_back_and_are_clamped(store: Store) -> None:
    for n in range(3):
        await store.enqueue(ALICE, "s1", f"m{n}", None)
    assert await store.get_cursor("s1", "phone") is None
    assert await store.set_cursor("s1", "phone", 2) == 2
    assert await store.set_cursor("s1", "phone", 1) == 2
    assert await store.get_cursor("s1", "phone") == 2
    assert await store.set_cursor("s1", "phone", 99) == 3
    assert await store.get_cursor("s1", "phone") == 3
    # Per client: another client of the same session starts from nothing.
    assert await store.get_cursor("s1", "laptop") is None
    assert await store.set_cursor("s1", "laptop", 1) == 1
    assert await store.set_cursor("s1", "tablet", -4) == 0
    assert await store.get_cursor("s1", "phone") == 3
    await store.enqueue(ALICE, "s1", "m3", None)
    assert await store.set_cursor("s1", "phone", 99) == 4
    assert await store.get_cursor("s1", "laptop") == 1


# --- enqueue --------------------------------------------------------------------------------------
async def test_enqueue_creates_the_session(store: Store, clock: FakeClock) -> None:
    done = await store.enqueue(ALICE, "new", "hello", "c-1", team="research")
    assert (done.session_id, done.seq, done.client_msg_id, done.duplicate) == ("new", 1, "c-1", False)
    assert done.to_json() == {"seq": 1, "client_msg_id": "c-1", "status": "queued"}
    assert done.entry is not None
    assert done.entry == (await store.read_log("new")).messages[0]
    session = await store.get_session(ALICE, "new")
    assert session is not None
    assert (session.owner, session.team, session.title) == (ALICE, "research", None)
    assert (session.status, session.last_seq) == (SessionStatus.QUEUED, 1)
    assert is_now(store, session.created_at, clock)
    # An existing session keeps its team.
    await store.enqueue(ALICE, "new", "again", None, team="ignored")
    session = await store.get_session(ALICE, "new")
    assert session is not None and session.team == "research"


async def test_user_entry_fields(store: Store, clock: FakeClock) -> None:
    await store.enqueue(ALICE, "s1", "hello there", "c-9")
    [entry] = (await store.read_log("s1")).messages
    assert (entry.seq, entry.session_id, entry.type, entry.source) == (1, "s1", "TextMessage", "user")
    assert (entry.content, entry.client_msg_id, entry.run_id) == ("hello there", "c-9", None)
    assert is_now(store, entry.created_at, clock)
    assert entry.metadata == {}


async def test_enqueue_seqs_stay_contiguous_with_agent_entries(store: Store) -> None:
    assert (await store.enqueue(ALICE, "s1", "one", None)).seq == 1
    claim = await claim_one(store)
    assert claim.started is not None and claim.started.seq == 2  # the claim appends run_started
    assert [e.seq for e in await store.append(claim, [said("hi")])] == [3]
    assert (await store.enqueue(ALICE, "s1", "two", None)).seq == 4
    assert [e.seq for e in await store.append(claim, [said("more")])] == [5]
    assert (await store.finish(claim, completed(), None)).seq == 6
    assert await seqs(store, "s1") == [1, 2, 3, 4, 5, 6]
    session = await store.get_session(ALICE, "s1")
    assert session is not None and session.last_seq == 6
    # The next claim is the second input, whose user entry is seq 4.
    assert (await claim_one(store)).input_seq == 4


async def test_duplicate_client_msg_id_writes_nothing(store: Store) -> None:
    first = await store.enqueue(ALICE, "s1", "hello", "dup")
    again = await store.enqueue(ALICE, "s1", "something else", "dup")
    assert (again.seq, again.client_msg_id, again.duplicate, again.entry) == (first.seq, "dup", True, None)
    assert await seqs(store, "s1") == [1]
    assert await store.counts() == {"queued": 1, "running": 0}
    # Still a duplicate once processed.
    claim = await claim_one(store)
    await store.finish(claim, completed(), None)
    assert (await store.enqueue(ALICE, "s1", "hello", "dup")).duplicate
    assert await store.claim("w1", LEASE_S) is None
    # Scoped to the session; no client_msg_id never deduplicates.
    assert not (await store.enqueue(ALICE, "s2", "hello", "dup")).duplicate
    assert not (await store.enqueue(ALICE, "s1", "x", None)).duplicate
    assert not (await store.enqueue(ALICE, "s1", "x", None)).duplicate
    assert await seqs(store, "s1") == [1, 2, 3, 4, 5]  # hello, run_started, run_completed, x, x


async def test_queue_full(store: Store) -> None:
    await store.enqueue(ALICE, "s1", "one", "a", max_queued=2)
    await store.enqueue(ALICE, "s1", "two", "b", max_queued=2)
    with pytest.raises(QueueFull):
        await store.enqueue(ALICE, "s1", "three", "c", max_queued=2)
    assert await seqs(store, "s1") == [1, 2]
    # A duplicate is answered, not refused: it enqueues nothing.
    assert (await store.enqueue(ALICE, "s1", "one", "a", max_queued=2)).duplicate
    # Other sessions have their own limit.
    await store.enqueue(ALICE, "s2", "elsewhere", None, max_queued=2)
    # A running input no longer counts as queued.
    claim = await claim_one(store)
    assert claim.session_id == "s1"
    assert (await store.enqueue(ALICE, "s1", "three", "c", max_queued=2)).seq == 4  # 3 is run_started
    with pytest.raises(QueueFull):
        await store.enqueue(ALICE, "s1", "four", "d", max_queued=2)
    assert (await store.enqueue(ALICE, "s1", "unlimited", "e")).seq == 5


async def test_enqueue_into_another_owners_session_is_not_found(store: Store) -> None:
    await store.enqueue(ALICE, "s1", "mine", None)
    with pytest.raises(NotFound):
        await store.enqueue(BOB, "s1", "not yours", None)
    assert await seqs(store, "s1") == [1]
    assert await store.counts() == {"queued": 1, "running": 0}


async def parked(store: Store, timeout_s: float = 3600) -> asyncio.Task[None]:
    """A ``wait_for_work`` waiter that has looked for claimable work, found none, and is now waiting to be
    woken. Every backend orders that look with the writes submitted after it, and the probe claim below is
    one: once it returned, the waiter has had its answer; a waiter that returned anyway (a no-op
    wait_for_work) is caught here."""
    waiter = asyncio.create_task(store.wait_for_work(timeout_s))
    await asyncio.sleep(0)  # the waiter submits its look
    assert await store.claim("probe", LEASE_S) is None
    assert not waiter.done(), "wait_for_work returned with nothing to do"
    return waiter


async def test_wait_for_work_wakes_on_enqueue(store: Store) -> None:
    waiter = await parked(store)
    await store.enqueue(ALICE, "s1", "wake up", None)
    await asyncio.wait_for(waiter, 10)  # woken: its own look happened before the enqueue


async def test_wait_for_work_wakes_when_finish_unblocks_a_session(store: Store) -> None:
    # Not in the contract's list (enqueue, retry, release, recovery), but finishing an input makes its
    # session's next input claimable, so an idle worker must hear of it rather than sleep through a poll.
    await store.enqueue(ALICE, "s1", "one", None)
    await store.enqueue(ALICE, "s1", "two", None)
    claim = await claim_one(store)
    waiter = await parked(store)
    await store.finish(claim, completed(), None)
    await asyncio.wait_for(waiter, 10)


async def test_wait_for_work_returns_at_once_when_work_is_claimable(store: Store) -> None:
    """The same answer on every backend: nothing to wait for when a claim would succeed now."""
    await store.enqueue(ALICE, "s1", "ready", None)
    await asyncio.wait_for(store.wait_for_work(3600), 10)
    claim = await claim_one(store)
    waiter = await parked(store)  # the only input runs: nothing claimable, so it waits
    await store.release(claim, interrupted(claim.input_seq, claim.attempt))
    await asyncio.wait_for(waiter, 10)


async def test_wait_for_work_waits_then_times_out(store: Store) -> None:
    waiter = await parked(store)  # with nothing to do it waits (a no-op would fail here)...
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.wait_for(store.wait_for_work(0.05), 10)  # ...and a short timeout ends the wait


# --- one contract: the same answer on every backend -------------------------------------------------
CONTROL_CHARS = ["\x00", "\n", "\t", "\x1f", "\x7f"]


@pytest.mark.parametrize("char", CONTROL_CHARS, ids=["nul", "newline", "tab", "us", "del"])
async def test_labels_with_control_characters_are_refused(store: Store, char: str) -> None:
    """Ids and titles holding a control character are BadRequest on every backend, and nothing is written."""
    bad = f"a{char}b"
    await store.enqueue(ALICE, "s1", "fine", "m1")
    calls = [
        store.create_session(ALICE, bad, "default", None),
        store.create_session(ALICE, "s2", "default", bad),
        store.create_session(ALICE, None, "default", bad),
        store.enqueue(ALICE, "s1", "hello", bad),
        store.enqueue(ALICE, bad, "hello", None),
        store.get_session(ALICE, bad),
        store.read_log(bad),
        store.set_cursor("s1", bad, 1),
        store.get_cursor("s1", bad),
        store.set_cursor(bad, "phone", 1),
        store.delete_session(ALICE, bad),
        store.request_cancel(ALICE, bad),
        store.reset_team_state(ALICE, bad),
        store.load_team_state(bad),
    ]
    for call in calls:
        with pytest.raises(BadRequest, match="control characters"):
            await call
    assert [s.session_id for s in await store.list_sessions(ALICE)] == ["s1"]
    assert await seqs(store, "s1") == [1]
    assert await store.counts() == {"queued": 1, "running": 0}


async def test_content_keeps_every_character(store: Store) -> None:
    text = "nul \x00 newline \n tab \t bell \x07 del \x7f emoji \U0001f600 rtl \u202e"
    done = await store.enqueue(ALICE, "s1", text, "m1")
    claim = await claim_one(store)
    assert claim.content == text
    await store.append(claim, [NewEntry("TextMessage", "assistant", text, {"echo": text})])
    await store.finish(claim, completed(), {"said": text})
    user, _, reply, _ = (await store.read_log("s1")).messages
    assert (user.seq, user.content) == (done.seq, text)
    assert (reply.content, reply.metadata) == (text, {"echo": text})
    assert await store.load_team_state("s1") == {"said": text}


async def test_queue_full_says_the_same_everywhere(store: Store) -> None:
    await store.enqueue(ALICE, "s1", "one", None, max_queued=2)
    await store.enqueue(ALICE, "s1", "two", None, max_queued=2)
    with pytest.raises(QueueFull) as refused:
        await store.enqueue(ALICE, "s1", "three", None, max_queued=2)
    assert refused.value.message == "session 's1' already has 2 queued inputs (limit 2)"
    assert (refused.value.code, refused.value.status) == ("queue_full", 429)


# --- claim ----------------------------------------------------------------------------------------
async def test_claim_fifo_across_sessions_one_running_per_session(store: Store) -> None:
    assert await store.claim("w1", LEASE_S) is None
    await store.create_session(ALICE, "b", "helper", None)
    a1 = await store.enqueue(ALICE, "a", "a1", None)
    await store.enqueue(ALICE, "b", "b1", None)
    await store.enqueue(ALICE, "a", "a2", None)
    await store.enqueue(BOB, "c", "c1", None)

    first = await claim_one(store, worker_id="w7")
    assert (first.session_id, first.owner, first.team, first.content) == ("a", ALICE, "default", "a1")
    assert (first.input_seq, first.attempt, first.worker_id) == (a1.seq, 1, "w7")
    assert re.fullmatch(r"r_[0-9a-f]{16}", first.run_id)
    assert first.lease_token
    assert await status(store, "a") is SessionStatus.RUNNING
    assert await status(store, "b") is SessionStatus.QUEUED

    second = await claim_one(store)
    assert (second.session_id, second.team, second.content) == ("b", "helper", "b1")
    third = await claim_one(store)
    assert (third.session_id, third.owner, third.content) == ("c", BOB, "c1")
    assert await store.claim("w1", LEASE_S) is None  # a2 waits for a1
    assert await store.counts() == {"queued": 1, "running": 3}
    assert len({first.run_id, second.run_id, third.run_id}) == 3
    assert len({first.lease_token, second.lease_token, third.lease_token}) == 3

    await store.finish(first, completed(), None)
    fourth = await claim_one(store)
    assert (fourth.session_id, fourth.content, fourth.input_seq) == ("a", "a2", 2)


async def test_counts(store: Store) -> None:
    assert await store.counts() == {"queued": 0, "running": 0}
    for sid in ("a", "a", "b"):
        await store.enqueue(ALICE, sid, "x", None)
    assert await store.counts() == {"queued": 3, "running": 0}
    claim = await claim_one(store)
    assert await store.counts() == {"queued": 2, "running": 1}
    await store.finish(claim, completed(), None)
    assert await store.counts() == {"queued": 2, "running": 0}


# --- a run: append, heartbeat, finish -------------------------------------------------------------
async def test_run_appends_and_finishes_with_team_state(store: Store, clock: FakeClock) -> None:
    await store.enqueue(ALICE, "s1", "hello", None)
    claim = await claim_one(store)
    assert claim.team_state is None  # no run saved any state yet
    assert claim.started is not None
    [start] = (await store.read_log("s1", after=1)).messages
    assert claim.started == start
    assert (start.seq, start.type, start.source, start.run_id) == (2, RUN_STARTED, "system", claim.run_id)
    assert (start.content, start.metadata) == ("Run started.", {"input_seq": 1, "attempt": 1})
    assert is_now(store, start.created_at, clock) and start.client_msg_id is None
    clock.advance(1)
    entries = await store.append(claim, [said("hi!")])
    assert [(e.seq, e.type, e.source, e.run_id) for e in entries] == [
        (3, "TextMessage", "assistant", claim.run_id)
    ]
    assert all(is_now(store, e.created_at, clock) and e.client_msg_id is None for e in entries)
    assert await store.append(claim, []) == []
    assert await store.heartbeat(claim, LEASE_S)
    assert await status(store, "s1") is SessionStatus.RUNNING
    assert await store.load_team_state("s1") is None

    state = {"agents": {"assistant": {"messages": [{"content": "hello"}]}}, "version": 1}
    done = await store.finish(claim, completed(), state)
    assert (done.seq, done.type, done.run_id) == (4, RUN_COMPLETED, claim.run_id)
    assert done.metadata == {"stop_reason": "done"}
    assert await status(store, "s1") is SessionStatus.IDLE
    assert await store.counts() == {"queued": 0, "running": 0}
    loaded = await store.load_team_state("s1")
    assert loaded == state
    assert loaded is not None
    loaded["agents"]["assistant"]["messages"].clear()
    assert await store.load_team_state("s1") == state

    # The next claim brings the saved state along (a copy: changing it changes nothing stored).
    await store.enqueue(ALICE, "s1", "again", None)
    claim = await claim_one(store)
    assert claim.team_state == state
    claim.team_state["agents"].clear()
    assert await store.load_team_state("s1") == state
    assert claim.started is not None and claim.started.seq == 6
    assert claim.started.metadata == {"input_seq": 5, "attempt": 1}
    # A finish without state keeps the last one; a finish with state replaces it.
    await store.finish(claim, completed(), None)
    assert await store.load_team_state("s1") == state
    await store.enqueue(ALICE, "s1", "third", None)
    claim = await claim_one(store)
    assert claim.team_state == state
    await store.finish(claim, completed(), {"version": 2})
    assert await store.load_team_state("s1") == {"version": 2}
    await store.enqueue(ALICE, "s1", "fourth", None)
    claim = await claim_one(store)
    assert claim.team_state == {"version": 2}
    await store.finish(claim, completed(), None)
    # The finished run can no longer write.
    with pytest.raises(LeaseLost):
        await store.append(claim, [said("late")])
    with pytest.raises(LeaseLost):
        await store.finish(claim, completed(), None)


async def test_status_after_finish(store: Store) -> None:
    await store.enqueue(ALICE, "s1", "one", None)
    await store.enqueue(ALICE, "s1", "two", None)
    claim = await claim_one(store)
    await store.finish(claim, completed(), None)
    assert await status(store, "s1") is SessionStatus.QUEUED
    claim = await claim_one(store)
    await store.finish(claim, failed(retrying=False), None)
    assert await status(store, "s1") is SessionStatus.FAILED
    await store.enqueue(ALICE, "s1", "three", None)
    assert await status(store, "s1") is SessionStatus.QUEUED
    claim = await claim_one(store)
    assert await status(store, "s1") is SessionStatus.RUNNING
    await store.finish(claim, lifecycle(RUN_CANCELLED, "cancelled"), None)
    assert await status(store, "s1") is SessionStatus.IDLE


async def test_final_failure_with_input_behind_it_is_queued(store: Store) -> None:
    await store.enqueue(ALICE, "s1", "one", None)
    await store.enqueue(ALICE, "s1", "two", None)
    claim = await claim_one(store)
    entry = await store.finish(claim, failed(retrying=False), None)
    assert entry.metadata == {"error": "boom", "retrying": False}
    assert await status(store, "s1") is SessionStatus.QUEUED
    claim = await claim_one(store)
    await store.finish(claim, completed(), None)
    assert await status(store, "s1") is SessionStatus.IDLE


# --- retry, release, recovery ---------------------------------------------------------------------
async def test_retry_waits_for_not_before_and_blocks_its_session(store: Store, clock: FakeClock) -> None:
    await store.enqueue(ALICE, "s1", "flaky", None)
    await store.enqueue(ALICE, "s1", "after it", None)
    await store.enqueue(ALICE, "s2", "other session", None)
    claim = await claim_one(store)
    [entry] = await store.retry(claim, failed(retrying=True), clock.now + timedelta(seconds=5))
    assert (entry.type, entry.run_id, entry.metadata["retrying"]) == (RUN_FAILED, claim.run_id, True)
    assert await status(store, "s1") is SessionStatus.QUEUED
    assert await store.counts() == {"queued": 3, "running": 0}

    # Not due yet: it still blocks the younger input of its session; other sessions go on.
    other = await claim_one(store)
    assert other.session_id == "s2"
    assert await store.claim("w1", LEASE_S) is None
    clock.advance(4.5)
    assert await store.claim("w1", LEASE_S) is None
    clock.advance(1.0)
    again = await claim_one(store)
    assert (again.session_id, again.input_seq, again.content, again.attempt) == ("s1", 1, "flaky", 2)
    assert again.run_id != claim.run_id and again.lease_token != claim.lease_token
    await _assert_fenced(store, claim)
    await store.finish(again, completed(), None)
    assert (await claim_one(store)).content == "after it"


async def test_release_requeues_at_once(store: Store) -> None:
    await store.enqueue(ALICE, "s1", "long job", None)
    claim = await claim_one(store)
    [entry] = await store.release(claim, interrupted(claim.input_seq, claim.attempt))
    assert (entry.type, entry.run_id, entry.seq) == (RUN_INTERRUPTED, claim.run_id, 3)
    assert await status(store, "s1") is SessionStatus.QUEUED
    again = await claim_one(store)
    assert (again.input_seq, again.attempt) == (1, 2)
    assert again.started is not None
    assert (again.started.seq, again.started.run_id) == (4, again.run_id)
    assert again.started.content == "Run started (attempt 2)."
    assert again.started.metadata == {"input_seq": 1, "attempt": 2}
    await _assert_fenced(store, claim)


async def test_failures_count_failed_attempts_only(store: Store, clock: FakeClock) -> None:
    """Interruptions (release, recovery) raise the attempt but not the failures the retry policy decides on."""
    await store.enqueue(ALICE, "s1", "job", None)
    first = await claim_one(store)
    assert (first.attempt, first.failures) == (1, 0)
    await store.release(first, interrupted(first.input_seq, first.attempt))
    second = await claim_one(store, lease_s=5)
    assert (second.attempt, second.failures) == (2, 0)
    clock.advance(6)
    await store.recover_expired()
    third = await claim_one(store)
    assert (third.attempt, third.failures) == (3, 0)
    await store.retry(third, failed(retrying=True), clock.now)
    fourth = await claim_one(store)
    assert (fourth.attempt, fourth.failures) == (4, 1)


async def _assert_fenced(store: Store, claim: Claim) -> None:
    """Every write verb refuses a claim that lost its lease, and writes nothing."""
    before = await log_json(store, claim.session_id)
    with pytest.raises(LeaseLost):
        await store.append(claim, [said("ghost")])
    with pytest.raises(LeaseLost):
        await store.finish(claim, completed(), {"ghost": True})
    with pytest.raises(LeaseLost):
        await store.retry(claim, failed(retrying=True), T0)
    with pytest.raises(LeaseLost):
        await store.release(claim, interrupted(claim.input_seq, claim.attempt))
    with pytest.raises(LeaseLost):
        await store.take_answer(claim, 0)
    assert not await store.heartbeat(claim, LEASE_S)
    assert await log_json(store, claim.session_id) == before
    assert await store.load_team_state(claim.session_id) != {"ghost": True}


async def test_recover_expired_leases(store: Store, clock: FakeClock) -> None:
    await store.enqueue(ALICE, "s1", "dies", None)
    await store.enqueue(ALICE, "s2", "lives", None)
    dead = await claim_one(store, lease_s=10)
    alive = await claim_one(store, lease_s=30)
    clock.advance(5)
    assert await store.recover_expired() == []
    assert await store.heartbeat(dead, 10)  # now expires at t+15
    clock.advance(9)
    assert await store.recover_expired() == []
    clock.advance(3)  # t+17: dead expired at t+15, alive expires at t+30

    [entry] = await store.recover_expired()
    assert (entry.session_id, entry.type, entry.source, entry.run_id) == (
        "s1",
        RUN_INTERRUPTED,
        "system",
        dead.run_id,
    )
    assert entry.seq == 3
    assert entry.metadata["input_seq"] == dead.input_seq and entry.metadata["attempt"] == 1
    assert is_now(store, entry.created_at, clock)
    body = entry.to_json()
    assert (body["input_seq"], body["attempt"]) == (1, 1)
    assert await seqs(store, "s1") == [1, 2, 3]
    assert await status(store, "s1") is SessionStatus.QUEUED
    assert await store.counts() == {"queued": 1, "running": 1}
    assert await store.recover_expired() == []

    await _assert_fenced(store, dead)
    again = await claim_one(store)
    assert (again.session_id, again.input_seq, again.attempt) == ("s1", 1, 2)
    assert again.run_id != dead.run_id
    assert await store.heartbeat(alive, 30)
    await store.append(alive, [said("still here")])


async def test_recover_does_not_touch_a_heartbeating_run(store: Store, clock: FakeClock) -> None:
    await store.enqueue(ALICE, "s1", "steady", None)
    claim = await claim_one(store, lease_s=10)
    for _ in range(5):
        clock.advance(8)
        assert await store.heartbeat(claim, 10)
        assert await store.recover_expired() == []
    await store.finish(claim, completed(), None)
    clock.advance(100)
    assert await store.recover_expired() == []


# --- human input and cancel -----------------------------------------------------------------------
async def test_user_input_request_and_take_answer(store: Store) -> None:
    await store.enqueue(ALICE, "s1", "[[ask]]", None)
    claim = await claim_one(store)
    await store.append(claim, [NewEntry(USER_INPUT_REQUESTED, "assistant", "")])
    assert await status(store, "s1") is SessionStatus.AWAITING_INPUT
    assert await store.take_answer(claim, 0) is None
    assert await status(store, "s1") is SessionStatus.AWAITING_INPUT

    answer = await store.enqueue(ALICE, "s1", "blue", None)
    later = await store.enqueue(ALICE, "s1", "next question", None)
    assert await status(store, "s1") is SessionStatus.AWAITING_INPUT
    assert await store.take_answer(claim, 0) == Answer(answer.seq, "blue")
    assert await status(store, "s1") is SessionStatus.RUNNING
    assert await store.counts() == {"queued": 1, "running": 1}
    await store.finish(claim, completed(), None)
    assert await status(store, "s1") is SessionStatus.QUEUED
    # The answer was consumed; the next claim is the message after it.
    nxt = await claim_one(store)
    assert (nxt.input_seq, nxt.content) == (later.seq, "next question")


async def test_run_end_clears_awaiting_input(store: Store, clock: FakeClock) -> None:
    await store.enqueue(ALICE, "s1", "[[ask]]", None)
    claim = await claim_one(store)
    await store.append(claim, [NewEntry(USER_INPUT_REQUESTED, "assistant", "")])
    await store.finish(claim, lifecycle(RUN_CANCELLED, "cancelled"), None)
    assert await status(store, "s1") is SessionStatus.IDLE

    await store.enqueue(ALICE, "s1", "[[ask]] again", None)
    claim = await claim_one(store, lease_s=10)
    await store.append(claim, [NewEntry(USER_INPUT_REQUESTED, "assistant", "")])
    clock.advance(11)
    assert len(await store.recover_expired()) == 1
    assert await status(store, "s1") is SessionStatus.QUEUED


async def test_request_cancel(store: Store) -> None:
    assert await store.request_cancel(ALICE, "nope") == CancelRequest()
    await store.create_session(ALICE, "idle", "default", None)
    assert await store.request_cancel(ALICE, "idle") == CancelRequest()
    await store.enqueue(ALICE, "s1", "one", None)
    await store.enqueue(ALICE, "s1", "two", None)
    assert await store.request_cancel(ALICE, "s1") == CancelRequest()  # queued, never started: not a run
    claim = await claim_one(store)
    assert not await store.cancel_requested(claim)
    assert await store.request_cancel(BOB, "s1") == CancelRequest()
    assert not await store.cancel_requested(claim)
    assert await store.request_cancel(ALICE, "s1") == CancelRequest(running=True)
    assert await store.cancel_requested(claim)
    await store.finish(claim, lifecycle(RUN_CANCELLED, "cancelled"), None)
    # The request belonged to that run only.
    nxt = await claim_one(store)
    assert not await store.cancel_requested(nxt)


async def test_deleted_session_asks_its_run_to_stop(store: Store) -> None:
    # Decision (the contract is silent): a run whose input is gone should stop, like a cancelled one.
    await store.enqueue(ALICE, "s1", "one", None)
    claim = await claim_one(store)
    assert await store.delete_session(ALICE, "s1")
    assert await store.cancel_requested(claim)


async def test_answers_belong_to_their_run_across_attempts(store: Store, clock: FakeClock) -> None:
    """An answer taken by one attempt is given again to every later attempt of the same input, in order; a
    message sent later is not taken in its place, and the input's end leaves the answers done."""
    await store.enqueue(ALICE, "s1", "[[ask]] twice", None)
    claim = await claim_one(store, lease_s=10)
    await store.append(claim, [NewEntry(USER_INPUT_REQUESTED, "assistant", "")])
    first = await store.enqueue(ALICE, "s1", "red", None)
    second = await store.enqueue(ALICE, "s1", "green", None)
    assert await store.take_answer(claim, 0) == Answer(first.seq, "red")
    assert await store.take_answer(claim, 0) == Answer(first.seq, "red")  # asking again changes nothing
    assert await store.take_answer(claim, 1) == Answer(second.seq, "green")
    assert await store.take_answer(claim, 3) is None  # no skipping ahead
    await store.retry(claim, failed(retrying=True), clock())
    assert await status(store, "s1") is SessionStatus.QUEUED
    later = await store.enqueue(ALICE, "s1", "blue", None)

    again = await claim_one(store, lease_s=10)
    assert again.input_seq == claim.input_seq and again.attempt == 2
    assert await store.take_answer(again, 0) == Answer(first.seq, "red")
    assert await store.take_answer(again, 1) == Answer(second.seq, "green")
    clock.advance(11)
    await store.recover_expired()  # a crash: still the same answers
    third = await claim_one(store)
    assert third.input_seq == claim.input_seq
    assert await store.take_answer(third, 0) == Answer(first.seq, "red")
    assert await store.take_answer(third, 1) == Answer(second.seq, "green")
    assert await store.take_answer(third, 2) == Answer(later.seq, "blue")
    await store.finish(third, completed(), None)
    assert await store.counts() == {"queued": 0, "running": 0}
    assert await status(store, "s1") is SessionStatus.IDLE


async def test_cancel_ends_a_pending_retry(store: Store, clock: FakeClock) -> None:
    await store.enqueue(ALICE, "s1", "[[fail]] boom", None)
    nxt = await store.enqueue(ALICE, "s1", "afterwards", None)
    claim = await claim_one(store)
    await store.retry(claim, failed(retrying=True), clock() + timedelta(seconds=60))
    done = await store.request_cancel(ALICE, "s1")
    assert not done.running and done.entry is not None and done.cancelled
    assert (done.entry.type, done.entry.run_id) == (RUN_CANCELLED, claim.run_id)
    assert done.entry.to_json()["input_seq"] == claim.input_seq
    assert (await store.read_log("s1")).messages[-1] == done.entry
    assert await status(store, "s1") is SessionStatus.QUEUED  # the next message waits, claimable now
    clock.advance(120)
    following = await claim_one(store)
    assert following.input_seq == nxt.seq  # the cancelled input is never claimed again
    assert await store.request_cancel(ALICE, "s1") == CancelRequest(running=True)


@pytest.mark.parametrize("how", ["retry", "release", "crash"])
async def test_a_cancel_is_never_undone_by_a_requeue(store: Store, clock: FakeClock, how: str) -> None:
    """A run asked to stop that then fails, is shut down or dies ends with run_cancelled: never queued again."""
    await store.enqueue(ALICE, "s1", "one", None)
    nxt = await store.enqueue(ALICE, "s1", "two", None)
    claim = await claim_one(store, lease_s=10)
    assert (await store.request_cancel(ALICE, "s1")).running
    if how == "retry":
        written = await store.retry(claim, failed(retrying=True), clock())
    elif how == "release":
        written = await store.release(claim, interrupted(claim.input_seq, claim.attempt))
    else:
        clock.advance(11)
        written = await store.recover_expired()
    assert [e.type for e in written][-1] == RUN_CANCELLED
    assert written[-1].to_json()["input_seq"] == claim.input_seq
    assert (await store.read_log("s1")).messages[-len(written) :] == written
    clock.advance(120)
    following = await claim_one(store)
    assert following.input_seq == nxt.seq  # the cancelled input never runs again


@pytest.mark.parametrize("store_url", BACKENDS, indirect=True)
async def test_interruptions_are_capped(store_url: str, clock: FakeClock) -> None:
    """At max_interruptions deaths recovery ends the input with a final run_failed; graceful releases and
    failures do not count."""
    s = open_store(store_url, clock=clock, max_interruptions=2, db_clock_offset=clock.db_offset)
    await s.open()
    try:
        await s.enqueue(ALICE, "s1", "poison", None)
        claim = await claim_one(s, lease_s=10)
        await s.release(claim, interrupted(claim.input_seq, claim.attempt))  # a shutdown: not counted
        claim = await claim_one(s, lease_s=10)
        clock.advance(11)
        [first] = await s.recover_expired()
        assert first.type == RUN_INTERRUPTED
        claim = await claim_one(s, lease_s=10)
        clock.advance(11)
        [final] = await s.recover_expired()
        assert (final.type, final.metadata["retrying"], final.run_id) == (RUN_FAILED, False, claim.run_id)
        assert "2 times" in final.metadata["error"]
        assert await s.counts() == {"queued": 0, "running": 0}
        assert await status(s, "s1") is SessionStatus.FAILED
        with pytest.raises(LeaseLost):
            await s.append(claim, [said("late")])
    finally:
        await s.close()


async def test_reset_team_state(store: Store) -> None:
    await store.enqueue(ALICE, "s1", "one", None)
    claim = await claim_one(store)
    with pytest.raises(Conflict):
        await store.reset_team_state(ALICE, "s1")  # a run is in progress
    await store.finish(claim, completed(), {"agent_states": {"a": 1}})
    assert await store.load_team_state("s1") == {"agent_states": {"a": 1}}
    entry = await store.reset_team_state(ALICE, "s1")
    assert entry is not None and (entry.type, entry.source) == (TEAM_RESET, "system")
    assert await store.load_team_state("s1") is None
    assert (await store.read_log("s1")).messages[-1] == entry
    assert await store.reset_team_state(ALICE, "nope") is None
    await store.enqueue(ALICE, "s1", "two", None)
    assert (await claim_one(store)).team_state is None


async def test_drafts_live_until_their_message_or_the_run_ends(store: Store) -> None:
    await store.enqueue(ALICE, "s1", "one", None)
    claim = await claim_one(store)
    assert await store.read_draft("s1") is None
    await store.save_draft(claim, Draft(claim.run_id, "m-1", "assistant", "Hel"))
    await store.save_draft(claim, Draft(claim.run_id, "m-1", "assistant", "Hello wo\u0000"))
    assert await store.read_draft("s1") == Draft(claim.run_id, "m-1", "assistant", "Hello wo\u0000")
    await store.append(claim, [NewEntry("TextMessage", "assistant", "other", {"id": "m-0"})])
    assert await store.read_draft("s1") is not None  # another message: the draft stays
    await store.append(claim, [NewEntry("TextMessage", "assistant", "Hello world", {"id": "m-1"})])
    assert await store.read_draft("s1") is None  # its message is in the log
    await store.save_draft(claim, Draft(claim.run_id, "m-2", "assistant", "Bye"))
    await store.finish(claim, completed(), None)
    assert await store.read_draft("s1") is None
    with pytest.raises(LeaseLost):
        await store.save_draft(claim, Draft(claim.run_id, "m-3", "assistant", "late"))
    assert await store.read_draft("s1") is None


async def test_a_dead_runs_draft_becomes_a_partial_entry(store: Store, clock: FakeClock) -> None:
    await store.enqueue(ALICE, "s1", "one", None)
    claim = await claim_one(store, lease_s=10)
    await store.save_draft(claim, Draft(claim.run_id, "m-1", "assistant", "Half an ans"))
    clock.advance(11)
    cut, note = await store.recover_expired()
    assert (cut.type, cut.source, cut.content, cut.run_id) == (
        "TextMessage",
        "assistant",
        "Half an ans",
        claim.run_id,
    )
    assert cut.metadata == {"id": "m-1", "partial": True, "partial_reason": "interrupted"}
    assert note.type == RUN_INTERRUPTED and note.seq == cut.seq + 1
    assert await store.read_draft("s1") is None
    again = await claim_one(store)
    await store.save_draft(again, Draft(again.run_id, "m-9", "assistant", "x"))
    await store.release(again, interrupted(again.input_seq, again.attempt))
    assert await store.read_draft("s1") is None  # a graceful stop wrote its own partial entry


async def test_multitask_strategies_in_the_store(store: Store) -> None:
    """reject refuses (nothing written) while a run works or inputs wait; a duplicate is still answered; a
    session's default applies; interrupt/rollback inputs are never answers; rollback_requested sees them."""
    made = await store.create_session(ALICE, "s1", "default", None, multitask_strategy="reject")
    assert made.multitask_strategy == "reject"
    first = await store.enqueue(ALICE, "s1", "one", "m1")
    assert first.strategy == "reject"  # idle: accepted
    claim = await claim_one(store)
    before = await log_json(store, "s1")
    with pytest.raises(Conflict):
        await store.enqueue(ALICE, "s1", "two", "m2")  # the session's default
    with pytest.raises(Conflict):
        await store.enqueue(ALICE, "s1", "two", "m2", strategy="reject")
    assert (
        await store.enqueue(ALICE, "s1", "one again", "m1")
    ).duplicate  # a resend is answered, not refused
    assert await log_json(store, "s1") == before
    await store.append(claim, [NewEntry(USER_INPUT_REQUESTED, "assistant", "")])
    answer = await store.enqueue(ALICE, "s1", "the answer", None)  # awaiting, nothing queued: taken
    assert await store.take_answer(claim, 0) == Answer(answer.seq, "the answer")
    assert not await store.rollback_requested(claim)
    await store.append(claim, [NewEntry(USER_INPUT_REQUESTED, "assistant", "")])
    stop = await store.enqueue(ALICE, "s1", "stop that", None, strategy="rollback")
    assert stop.strategy == "rollback"
    assert await store.take_answer(claim, 1) is None  # not an answer: it runs as its own input
    assert await store.rollback_requested(claim)
    with pytest.raises(Conflict):
        await store.enqueue(ALICE, "s1", "and this", None)  # something is queued now
    await store.finish(claim, completed(), None)
    nxt = await claim_one(store)
    assert nxt.input_seq == stop.seq
    assert (await store.get_session(ALICE, "s1")) is not None


async def test_an_inputs_trace_context_comes_back_with_every_claim(store: Store, clock: FakeClock) -> None:
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    await store.enqueue(ALICE, "s1", "traced", None, trace_context=headers)
    await store.enqueue(ALICE, "s2", "not traced", None)
    first = await claim_one(store, lease_s=10)
    other = await claim_one(store)
    assert (first.trace_context, other.trace_context) == (headers, None)
    clock.advance(11)
    await store.recover_expired()  # a crash: the retry joins the same trace
    again = await claim_one(store)
    assert again.input_seq == first.input_seq and again.trace_context == headers


async def test_reset_waits_for_a_pending_retry_to_end(store: Store, clock: FakeClock) -> None:
    """A failed run waiting for its retry is a run in progress: a reset now would make the retry start from
    wiped memory."""
    await store.enqueue(ALICE, "s1", "[[fail]] boom", None)
    claim = await claim_one(store)
    await store.retry(claim, failed(retrying=True), clock() + timedelta(seconds=60))
    with pytest.raises(Conflict):
        await store.reset_team_state(ALICE, "s1")
    assert (await store.request_cancel(ALICE, "s1")).entry is not None
    assert await store.reset_team_state(ALICE, "s1") is not None


async def test_recovery_marks_a_rolled_back_run(store: Store, clock: FakeClock) -> None:
    """A run asked to stop by a rollback message that dies first: recovery's run_cancelled says rolled_back."""
    await store.enqueue(ALICE, "s1", "long", None)
    claim = await claim_one(store, lease_s=10)
    await store.enqueue(ALICE, "s1", "instead", None, strategy="rollback")
    assert (await store.request_cancel(ALICE, "s1")).running
    clock.advance(11)
    [cancelled] = await store.recover_expired()
    assert (cancelled.type, cancelled.run_id) == (RUN_CANCELLED, claim.run_id)
    assert cancelled.to_json()["rolled_back"] is True


# --- owners ---------------------------------------------------------------------------------------
async def test_owner_isolation_on_every_owner_verb(store: Store) -> None:
    await store.create_session(ALICE, "s1", "default", "private")
    await store.enqueue(ALICE, "s1", "secret", "m1")
    claim = await claim_one(store)
    assert await store.get_session(BOB, "s1") is None
    assert await store.list_sessions(BOB) == []
    assert not await store.delete_session(BOB, "s1")
    with pytest.raises(NotFound):
        await store.enqueue(BOB, "s1", "intrude", "m1")
    assert not (await store.request_cancel(BOB, "s1")).cancelled
    assert await store.reset_team_state(BOB, "s1") is None
    with pytest.raises(Conflict):
        await store.create_session(BOB, "s1", "default", None)
    # Nothing changed for the owner.
    assert not await store.cancel_requested(claim)
    assert await seqs(store, "s1") == [1, 2]  # the message and its run_started
    assert await status(store, "s1") is SessionStatus.RUNNING
    assert [s.session_id for s in await store.list_sessions(ALICE)] == ["s1"]


# --- JSON shape -----------------------------------------------------------------------------------
async def test_entry_json_shapes(store: Store, clock: FakeClock) -> None:
    await store.enqueue(ALICE, "s1", "hello", "c-1")
    claim = await claim_one(store)
    await store.retry(claim, failed(retrying=True), T0)
    user, start, fail = (await store.read_log("s1")).messages
    assert is_now(store, user.created_at, clock)
    assert user.to_json() == {
        "seq": 1,
        "session_id": "s1",
        "type": "TextMessage",
        "source": "user",
        "content": "hello",
        "created_at": iso(user.created_at),
        "run_id": None,
        "client_msg_id": "c-1",
        "metadata": {},
    }
    body = start.to_json()
    assert set(body) == ENTRY_KEYS | {"input_seq", "attempt"}
    assert (body["type"], body["source"], body["run_id"]) == (RUN_STARTED, "system", claim.run_id)
    assert (body["input_seq"], body["attempt"]) == (1, 1)
    assert body["metadata"] == {"input_seq": 1, "attempt": 1}
    body = fail.to_json()
    assert (body["error"], body["retrying"]) == ("boom", True)
    assert orjson.loads(orjson.dumps(body)) == body


# --- durability -----------------------------------------------------------------------------------
async def _memory_is_documented_as_not_durable(store: Store, clock: FakeClock) -> None:
    """memory:// promises nothing across a restart (README): a new store starts empty."""
    await store.enqueue(ALICE, "a", "one", "c1")
    again = open_store("memory://", clock=clock)
    await again.open()
    try:
        assert await again.list_sessions(ALICE) == []
        assert (await again.enqueue(ALICE, "a", "one", "c1")).duplicate is False
    finally:
        await again.close()


async def test_reopen_finds_everything(
    store: Store, request: pytest.FixtureRequest, clock: FakeClock
) -> None:
    if store.dialect == "memory":
        await _memory_is_documented_as_not_durable(store, clock)
        return
    await store.create_session(ALICE, "a", "default", "kept")
    await store.enqueue(ALICE, "a", "one", "c1")
    done = await claim_one(store)
    await store.append(done, [said("hi")])
    await store.finish(done, completed(), {"memory": ["one"]})
    await store.enqueue(BOB, "b", "bob's", None)
    running = await claim_one(store, lease_s=10)
    await store.enqueue(ALICE, "a", "two", "c2")
    await store.set_cursor("a", "phone", 3)
    sessions = {sid: await store.get_session(owner, sid) for owner, sid in ((ALICE, "a"), (BOB, "b"))}
    logs = {sid: await log_json(store, sid) for sid in ("a", "b")}

    async with reopened(store, request, clock) as again:
        assert await again.ping()
        assert {sid: await again.get_session(o, sid) for o, sid in ((ALICE, "a"), (BOB, "b"))} == sessions
        assert {sid: await log_json(again, sid) for sid in ("a", "b")} == logs
        assert await again.load_team_state("a") == {"memory": ["one"]}
        assert await again.get_cursor("a", "phone") == 3
        assert await again.counts() == {"queued": 1, "running": 1}
        dup = await again.enqueue(ALICE, "a", "one", "c1")
        assert (dup.duplicate, dup.seq) == (True, 1)
        # The run that died with the old process is recovered and retried.
        clock.advance(11)
        [entry] = await again.recover_expired()
        assert (entry.session_id, entry.run_id, entry.type) == ("b", running.run_id, RUN_INTERRUPTED)
        first = await claim_one(again)
        second = await claim_one(again)
        assert {(c.session_id, c.input_seq, c.attempt) for c in (first, second)} == {("b", 1, 2), ("a", 5, 1)}
        states = {c.session_id: c.team_state for c in (first, second)}
        assert states == {"a": {"memory": ["one"]}, "b": None}
        assert (await again.enqueue(ALICE, "a", "three", None)).seq == 7  # 6: the claim's run_started


# --- driver errors: one vocabulary at every edge ----------------------------------------------------
def test_driver_errors_translate_to_the_same_service_errors() -> None:
    """A unique violation is Conflict (409) on both SQL dialects, a value the database refuses is BadRequest,
    anything else from the driver StoreUnavailable (503)."""
    import sqlite3

    import asyncpg

    from service.errors import StoreUnavailable
    from service.queue.postgres.errors import translate as pg_translate
    from service.queue.sqlite.errors import translate as sqlite_translate

    assert isinstance(sqlite_translate(sqlite3.IntegrityError("UNIQUE constraint failed"), "x.db"), Conflict)
    assert isinstance(pg_translate(asyncpg.UniqueViolationError("duplicate key")), Conflict)
    assert isinstance(pg_translate(asyncpg.UntranslatableCharacterError("\\u0000")), BadRequest)
    assert isinstance(pg_translate(ConnectionResetError("gone")), StoreUnavailable)
    assert isinstance(sqlite_translate(sqlite3.OperationalError("disk I/O error"), "x.db"), StoreUnavailable)


# --- retention --------------------------------------------------------------------------------------------
DAY_S = 86400.0


async def test_expire_sessions_deletes_idle_sessions_only(store: Store, clock: FakeClock) -> None:
    await store.enqueue(ALICE, "old", "one", "m1")
    await store.finish(await claim_one(store), completed(), {"memory": ["one"]})
    await store.set_cursor("old", "phone", 3)
    await store.create_session(BOB, "old-empty", "default", None)
    await store.enqueue(ALICE, "old-queued", "waiting", None)  # never claimed: its input waits
    await store.enqueue(ALICE, "old-running", "busy", None)
    clock.advance(10 * DAY_S)
    await store.enqueue(ALICE, "recent", "hello", None)
    # old-queued's input is taken now: old-running's stays queued behind nothing else but is never claimed.
    running = await claim_one(store)
    assert running.session_id == "old-queued"

    assert sorted(await store.expire_sessions(30 * DAY_S, 100)) == []  # nothing is 30 days idle
    assert sorted(await store.expire_sessions(5 * DAY_S, 100)) == ["old", "old-empty"]
    assert await store.expire_sessions(5 * DAY_S, 100) == []  # each is deleted once

    assert await store.get_session(ALICE, "old") is None
    assert await store.get_session(BOB, "old-empty") is None
    page = await store.read_log("old")
    assert (page.messages, page.last_seq) == ([], 0)
    assert await store.get_cursor("old", "phone") is None
    assert await store.load_team_state("old") is None
    kept = {s.session_id for s in await store.list_sessions(ALICE)}
    assert kept == {"old-queued", "old-running", "recent"}  # a running or queued input keeps its session
    await store.append(running, [said("still here")])  # its run goes on


async def test_expire_sessions_works_in_batches(store: Store, clock: FakeClock) -> None:
    for n in range(7):
        await store.create_session(ALICE, f"s{n}", "default", None)
    clock.advance(2 * DAY_S)
    batches = []
    while ids := await store.expire_sessions(DAY_S, 3):
        assert len(ids) <= 3
        batches.append(ids)
    assert sorted(sid for ids in batches for sid in ids) == [f"s{n}" for n in range(7)]
    assert await store.list_sessions(ALICE) == []


async def test_read_frames_are_read_log_pre_serialised(store: Store) -> None:
    await store.enqueue(ALICE, "s1", 'tricky "text"\n\u0000 \u00e9 \U0001f600 \\', "m1")
    claim = await claim_one(store)
    await store.append(
        claim,
        [
            NewEntry("TextMessage", "assistant", "plain", {"id": "msg-1", "models_usage": {"a": 1.5}}),
            NewEntry("ToolCallRequestEvent", "assistant", [{"id": "c1", "arguments": "{}"}], {"id": 7}),
            NewEntry("ThoughtEvent", "assistant", None, {}),
        ],
    )
    await store.finish(claim, completed(), None)
    whole = await store.read_log("s1", after=0, limit=100)
    for after, limit in ((0, 100), (0, 2), (2, 2), (6, 5), (100, 5)):
        page = await store.read_log("s1", after=after, limit=limit)
        frames = await store.read_frames("s1", after=after, limit=limit)
        assert frames.frames == [orjson.dumps(e.to_json()) for e in page.messages]
        assert frames.seqs == [e.seq for e in page.messages]
        assert (frames.last_seq, frames.has_more) == (page.last_seq, page.has_more)
    frames = await store.read_frames("s1", after=0, limit=100)
    assert frames.message_ids == [
        e.metadata.get("id") if isinstance(e.metadata.get("id"), str) else None for e in whole.messages
    ]
    assert "msg-1" in frames.message_ids
    gone = await store.read_frames("nope", after=0, limit=10)
    assert (gone.frames, gone.last_seq, gone.has_more) == ([], 0, False)


# --- team state in pieces (state_pieces.py): every shape comes back exactly as saved ----------------------------
def _agent_state(messages: list[Any], thread: list[Any], **extra: Any) -> dict[str, Any]:
    return {
        "type": "TeamState",
        "agent_states": {
            "assistant": {"agent_state": {"llm_context": {"messages": messages}}, "message_buffer": []},
            "manager": {"message_thread": thread, "current_turn": 0, **extra},
        },
        "version": "1.0.0",
    }


async def _round(store: Store, state: dict[str, Any] | None, n: int) -> Claim:
    """Save ``state`` with one run, then claim the next: the claim carries what was saved."""
    claim = await claim_one(store)
    await store.finish(claim, completed(), state)
    await store.enqueue(ALICE, "s1", f"turn {n}", None)
    return await claim_one(store)


async def test_team_state_round_trips_through_every_kind_of_change(store: Store) -> None:
    """Growing lists are stored as pieces; appends, edits in the middle, shrinking, new and removed lists, odd
    text and key order all come back exactly as saved, from the claim and from load_team_state."""
    await store.enqueue(ALICE, "s1", "start", None)
    odd = {"z": 1, "a": "nul \x00 and emoji \U0001f600", "m": [1, {"b": 2, "a": 1}]}
    msgs = [{"source": "user", "content": "hi"}]
    thread = [{"type": "TextMessage", "content": "hi", "metadata": {}}]
    states = [
        _agent_state(msgs, thread),
        _agent_state([*msgs, {"source": "assistant", "content": "hello"}], [*thread, odd]),  # appended
        _agent_state(
            [*msgs, {"source": "assistant", "content": "hello"}], [*thread, odd], next_speaker_index=1
        ),
        _agent_state(
            [{"source": "user", "content": "EDITED"}, {"source": "assistant", "content": "hello"}], [odd]
        ),
        _agent_state([], []),  # shrunk to nothing
        {"agent_states": {"other": {"message_thread": [odd, odd]}}},  # lists removed, a new one
        {"messages": [1, 2, 3], "tail": {"messages": "not a list"}},  # top level, and a key that is no list
        _agent_state(msgs * 3, thread * 2),
    ]
    claim = await claim_one(store)
    for n, state in enumerate(states):
        await store.finish(claim, completed(), state)
        loaded = await store.load_team_state("s1")
        assert orjson.dumps(loaded) == orjson.dumps(state), n  # equal, key order included
        await store.enqueue(ALICE, "s1", f"turn {n}", None)
        claim = await claim_one(store)
        assert orjson.dumps(claim.team_state) == orjson.dumps(state), n
    # A reset forgets pieces and head; the next save starts afresh.
    await store.finish(claim, completed(), None)
    assert await store.reset_team_state(ALICE, "s1") is not None
    assert await store.load_team_state("s1") is None
    await store.enqueue(ALICE, "s1", "after reset", None)
    claim = await _round(store, _agent_state([{"only": 1}], []), 99)
    assert claim.team_state == _agent_state([{"only": 1}], [])


async def test_team_state_grows_by_appending_over_many_runs(store: Store) -> None:
    """A conversation's state over many runs (each run appends to the lists) comes back whole every time."""
    await store.enqueue(ALICE, "s1", "start", None)
    msgs: list[Any] = []
    thread: list[Any] = []
    claim = await claim_one(store)
    for n in range(30):
        msgs += [{"source": "user", "content": f"q{n}"}, {"source": "assistant", "content": f"a{n}" * n}]
        thread += [{"content": f"q{n}"}, {"content": f"a{n}"}]
        state = _agent_state(list(msgs), list(thread), current_turn=n)
        await store.finish(claim, completed(), state)
        await store.enqueue(ALICE, "s1", f"turn {n}", None)
        claim = await claim_one(store)
        assert claim.team_state == state
    # Another session's state is its own.
    await store.enqueue(ALICE, "s2", "other", None)
    await store.finish(claim, completed(), None)
    other = await claim_one(store)
    assert other.session_id == "s2" and other.team_state is None
    await store.finish(other, completed(), {"messages": ["s2 only"]})
    assert await store.load_team_state("s2") == {"messages": ["s2 only"]}
    assert await store.load_team_state("s1") == state
    assert await store.delete_session(ALICE, "s1")
    assert await store.load_team_state("s1") is None


async def claim_held(store: Store, held: dict[str, dict[str, Any]]) -> Claim:
    claim = await store.claim("w1", LEASE_S, held=held)
    assert claim is not None
    return claim


async def test_a_claim_hands_back_the_held_state_only_while_it_is_the_stored_one(
    store: Store, request: pytest.FixtureRequest, clock: FakeClock
) -> None:
    """``claim``'s ``held`` (README "Team state"): a SQL store returns the caller's very dict when it last saved
    that dict for the session and nothing wrote the state since; memory:// copies. Whatever the store, the claim's
    state is the stored one: after a reset, another process's save, or for a dict it never saved, it is read."""
    sql = store.dialect != "memory"
    await store.enqueue(ALICE, "s1", "one", None)
    claim = await claim_one(store)
    saved = _agent_state([{"source": "user", "content": "one"}], [{"content": "one"}])
    await store.finish(claim, completed(), saved)

    await store.enqueue(ALICE, "s1", "two", None)
    claim = await claim_held(store, {"s1": saved})
    assert claim.team_state == saved
    assert (claim.team_state is saved) == sql
    # An equal dict it did not save is never taken for the stored state: read back, equal, not that object.
    later = _agent_state([{"source": "user", "content": "two"}], [{"content": "two"}])
    await store.finish(claim, completed(), later)
    await store.enqueue(ALICE, "s1", "three", None)
    lookalike = copy.deepcopy(later)
    claim = await claim_held(store, {"s1": lookalike})
    assert claim.team_state == later and claim.team_state is not lookalike
    # A reset wrote the state since: the held dict is not handed back.
    await store.finish(claim, completed(), later)
    assert await store.reset_team_state(ALICE, "s1") is not None
    await store.enqueue(ALICE, "s1", "four", None)
    claim = await claim_held(store, {"s1": later})
    assert claim.team_state is None
    await store.finish(claim, completed(), later)
    if not sql:
        return  # memory:// has no other process
    # Another process saved a different state for the session since: the claim brings what it saved.
    other = open_store(request.node.stash[STORE_URL], clock=clock, db_clock_offset=clock.db_offset)
    await other.open()
    try:
        await other.enqueue(ALICE, "s1", "five", None)
        claim = await claim_one(other)
        assert claim.team_state == later
        elsewhere = _agent_state([{"source": "user", "content": "five"}], [])
        await other.finish(claim, completed(), elsewhere)
    finally:
        await other.close()
    await store.enqueue(ALICE, "s1", "six", None)
    claim = await claim_held(store, {"s1": later})
    assert claim.team_state == elsewhere


# --- webhook outbox (README "Webhooks") -----------------------------------------------------------
HOOK = "http://127.0.0.1:9/hook"


async def test_webhook_outbox_events_written_with_their_entries(store: Store, clock: FakeClock) -> None:
    await store.create_session(ALICE, "w", "default", None, webhook_url=HOOK)
    await store.create_session(ALICE, "quiet", "default", None)  # no URL, no server default: no events
    await store.enqueue(ALICE, "w", "one", None)
    await store.enqueue(ALICE, "quiet", "one", None)
    first = await claim_one(store)
    ask = NewEntry(type=USER_INPUT_REQUESTED, source="user", content="")
    asked = (await store.append(first, [said("hi"), ask]))[-1]
    later = clock.now + timedelta(seconds=60)
    retried = await store.retry(first, failed(retrying=True), later)  # a retrying failure: no event
    second = await claim_one(store)
    assert second.session_id == "quiet"
    await store.finish(second, completed(), None)
    clock.advance(61)
    third = await claim_one(store)
    done = await store.finish(third, failed(retrying=False), None)
    events = await store.claim_webhooks(LEASE_S, 10)
    assert [(e.type, e.last_seq, e.input_seq, e.run_id) for e in events] == [
        ("awaiting_input", asked.seq, 1, first.run_id),
        ("run_failed", done.seq, 1, third.run_id),
    ]
    assert retried[0].seq < done.seq
    assert all(e.url == HOOK and e.session_id == "w" and e.attempt == 1 for e in events)
    assert events[1].payload() == {
        "session_id": "w",
        "run_id": third.run_id,
        "input_seq": 1,
        "type": "run_failed",
        "last_seq": done.seq,
        "created_at": iso(done.created_at),
    }
    assert len({e.webhook_id for e in events}) == 2
    assert await store.claim_webhooks(LEASE_S, 10) == []  # leased


async def test_webhook_server_default_resolved_at_write_time(
    store: Store, request: pytest.FixtureRequest, clock: FakeClock
) -> None:
    await store.close()
    url = request.node.stash[STORE_URL]
    hooked = open_store(
        url, clock=clock, db_clock_offset=clock.db_offset, webhook_url="http://default.example/"
    )
    await hooked.open()
    try:
        await hooked.create_session(ALICE, "own", "default", None, webhook_url=HOOK)
        for sid in ("own", "plain"):
            await hooked.enqueue(ALICE, sid, "x", None)
            await hooked.finish(await claim_one(hooked), completed(), None)
        # A cancel of a pending retry ends the run with run_cancelled: an event too.
        await hooked.enqueue(ALICE, "plain", "y", None)
        await hooked.retry(await claim_one(hooked), failed(retrying=True), clock.now)
        cancelled = await hooked.request_cancel(ALICE, "plain")
        assert cancelled.entry is not None
        events = await hooked.claim_webhooks(LEASE_S, 10)
        assert [(e.session_id, e.url, e.type) for e in events] == [
            ("own", HOOK, "run_completed"),
            ("plain", "http://default.example/", "run_completed"),
            ("plain", "http://default.example/", "run_cancelled"),
        ]
        assert events[2].input_seq == 4  # plain: x, run_started, run_completed, y
    finally:
        await hooked.close()


async def test_webhook_retry_lease_and_give_up(store: Store, clock: FakeClock) -> None:
    await store.create_session(ALICE, "w", "default", None, webhook_url=HOOK)
    for text in ("one", "two"):
        await store.enqueue(ALICE, "w", text, None)
        await store.finish(await claim_one(store), completed(), None)
    one, two = await store.claim_webhooks(LEASE_S, 10)
    assert await store.webhook_failed(one, 10.0)
    assert await store.webhook_failed(two, None)  # given up: never again
    assert not await store.webhook_delivered(two)
    assert await store.claim_webhooks(LEASE_S, 10) == []  # not due yet
    clock.advance(11)
    (again,) = await store.claim_webhooks(5.0, 10)
    assert (again.webhook_id, again.attempt) == (one.webhook_id, 2)
    assert again.lease_token != one.lease_token
    assert not await store.webhook_delivered(one)  # an old lease writes nothing
    clock.advance(6)  # the deliverer died: its lease expires
    (third,) = await store.claim_webhooks(LEASE_S, 10)
    assert (third.webhook_id, third.attempt) == (one.webhook_id, 3)
    assert not await store.webhook_failed(again, 1.0)
    assert await store.webhook_delivered(third)
    clock.advance(3600)
    assert await store.claim_webhooks(LEASE_S, 10) == []


async def test_webhook_outbox_goes_with_its_session(store: Store, clock: FakeClock) -> None:
    await store.create_session(ALICE, "w", "default", None, webhook_url=HOOK)
    await store.enqueue(ALICE, "w", "one", None)
    await store.finish(await claim_one(store), completed(), None)
    assert await store.delete_session(ALICE, "w")
    assert await store.claim_webhooks(LEASE_S, 10) == []
