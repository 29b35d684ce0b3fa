"""Who is asking: ``none`` (loopback only, everyone is user ``local``) or ``jwt`` (HS256, owner = claim ``sub``)."""

from __future__ import annotations

import jwt
from aiohttp import web

from service.config import Config
from service.errors import Unauthorized

LOCAL_USER = "local"
OWNER_KEY = web.RequestKey("owner", str)
# Paths anyone may fetch: probes, metrics, the page and its files, the API description.
PUBLIC_PREFIXES = ("/healthz", "/readyz", "/metrics", "/static/", "/openapi.json")


def is_public(path: str) -> bool:
    return path == "/" or path.startswith(PUBLIC_PREFIXES)


def token_of(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    # Browsers cannot set headers on WebSocket or EventSource requests.
    return request.query.get("token") or None


def authenticate(config: Config, request: web.Request) -> str:
    """The owner of this request, or Unauthorized."""
    if config.auth == "none":
        return LOCAL_USER
    token = token_of(request)
    if token is None:
        raise Unauthorized("a token is required: Authorization: Bearer <token>, or ?token=<token>")
    assert config.jwt_secret is not None  # Config.validate guarantees it in jwt mode
    try:
        claims = jwt.decode(
            token, config.jwt_secret, algorithms=["HS256"], options={"require": ["sub", "exp"]}
        )
    except jwt.ExpiredSignatureError as exc:
        raise Unauthorized("the token has expired") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise Unauthorized(f"the token has no {exc.claim!r} claim") from exc
    except jwt.InvalidTokenError as exc:
        raise Unauthorized("the token is invalid") from exc
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise Unauthorized("the token's sub claim must be a non-empty string")
    return sub


def current_user(request: web.Request) -> str:
    return request[OWNER_KEY]
