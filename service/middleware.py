"""Every error leaves in one shape; authentication happens before any handler runs."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler
from opentelemetry.trace import SpanKind

from service import keys, tracing
from service.auth import OWNER_KEY, authenticate, is_public
from service.errors import ServiceError, error_body
from service.respond import json_response

log = logging.getLogger("service.http")

# aiohttp's own HTTP errors (no route, wrong method, body too large) mapped onto our codes.
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "bad_request",
    409: "conflict",
    413: "too_large",
    429: "queue_full",
    503: "unavailable",
}


def json_error(status: int, code: str, message: str) -> web.Response:
    return json_response(error_body(code, message), status=status)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ServiceError as exc:
        if exc.status >= 500:
            log.warning("%s %s: %s", request.method, request.path, exc.message)
        return json_error(exc.status, exc.code, exc.public_message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "bad_request" if exc.status < 500 else "internal")
        message = exc.reason if exc.status != 413 else "the request body is too large"
        response = json_error(exc.status, code, message)
        if "Allow" in exc.headers:  # 405: which methods would work
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        # The trace goes to our log only, never to the client.
        log.exception("%s %s failed", request.method, request.path)
        return json_error(500, "internal", "internal error")


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not is_public(request.path):
        request[OWNER_KEY] = authenticate(request.app[keys.CONFIG], request)
    return await handler(request)


@web.middleware
async def traced(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A span per request (README "Tracing"), continuing the client's ``traceparent`` when it sends one; only
    installed when tracing is on."""
    route = request.match_info.route.resource
    name = f"{request.method} {route.canonical if route is not None else request.path}"
    with tracing.tracer().start_as_current_span(
        name, context=tracing.context_of(request.headers), kind=SpanKind.SERVER
    ) as span:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        return response
