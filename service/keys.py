"""Typed keys for what the application holds (aiohttp AppKeys), in one place."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from aiohttp import web

from service.config import Config
from service.hub import Hub
from service.metrics import Metrics
from service.queue.store import Store
from service.worker.pool import WorkerPool
from service.worker.teams import TeamRegistry

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
HUB = web.AppKey("hub", Hub)
POOL = web.AppKey("pool", WorkerPool)
TEAMS = web.AppKey("teams", TeamRegistry)
METRICS = web.AppKey("metrics", Metrics)
SOCKETS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("sockets")
# SSE handler tasks: a stream never ends by itself, so shutdown cancels them (else it waits out its timeout).
STREAMS: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("streams")
SHUTTING_DOWN = web.AppKey("shutting_down", asyncio.Event)
