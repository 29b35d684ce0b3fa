"""Helpers for in-process service tests (pytest-aiohttp's TestClient over a real store)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from service import keys
from service.config import Config

FAST = {
    "retry_base_delay_s": 0.01,
    "retry_max_delay_s": 0.02,
    "poll_interval_s": 0.05,
    "grace_s": 2.0,
    "heartbeat_s": 0.2,
    "lease_s": 5.0,
}


def make_config(database: str, **overrides: Any) -> Config:
    return Config(**{"database": database, **FAST, **overrides}).validate()


async def run_until_idle(client: TestClient[Any, web.Application]) -> None:
    assert client.app is not None
    await client.app[keys.POOL].run_until_idle()


async def receive_until(ws: Any, predicate: Any, limit: int = 500) -> list[dict[str, Any]]:
    """Frames up to and including the first one matching predicate."""
    frames: list[dict[str, Any]] = []
    for _ in range(limit):
        frame = await ws.receive_json()
        frames.append(frame)
        if predicate(frame):
            return frames
    raise AssertionError(f"no matching frame in {limit}: {frames[-5:]}")


def durable(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Log entries only (an ack frame has a seq too, but is not an entry)."""
    return [f for f in frames if f.get("seq") is not None and "created_at" in f]
