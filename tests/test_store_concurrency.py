"""Many claimers and producers at once, on every backend: the queue rules hold under concurrency.

The test keeps its own book of what is running; a violation is only recorded when it is certain (a claim
returned for a session whose previous run had not yet called ``finish``), so scheduling alone never fails it.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from service.models import RUN_COMPLETED, RUN_STARTED, NewEntry, lifecycle
from service.queue import Store

SESSIONS = 20
INPUTS_PER_SESSION = 6  # half enqueued before the claimers start, half while they run
CLAIMERS = 8
OWNER = "alice"


class Book:
    def __init__(self) -> None:
        self.running: dict[str, int] = {}  # session -> input_seq, between claim and the call to finish
        self.claimed: list[int] = []  # input ids
        self.order: defaultdict[str, list[int]] = defaultdict(list)  # session -> input_seqs in claim order
        self.enqueued: defaultdict[str, list[int]] = defaultdict(
            list
        )  # session -> user seqs in enqueue order
        self.violations: list[str] = []
        self.done = 0


async def produce(store: Store, book: Book, rounds: range, *, by_session: bool) -> None:
    """Enqueue ``rounds`` inputs per session: each session's in a row (so the oldest queued inputs belong to
    one session and a claimer must skip them), or round-robin over the sessions."""
    pairs = (
        [(s, n) for s in range(SESSIONS) for n in rounds]
        if by_session
        else [(s, n) for n in rounds for s in range(SESSIONS)]
    )
    for s, n in pairs:
        sid = f"s{s:02d}"
        result = await store.enqueue(OWNER, sid, f"{sid} input {n}", f"{sid}-{n}")
        book.enqueued[sid].append(result.seq)
        await asyncio.sleep(0)  # interleave with the claimers


async def claimer(store: Store, book: Book, name: str, total: int) -> None:
    while book.done < total:
        claim = await store.claim(name, 60)
        if claim is None:
            await store.wait_for_work(0.05)
            continue
        if claim.session_id in book.running:
            book.violations.append(f"{claim.session_id}: {claim.input_seq} claimed while another input runs")
        book.running[claim.session_id] = claim.input_seq
        book.claimed.append(claim.input_id)
        book.order[claim.session_id].append(claim.input_seq)
        # The claim itself committed the run's run_started (the log check below finds it in its place).
        assert claim.started is not None and claim.started.run_id == claim.run_id
        assert claim.started.metadata["input_seq"] == claim.input_seq
        await asyncio.sleep(0)  # give others the chance to misbehave while this run is live
        await store.append(claim, [NewEntry("TextMessage", "assistant", f"echo {claim.content}")])
        book.running.pop(claim.session_id, None)
        await store.finish(claim, lifecycle(RUN_COMPLETED, "completed"), {"last": claim.input_seq})
        book.done += 1


async def test_concurrent_claimers_and_producers(store: Store) -> None:
    book = Book()
    half = INPUTS_PER_SESSION // 2
    total = SESSIONS * INPUTS_PER_SESSION
    await produce(store, book, range(half), by_session=True)
    async with asyncio.timeout(45):
        await asyncio.gather(
            produce(store, book, range(half, INPUTS_PER_SESSION), by_session=False),
            *(claimer(store, book, f"w{i}", total) for i in range(CLAIMERS)),
        )

    assert book.violations == []
    assert len(book.claimed) == len(set(book.claimed)) == total
    assert await store.counts() == {"queued": 0, "running": 0}
    for s in range(SESSIONS):
        sid = f"s{s:02d}"
        assert book.order[sid] == book.enqueued[sid], sid
        page = await store.read_log(sid, limit=1000)
        assert [e.seq for e in page.messages] == list(range(1, 4 * INPUTS_PER_SESSION + 1))
        assert page.last_seq == 4 * INPUTS_PER_SESSION
        # In the log, runs of one session never overlap: a run_started is followed by its own run's entries.
        open_run: str | None = None
        for entry in page.messages:
            if entry.type == RUN_STARTED:
                assert open_run is None, f"{sid}: two runs live at once"
                open_run = entry.run_id
            elif entry.source != "user":
                assert entry.run_id == open_run
                if entry.type == RUN_COMPLETED:
                    open_run = None
        assert await store.load_team_state(sid) == {"last": book.enqueued[sid][-1]}
