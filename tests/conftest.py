"""Shared fixtures. ``store`` is parametrised over every backend: the one contract suite runs on each."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from service.queue import Store, open_store
from tests.pg import pg_database

BACKENDS = ["memory", "sqlite", "postgresql"]


class FakeClock:
    """A clock tests move by hand, so leases and backoff are deterministic (no sleeping)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    backend = getattr(request, "param", "memory")
    if backend == "memory":
        yield "memory://"
    elif backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'service.db'}"
    else:
        with pg_database() as url:
            yield url


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    """An opened store of each backend, on the fake clock."""
    url = _url_for(request.param, tmp_path)
    if request.param == "postgresql":
        with pg_database() as pg_url:
            s = open_store(pg_url, clock=clock)
            await s.open()
            try:
                yield s
            finally:
                await s.close()
        return
    s = open_store(url, clock=clock)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def _url_for(backend: str, tmp_path: Path) -> str:
    return "memory://" if backend == "memory" else f"sqlite:///{tmp_path / 'service.db'}"
