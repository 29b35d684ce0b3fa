"""Webhooks (README "Webhooks"): URL checks, Standard Webhooks signing, and the deliverer that drains the store's
durable outbox (the rows are written with their entries; ``Store.claim_webhooks`` and friends deliver them).

At least once: a row is deleted only after the receiver answered 2xx; a failed attempt is due again after an
exponential backoff (``RetryPolicy.delay_s``, as for runs) until ``webhook_max_attempts``, then kept as ``failed``; a process
that dies mid-delivery leaves a lease that expires (SQLite: released at the next start), so the event is sent
again, with the same ``webhook-id``. Receivers deduplicate by ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from service import keys
from service.errors import BadRequest, ServiceError
from service.models import WebhookEvent
from service.queue import rules
from service.queue.retry import RetryPolicy
from service.queue.store import Store

log = logging.getLogger("service.webhooks")
BATCH = 16  # outbox rows one claim takes (delivered concurrently)
MAX_URL = 2048


def check_url(url: str, allow_private: bool) -> str:
    """An http(s) URL with a host; a literal loopback, private, link-local or otherwise non-public address (or
    ``localhost``) only when ``allow_private``. BadRequest says why. Host names are checked again when they are
    resolved, at every delivery (``resolved_public``)."""
    rules.check_label(url, "webhook_url")
    if len(url) > MAX_URL:
        raise BadRequest(f"webhook_url is longer than {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise BadRequest(f"webhook_url is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise BadRequest("webhook_url must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise BadRequest("webhook_url must not carry credentials")
    if not allow_private and not _public_host(host):
        raise BadRequest(
            "webhook_url points to a loopback or private address (allow it with webhook_allow_private)"
        )
    return url


def _public_host(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return False
    try:
        return _public_ip(host)
    except ValueError:
        return True  # a name: checked when it is resolved


def _public_ip(text: str) -> bool:
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def resolved_public(url: str) -> bool:
    """Whether every address the URL's host resolves to is public (a literal address: itself)."""
    host = urlsplit(url).hostname or ""
    if not _public_host(host):
        return False
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True  # a public literal
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return all(_public_ip(str(info[4][0])) for info in infos)


def signer(secret: str) -> Webhook:
    """The Standard Webhooks signer for ``SERVICE_WEBHOOK_SECRET`` (``whsec_`` + base64). ValueError if bad."""
    try:
        return Webhook(secret)
    except Exception as exc:  # the library raises binascii.Error, EmptyWebhookSecretError, ...
        raise ValueError(
            "SERVICE_WEBHOOK_SECRET must be whsec_ followed by base64 (the secret's bytes)"
        ) from exc


def signed_headers(hook: Webhook, webhook_id: str, body: bytes, now: datetime) -> dict[str, str]:
    """The Standard Webhooks headers: ``webhook-signature`` = ``v1,`` + base64(HMAC-SHA256(secret,
    "{id}.{timestamp}.{body}")). The timestamp is this attempt's; the id is the event's, the same every time."""
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": hook.sign(webhook_id, now, body.decode()),
    }


class DeliveryMetrics(Protocol):
    def webhook_delivery(self, outcome: str) -> None: ...


class Deliverer:
    """Claims due outbox rows and POSTs them, signed. ``deliver_once`` is one round (tests may call it)."""

    def __init__(
        self,
        store: Store,
        secret: str,
        metrics: DeliveryMetrics,
        *,
        lease_s: float,
        poll_s: float,
        max_attempts: int,
        base_delay_s: float,
        max_delay_s: float,
        timeout_s: float,
        allow_private: bool,
    ) -> None:
        self.store = store
        self.hook = signer(secret)
        self.metrics = metrics
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.max_attempts = max_attempts
        self.backoff = RetryPolicy(max_attempts, base_delay_s, max_delay_s)
        self.timeout_s = timeout_s
        self.allow_private = allow_private
        self._http: aiohttp.ClientSession | None = None

    async def run(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        try:
            while True:
                try:
                    taken = await self.deliver_once()
                except ServiceError as exc:  # the database is away: try again after a poll
                    log.warning("webhook delivery paused: %s", exc.message)
                    taken = 0
                except Exception:
                    log.exception("webhook delivery failed")
                    taken = 0
                if taken == 0:
                    await asyncio.sleep(
                        self.poll_s
                    )  # nothing due: look again later (the outbox is the truth)
        finally:
            await self._http.close()

    async def deliver_once(self) -> int:
        events = await self.store.claim_webhooks(self.lease_s, BATCH)
        if events:
            await asyncio.gather(*(self._deliver(event) for event in events))
        return len(events)

    async def _deliver(self, event: WebhookEvent) -> None:
        outcome, why = await self._post(event)
        if outcome == "delivered":
            if await self.store.webhook_delivered(event):
                self.metrics.webhook_delivery("delivered")
            return
        give_up = outcome == "refused" or event.attempt >= self.max_attempts
        delay = None if give_up else self.backoff.delay_s(event.attempt)
        if not await self.store.webhook_failed(event, delay):
            return  # our lease ran out meanwhile: whoever holds it now decides
        label = "gave_up" if give_up else "failed"
        self.metrics.webhook_delivery(label)
        log.log(
            logging.WARNING if give_up else logging.INFO,
            "webhook %s to %s attempt %d %s: %s",
            event.webhook_id,
            event.url,
            event.attempt,
            "given up" if give_up else f"failed, again in {delay:.1f}s",
            why,
        )

    async def _post(self, event: WebhookEvent) -> tuple[str, str]:
        """("delivered" | "failed" | "refused", why)."""
        assert self._http is not None
        try:
            if not self.allow_private and not await resolved_public(event.url):
                return "refused", "the host resolves to a loopback or private address"
            body = orjson.dumps(event.payload())
            headers = signed_headers(self.hook, event.webhook_id, body, datetime.now(UTC))
            async with self._http.post(event.url, data=body, headers=headers, allow_redirects=False) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return "delivered", ""
                return "failed", f"HTTP {resp.status}"
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            return "failed", type(exc).__name__


async def deliverer_ctx(app: web.Application) -> AsyncIterator[None]:
    """Runs the deliverer while the app runs, when a secret is configured (no secret: no webhooks at all)."""
    config = app[keys.CONFIG]
    task = None
    if config.webhook_secret:
        deliverer = Deliverer(
            app[keys.STORE],
            config.webhook_secret,
            app[keys.METRICS],
            lease_s=config.lease_s,
            poll_s=config.poll_interval_s,
            max_attempts=config.webhook_max_attempts,
            base_delay_s=config.webhook_base_delay_s,
            max_delay_s=config.webhook_max_delay_s,
            timeout_s=config.webhook_timeout_s,
            allow_private=config.webhook_allow_private,
        )
        task = asyncio.get_running_loop().create_task(deliverer.run(), name="webhook-deliverer")
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
