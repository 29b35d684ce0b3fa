"""Shared fixtures. ``store`` is parametrised over every backend: the one contract suite runs on each."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from service.queue import Store, open_store
from tests.pg import pg_database

BACKENDS = ["memory", "sqlite", "postgresql"]
KINDS = ("unit", "integration", "browser")
# The URL the `store` fixture opened, so a test can reopen the same database (tests/test_store_contract.py).
STORE_URL = pytest.StashKey[str]()


class FakeClock:
    """A clock tests move by hand, so leases and backoff are deterministic (no sleeping)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)
        self._made = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def db_offset(self) -> float:
        """For PostgreSQL, which judges time by the database's clock (README "Deploying on PostgreSQL"): the
        seconds to add to that clock so it reads this one's time plus the real time elapsed since this clock
        was made. Steady between advances, so the database's clock never runs backwards."""
        return (self.now - self._made).total_seconds()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@contextmanager
def backend_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of ``backend`` for one test (PostgreSQL: skipped when none is reachable)."""
    if backend == "memory":
        yield "memory://"
    elif backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'service.db'}"
    else:
        with pg_database() as url:
            yield url


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with backend_url(getattr(request, "param", "memory"), tmp_path) as url:
        yield url


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    """An opened store of each backend, on the fake clock."""
    with backend_url(request.param, tmp_path) as url:
        request.node.stash[STORE_URL] = url
        s = open_store(url, clock=clock, db_clock_offset=clock.db_offset)
        await s.open()
        try:
            yield s
        finally:
            await s.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database of its own for the test (tests.pg), dropped afterwards."""
    with pg_database() as url:
        yield url


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database URL of each backend, for service-level tests (real clock)."""
    with backend_url(request.param, tmp_path) as url:
        yield url


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test gets exactly one kind (README "Tests"), decided here and only here: ``browser`` (real
    Chromium), ``integration`` (a real PostgreSQL server or real server subprocesses), else ``unit`` (in
    process, on memory or SQLite files). ``pytest -m unit`` runs the fast ones."""
    for item in items:
        marks = {mark.name for mark in item.iter_markers()}
        if "browser" in marks:
            kind = "browser"
        elif (
            marks & {"postgres", "slow"}
            or "postgresql" in item.name
            or "pg_url" in getattr(item, "fixturenames", ())
        ):
            kind = "integration"
        else:
            kind = "unit"
        item.add_marker(getattr(pytest.mark, kind))
