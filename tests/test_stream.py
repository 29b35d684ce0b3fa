"""follow(): replay then live with no gap and no duplicate, whatever the hub does (overflow, gaps, reordering)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.hub import Hub, Item
from service.models import Entry, NewEntry, ephemeral
from service.queue import Store, open_store
from service.stream import follow

SESSION = "s1"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'stream.db'}")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def _collect(stream: AsyncIterator[Item], durable_count: int, out: list[Item]) -> None:
    seen = 0
    async for item in stream:
        out.append(item)
        if isinstance(item, Entry):
            seen += 1
            if seen == durable_count:
                return


async def _write(store: Store, count: int) -> list[Entry]:
    """Entries committed by a run of the session (the hub is not told: tests publish as they like)."""
    claim = await store.claim("w", 60)
    assert claim is not None
    written = [] if claim.started is None else [claim.started]
    for i in range(count):
        written += await store.append(claim, [NewEntry("TextMessage", "assistant", f"part {i}")])
    return written


async def test_overflow_gaps_and_reordering_never_show(store: Store) -> None:
    await store.enqueue("local", SESSION, "hello", None)  # seq 1, before anyone follows
    hub = Hub(buffer_size=2)  # tiny: the subscriber overflows and must fall back to the store
    out: list[Item] = []
    reader = asyncio.create_task(_collect(follow(store, hub, SESSION, 0), 52, out))
    written = await _write(store, 50)  # seq 2 (run_started) .. 52
    # Publish badly: out of order, some twice, some never, with ephemeral frames between.
    mixed: list[Entry] = written[::-1] + written[10:20] + written[30:]
    for entry in mixed:
        hub.publish(SESSION, [entry])
        hub.publish_ephemeral(SESSION, ephemeral(SESSION, {"type": "ModelClientStreamingChunkEvent"}))
        await asyncio.sleep(0)  # let the reader run between publishes (interleaving, not synchronisation)
    await asyncio.wait_for(reader, 10)
    seqs = [i.seq for i in out if isinstance(i, Entry)]
    assert seqs == list(range(1, 53))


async def test_live_after_replay_and_ephemeral_frames_pass_through(store: Store) -> None:
    hub = Hub(buffer_size=100)
    await store.enqueue("local", SESSION, "hello", None)
    out: list[Item] = []
    reader = asyncio.create_task(_collect(follow(store, hub, SESSION, 0), 4, out))
    claim = await store.claim("w", 60)
    assert claim is not None and claim.started is not None
    hub.publish(SESSION, [claim.started])
    hub.publish_ephemeral(
        SESSION, ephemeral(SESSION, {"type": "ModelClientStreamingChunkEvent", "content": "x"})
    )
    for entry in await store.append(
        claim, [NewEntry("TextMessage", "assistant", "x"), NewEntry("T", "a", "y")]
    ):
        hub.publish(SESSION, [entry])
    await asyncio.wait_for(reader, 10)
    assert [i.seq if isinstance(i, Entry) else None for i in out] == [1, 2, None, 3, 4]


async def test_ephemeral_frames_are_never_replayed(store: Store) -> None:
    hub = Hub()
    await store.enqueue("local", SESSION, "hello", None)
    hub.publish_ephemeral(
        SESSION, ephemeral(SESSION, {"type": "ModelClientStreamingChunkEvent"})
    )  # nobody yet
    await _write(store, 2)
    out: list[Item] = []
    await asyncio.wait_for(_collect(follow(store, hub, SESSION, 0), 4, out), 10)
    assert all(isinstance(i, Entry) for i in out)


async def test_a_deleted_session_ends_its_readers(store: Store) -> None:
    hub = Hub()
    await store.enqueue("local", SESSION, "hello", None)
    stream = follow(store, hub, SESSION, 0)
    first = await anext(stream)  # replayed: the reader is subscribed now
    assert isinstance(first, Entry) and first.seq == 1
    assert await store.delete_session("local", SESSION)
    hub.close_session(SESSION)
    rest = await asyncio.wait_for(_drain(stream), 10)  # the stream ends by itself
    assert rest == []


async def _drain(stream: AsyncIterator[Item]) -> list[Item]:
    return [item async for item in stream]
