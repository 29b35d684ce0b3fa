"""Bounded disk on SQLite (README "Storage and durability"): a long reader (a backup, an analytics query) lets the
WAL grow past its bound while it holds an old snapshot; once it ends, the WAL goes back under the bound, both when
asked (``bound_wal``) and by the writer's own periodic check. Small sizes keep it fast: a 256 KiB bound, ~2 MB
written under the long reader."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import pytest

from service.models import NewEntry
from service.queue.sqlite import SqliteStore

LIMIT = 256 * 1024
FILLER = "x" * 2000


@pytest.fixture
async def filled(tmp_path: Path) -> AsyncIterator[tuple[SqliteStore, str]]:
    path = str(tmp_path / "wal.db")
    # wal_check_s: long here (the first test drives bound_wal itself); the second test opens its own store.
    store = SqliteStore(path, wal_limit_bytes=LIMIT, wal_check_s=3600.0)
    await store.open()
    try:
        yield store, path
    finally:
        await store.close()


async def _grow_under_reader(store: SqliteStore, path: str) -> sqlite3.Connection:
    """A reader holding an old snapshot, and ~2 MB written after it: the WAL grows past the bound."""
    await store.enqueue("u", "s1", "first", "m0")
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM entries").fetchone()[0] == 1  # the snapshot is taken now
    claim = await store.claim("w", 600.0)
    assert claim is not None
    for _ in range(20):
        await store.append(claim, [NewEntry("TextMessage", "assistant", FILLER) for _ in range(50)])
    await store.bound_wal()  # while the reader holds its snapshot nothing can be truncated
    assert store.wal_size() > 4 * LIMIT
    return reader


async def test_wal_goes_back_under_its_bound_after_a_long_reader(filled: tuple[SqliteStore, str]) -> None:
    store, path = filled
    reader = await _grow_under_reader(store, path)
    with closing(reader):
        assert reader.execute("SELECT count(*) FROM entries").fetchone()[0] == 1  # still its old snapshot
        reader.execute("COMMIT")
    assert await store.bound_wal() <= LIMIT
    page = await store.read_log("s1", after=0, limit=1000)  # nothing was lost on the way
    assert page.last_seq == 1002 and len(page.messages) == 1000 and page.has_more


async def test_the_writer_bounds_the_wal_by_itself(tmp_path: Path) -> None:
    path = str(tmp_path / "wal.db")
    store = SqliteStore(path, wal_limit_bytes=LIMIT, wal_check_s=0.05)
    await store.open()
    try:
        reader = await _grow_under_reader(store, path)
        with closing(reader):
            reader.execute("COMMIT")
        # No write from here on: the idle writer's own periodic check must do it.
        assert await store.next_wal_check() <= LIMIT
        assert (await store.read_log("s1", after=1000, limit=10)).last_seq == 1002
    finally:
        await store.close()


async def test_journal_size_limit_is_set(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "p.db"), wal_limit_bytes=LIMIT)
    await store.open()
    try:
        conn = store.engine.writer.conn
        assert conn is not None
        limit = await store.engine.writer.call(
            lambda: conn.execute("PRAGMA journal_size_limit").fetchone()[0]
        )
        assert limit == LIMIT
    finally:
        await store.close()
