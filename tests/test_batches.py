"""The group-commit queue (service/queue/batches.py) that both SQL writers serve: what each serving task
takes. The writers' durability is tested through the stores; these tests pin how calls are shared."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from service.queue.batches import Batches

WAIT_S = 5.0


@dataclass
class Call:
    session: str
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


async def test_calls_that_arrive_together_are_shared_by_the_free_writers() -> None:
    """Two writers, six calls arriving at once: both writers run a batch at the same time (each waits for the
    other to start: one writer taking everything would never let the other start), half each, oldest first."""
    batches: Batches[Call] = Batches(256)
    started: list[list[str]] = []
    both = asyncio.Event()

    async def run(batch: list[Call]) -> None:
        started.append([c.session for c in batch])
        if len(started) == 2:
            both.set()
        await both.wait()
        for call in batch:
            call.future.set_result(None)

    writers = [asyncio.create_task(batches.serve(run)) for _ in range(2)]
    await asyncio.sleep(0)  # both writers are waiting for calls
    calls = [Call(s) for s in ("b", "a", "c", "a", "b", "c")]
    for call in calls:
        batches.add(call)
    async with asyncio.timeout(WAIT_S):
        await asyncio.gather(*(c.future for c in calls))
    batches.close()
    await asyncio.gather(*writers)
    assert started == [["b", "a", "c"], ["a", "b", "c"]]  # half each, in the order they came


async def test_a_busy_queue_serves_its_oldest_calls_first() -> None:
    """Calls keep arriving faster than two writers commit: a call is served after the calls that came before it
    and before those that came after, whatever session it names (sorting the queue would leave a session whose
    id sorts last waiting for as long as the queue stays busy)."""
    batches: Batches[Call] = Batches(4)
    taken: list[str] = []
    arriving = iter(range(100_000))

    async def run(batch: list[Call]) -> None:
        taken.extend(c.session for c in batch)
        for _ in range(8):  # more arrive during every commit than a batch takes
            batches.add(Call(f"s{next(arriving):06d}"))
        for call in batch:
            call.future.set_result(None)

    for _ in range(20):
        batches.add(Call(f"s{next(arriving):06d}"))
    last = Call("zzz")  # a session id that sorts after every other
    batches.add(last)
    writers = [asyncio.create_task(batches.serve(run)) for _ in range(2)]
    try:
        async with asyncio.timeout(WAIT_S):
            await last.future
    finally:
        for writer in writers:
            writer.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
    assert taken.index("zzz") == 20  # the 20 that came before it, then it


async def test_a_lone_writer_takes_every_call_waiting_in_one_batch() -> None:
    batches: Batches[Call] = Batches(256)
    taken: list[int] = []

    async def run(batch: list[Call]) -> None:
        taken.append(len(batch))
        for call in batch:
            call.future.set_result(None)

    calls = [Call(str(n)) for n in range(10)]
    for call in calls:
        batches.add(call)
    writer = asyncio.create_task(batches.serve(run))
    async with asyncio.timeout(WAIT_S):
        await asyncio.gather(*(c.future for c in calls))
    batches.close()
    await writer
    assert taken == [10]
