"""Turning untrusted input (query strings, bodies, frames) into checked values, or BadRequest/TooLarge."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
from aiohttp import web

from service import webhooks
from service.config import Config
from service.errors import BadRequest, TooLarge
from service.models import MultitaskStrategy
from service.text import repair_json

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # used with fullmatch: "$" would also accept a trailing newline
MAX_CLIENT_MSG_ID = 128
MAX_TITLE = 200
MAX_INT = 2**63 - 1  # what every backend's integer columns hold


def ident(value: str | None, what: str) -> str:
    if value is None or not _ID.fullmatch(value):
        raise BadRequest(f"{what} must be 1-64 characters of A-Z, a-z, 0-9, _ or -")
    return value


def session_id(request: web.Request) -> str:
    return ident(request.match_info.get("session_id"), "session_id")


def non_negative_int(raw: str | None, what: str, default: int | None = None) -> int | None:
    """Plain ASCII digits only (int() would also take "+5", " 1", "1_000" and other scripts' digits)."""
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()):
        raise BadRequest(f"{what} must be a non-negative integer, got {raw[:40]!r}")
    value = int(raw)
    if value > MAX_INT:
        raise BadRequest(f"{what} must be an integer from 0 to {MAX_INT}")
    return value


def limit(raw: str | None, config: Config) -> int:
    """1..max_page: larger is clamped (as is 0, to one entry); negative or non-numeric is BadRequest."""
    if raw is not None and raw.isascii() and raw.isdigit() and len(raw) > 18:
        return config.max_page  # beyond any page size: clamp without parsing a huge number
    value = non_negative_int(raw, "limit", 100)
    assert value is not None
    return max(1, min(value, config.max_page))


def json_object(raw: bytes | str, what: str = "the body") -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        data = _with_lone_surrogates(raw)
        if data is None:
            raise BadRequest(f"{what} is not valid JSON") from exc
    if not isinstance(data, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return data


def _with_lone_surrogates(raw: bytes | str) -> Any:
    """JSON that orjson refuses only for a lone surrogate escape ("\\ud83d", what a browser's JSON.stringify
    writes for broken text): parsed by the standard library and repaired (U+FFFD), so the message is taken
    instead of being refused on every resend. None when it is not valid JSON for another reason."""
    try:
        text = raw.decode("utf-8", "strict") if isinstance(raw, bytes) else raw
        if "\\u" not in text:
            return None
        return repair_json(json.loads(text, parse_constant=_no_constant))
    except ValueError:  # JSONDecodeError, a bad constant, or bytes that are not UTF-8
        return None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise
    except web.RequestPayloadError as exc:  # a broken chunked or compressed body: the client's fault
        raise BadRequest("the body could not be read: a broken chunked or compressed encoding") from exc
    return json_object(raw)


def optional_str(data: dict[str, Any], key: str, max_len: int) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a string")
    if len(value) > max_len:
        raise TooLarge(f"{key} is longer than {max_len} characters")
    return value


def content(data: dict[str, Any], config: Config) -> str:
    value = data.get("content")
    if not isinstance(value, str):
        raise BadRequest("content must be a string" if "content" in data else "content is required")
    if not value.strip():
        raise BadRequest("content must not be empty")
    if len(value) > config.max_message_chars:
        raise TooLarge(f"content is longer than {config.max_message_chars} characters")
    return value


def client_msg_id(data: dict[str, Any]) -> str | None:
    value = optional_str(data, "client_msg_id", MAX_CLIENT_MSG_ID)
    if value == "":
        raise BadRequest("client_msg_id must not be empty")
    return value


def webhook_url(data: dict[str, Any], config: Config) -> str | None:
    """``webhook_url`` of a ``POST /sessions`` body (README "Webhooks"), checked, or None when absent."""
    value = data.get("webhook_url")
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest("webhook_url must be a string")
    if not config.webhook_secret:
        raise BadRequest("webhooks are off on this server (no SERVICE_WEBHOOK_SECRET)")
    return webhooks.check_url(value, config.webhook_allow_private)


def multitask_strategy(data: dict[str, Any]) -> str | None:
    """``multitask_strategy`` of a body or frame (README "Double-texting"), or None when absent."""
    value = data.get("multitask_strategy")
    if value is None:
        return None
    choices = [s.value for s in MultitaskStrategy]
    if value not in choices:
        raise BadRequest(f"multitask_strategy must be one of {', '.join(choices)}")
    return str(value)


def seq(value: Any, name: str = "seq") -> int:
    """A seq from a JSON body or frame; ``name`` is the field's, for the error."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT:
        raise BadRequest(f"{name} must be an integer from 0 to {MAX_INT}")
    return value
