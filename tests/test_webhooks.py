"""Webhooks (README "Webhooks"): URL checks, and a real server process delivering signed events to a receiver that
fails the first two attempts of each, across a SIGKILL of the service in the middle of a delivery."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from standardwebhooks.webhooks import Webhook

from service.app import create_app
from service.config import ConfigError, load_config
from tests.pg import pg_database
from tests.server import ServerProcess
from tests.web import make_config

Client = TestClient[web.Request, web.Application]
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
WAIT_S = 60.0  # bound on any single wait (a hang guard, never a performance assertion)
POLL_S = 0.05


# --- URL checks -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/hook",
        "file:///etc/passwd",
        "example.com/hook",
        "http://",
        "http://127.0.0.1:9000/hook",
        "http://localhost/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://user:pw@example.com/hook",
    ],
)
def test_bad_server_webhook_url_stops_the_start(url: str) -> None:
    env = {"SERVICE_WEBHOOK_SECRET": SECRET}
    with pytest.raises(ConfigError):
        load_config({"webhook_url": url, "database": "memory://"}, env=env)


def test_server_webhook_url_needs_a_good_secret() -> None:
    with pytest.raises(ConfigError, match="SERVICE_WEBHOOK_SECRET"):
        load_config({"webhook_url": "https://example.com/hook"}, env={})
    with pytest.raises(ConfigError, match="SERVICE_WEBHOOK_SECRET"):
        load_config({}, env={"SERVICE_WEBHOOK_SECRET": "whsec_***"})
    ok = load_config({"webhook_url": "https://example.com/hook"}, env={"SERVICE_WEBHOOK_SECRET": SECRET})
    assert ok.webhook_url == "https://example.com/hook"
    allowed = {"webhook_url": "http://127.0.0.1:9/hook", "webhook_allow_private": "true"}
    assert load_config(allowed, env={"SERVICE_WEBHOOK_SECRET": SECRET}).webhook_allow_private


async def test_session_webhook_url_is_checked(aiohttp_client: Callable[..., Awaitable[Client]]) -> None:
    strict = await aiohttp_client(
        create_app(make_config("memory://", webhook_secret=SECRET), start_workers=False)
    )
    for url in ("ftp://example.com/x", "http://127.0.0.1:1/x", "http://10.0.0.1/x", "nope", 42):
        resp = await strict.post("/sessions", json={"webhook_url": url})
        assert resp.status == 400, url
        assert (await resp.json())["error"]["code"] == "bad_request"
    resp = await strict.post("/sessions", json={"webhook_url": "https://example.com/hook"})
    assert resp.status == 201

    off = await aiohttp_client(create_app(make_config("memory://"), start_workers=False))
    resp = await off.post("/sessions", json={"webhook_url": "https://example.com/hook"})
    assert resp.status == 400  # no secret: webhooks are off, say so rather than never sending

    loose = await aiohttp_client(
        create_app(
            make_config("memory://", webhook_secret=SECRET, webhook_allow_private=True), start_workers=False
        )
    )
    resp = await loose.post("/sessions", json={"webhook_url": "http://127.0.0.1:1/hook"})
    assert resp.status == 201


# --- delivery through a real server process ---------------------------------------------------------------
def spec_signature(secret: str, webhook_id: str, timestamp: str, body: bytes) -> str:
    """The Standard Webhooks signature, computed by hand (the receiver also checks with the library)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class Receiver:
    """Checks every signature, answers 503 to the first two attempts of each event, holds the third attempt of
    the first event until told (the test kills the service meanwhile), and takes everything else."""

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}
        self.accepted: dict[str, list[dict[str, Any]]] = {}
        self.bad: list[str] = []
        self.held: str | None = None
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self.changed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = dict(request.headers)
        try:
            payload = Webhook(SECRET).verify(body, headers)
        except Exception as exc:
            self.bad.append(repr(exc))
            return web.Response(status=400)
        wid = headers["webhook-id"]
        expected = spec_signature(SECRET, wid, headers["webhook-timestamp"], body)
        if expected not in headers["webhook-signature"].split(" "):
            self.bad.append("hand-made signature differs")
        self.attempts[wid] = self.attempts.get(wid, 0) + 1
        if self.attempts[wid] <= 2:
            return web.Response(status=503)
        if self.held is None:
            self.held = wid
            self.holding.set()
            await self.release.wait()  # the service is SIGKILLed while this attempt is in flight
            return web.Response(status=503)  # to a dead connection: never counted as taken
        self.accepted.setdefault(wid, []).append(payload)
        self.changed.set()
        return web.Response(status=204)

    async def wait_for(self, count: int) -> None:
        while len(self.accepted) < count:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), WAIT_S)


@contextmanager
def database(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield str(tmp_path / "service.db")
    else:
        with pg_database() as url:
            yield url


async def wait_log(
    http: aiohttp.ClientSession, base: str, check: Callable[[list[dict[str, Any]]], bool]
) -> None:
    """Poll the log (the service's own truth) until ``check`` holds; bounded by WAIT_S."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while True:
        async with http.get(f"{base}/sessions/w/messages?after=0&limit=1000") as resp:
            if resp.status == 200 and check((await resp.json())["messages"]):
                return
        assert asyncio.get_running_loop().time() < deadline, "the log never got there"
        await asyncio.sleep(POLL_S)


def event_of(entry: dict[str, Any]) -> str | None:
    kind = entry["type"]
    if kind == "UserInputRequestedEvent":
        return "awaiting_input"
    if kind in ("run_completed", "run_cancelled") or (kind == "run_failed" and not entry.get("retrying")):
        return str(kind)
    return None


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def test_each_event_exactly_once_across_a_sigkill_mid_delivery(backend: str, tmp_path: Path) -> None:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    hook = f"http://127.0.0.1:{port}/hook"
    server: ServerProcess | None = None
    try:
        with database(backend, tmp_path) as db:
            args = [
                "--database", db, "--lease-s", "10", "--heartbeat-s", "1", "--poll-interval-s", "0.2",
                "--max-attempts", "1", "--webhook-allow-private", "true", "--webhook-base-delay-s", "0.1",
                "--webhook-max-delay-s", "0.5", "--webhook-timeout-s", "8",
            ]  # fmt: skip
            if backend == "postgresql":
                args += ["--webhook-url", hook]  # the server default, resolved when the entry is written
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "SERVICE_WEBHOOK_SECRET": SECRET}
            env.pop("SERVICE_CONFIG", None)
            server = ServerProcess(args, env, tmp_path / "server.log")
            await asyncio.to_thread(server.start)
            async with aiohttp.ClientSession() as http:
                body: dict[str, Any] = {"session_id": "w"}
                if backend == "sqlite":
                    body["webhook_url"] = hook  # the session's own
                async with http.post(f"{server.url}/sessions", json=body) as resp:
                    assert resp.status == 201

                async def send(text: str) -> int:
                    msg = {"content": text, "client_msg_id": secrets.token_hex(8)}
                    async with http.post(f"{server.url}/sessions/w/messages", json=msg) as resp:
                        assert resp.status == 202
                        return int((await resp.json())["seq"])

                await send("hello")
                await asyncio.wait_for(receiver.holding.wait(), WAIT_S)
                await asyncio.to_thread(server.restart)  # SIGKILL while the third attempt is in flight
                receiver.release.set()
                await send("[[ask]]")
                await send("my answer")
                await receiver.wait_for(3)
                await send("[[fail]]")
                await receiver.wait_for(4)
                sleeper = await send("[[sleep:60]]")

                def sleeping(log: list[dict[str, Any]]) -> bool:
                    return any(e["type"] == "run_started" and e.get("input_seq") == sleeper for e in log)

                await wait_log(http, server.url, sleeping)
                async with http.post(f"{server.url}/sessions/w/cancel") as resp:
                    assert (await resp.json())["cancelled"] is True
                await receiver.wait_for(5)
                async with http.get(f"{server.url}/sessions/w/messages?after=0&limit=1000") as resp:
                    log = (await resp.json())["messages"]
                async with http.get(f"{server.url}/metrics") as resp:
                    metrics = await resp.text()

        assert receiver.bad == []
        # Each event exactly once, under one webhook-id whatever the retries and the restart.
        assert all(len(taken) == 1 for taken in receiver.accepted.values())
        got = sorted(
            ((p["last_seq"], p["type"], p["run_id"], p["input_seq"]) for (p,) in receiver.accepted.values()),
        )
        want = [
            (e["seq"], event_of(e), e["run_id"], e.get("input_seq") or e["metadata"].get("input_seq"))
            for e in log
            if event_of(e) is not None
        ]
        assert [w[1] for w in want] == [
            "run_completed", "awaiting_input", "run_completed", "run_failed", "run_cancelled",
        ]  # fmt: skip
        asked = next(w for w in want if w[1] == "awaiting_input")
        assert asked[3] is None  # the question entry does not carry it; the event does:
        want = [(s, t, r, i if i is not None else got[1][3]) for (s, t, r, i) in want]
        assert got == want
        assert got[1][3] == got[2][3]  # the question belongs to the run of "[[ask]]"
        assert all(n >= 3 for n in receiver.attempts.values())
        assert receiver.held is not None and receiver.attempts[receiver.held] == 4
        # The restarted process delivered all five; each of the four new ones failed twice first.
        assert 'service_webhook_deliveries_total{outcome="delivered"} 5.0' in metrics
        assert 'service_webhook_deliveries_total{outcome="failed"} 8.0' in metrics
    finally:
        receiver.release.set()
        if server is not None:
            await asyncio.to_thread(server.kill)
        await runner.cleanup()
