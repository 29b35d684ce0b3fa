"""The OpenAPI 3 description of the HTTP API, served at /openapi.json (and checked by schemathesis in the tests)."""

from __future__ import annotations

import copy
from typing import Any

from aiohttp import web

from service import keys
from service.models import MultitaskStrategy
from service.parse import MAX_CLIENT_MSG_ID, MAX_INT
from service.respond import json_response

ID = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
INT = {"type": "integer", "minimum": 0, "maximum": MAX_INT}
STATUS = {"type": "string", "enum": ["idle", "queued", "running", "awaiting_input", "failed"]}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    names = {
        400: "bad request",
        401: "no or bad token",
        404: "no such session",
        409: "conflict",
        413: "too large",
        429: "queue full",
        503: "database unavailable",
    }
    return {str(c): _json(_ref("Error"), names[c]) for c in codes}


def _param(name: str, where: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required or where == "path", "schema": schema}


SESSION_PARAM = _param("session_id", "path", ID)
CLIENT_PARAM = _param("client_id", "path", ID)
COMMON = (400, 401, 404, 503)
STRATEGY = {"type": "string", "enum": [s.value for s in MultitaskStrategy]}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {
                        "type": "string",
                        "enum": [
                            "bad_request",
                            "unauthorized",
                            "not_found",
                            "conflict",
                            "too_large",
                            "queue_full",
                            "unavailable",
                            "internal",
                        ],
                    },
                    "message": {"type": "string"},
                },
            }
        },
    },
    "Session": {
        "type": "object",
        "required": [
            "session_id",
            "team",
            "title",
            "status",
            "last_seq",
            "created_at",
            "updated_at",
            "multitask_strategy",
            "webhook_url",
        ],
        "properties": {
            "session_id": ID,
            "team": {"type": "string"},
            "title": {"type": "string", "nullable": True},
            "status": STATUS,
            "last_seq": {"type": "integer", "minimum": 0},
            "created_at": {"type": "string"},
            "updated_at": {"type": "string"},
            "multitask_strategy": STRATEGY,
            "webhook_url": {"type": "string", "nullable": True},
        },
    },
    "Entry": {
        "type": "object",
        "required": [
            "seq",
            "session_id",
            "type",
            "source",
            "content",
            "created_at",
            "run_id",
            "client_msg_id",
            "metadata",
        ],
        "properties": {
            "seq": {"type": "integer", "minimum": 1},
            "session_id": ID,
            "type": {"type": "string"},
            "source": {"type": "string"},
            "content": {},
            "created_at": {"type": "string"},
            "run_id": {"type": "string", "nullable": True},
            "client_msg_id": {"type": "string", "nullable": True},
            "metadata": {"type": "object"},
        },
    },
    "Page": {
        "type": "object",
        "required": ["session_id", "messages", "last_seq", "has_more"],
        "properties": {
            "session_id": ID,
            "messages": {"type": "array", "items": _ref("Entry")},
            "last_seq": {"type": "integer"},
            "has_more": {"type": "boolean"},
        },
    },
    "Queued": {
        "type": "object",
        "required": ["seq", "client_msg_id", "status"],
        "properties": {
            "seq": {"type": "integer"},
            "client_msg_id": {"type": "string", "nullable": True},
            "status": {"type": "string", "enum": ["queued"]},
        },
    },
    "Cursor": {
        "type": "object",
        "required": ["seq"],
        "properties": {"seq": INT},
    },
}


def _op(
    summary: str, ok: str, ok_body: dict[str, Any] | None, errors: tuple[int, ...], **extra: Any
) -> dict[str, Any]:
    responses: dict[str, Any] = {ok: _json(ok_body, summary) if ok_body else {"description": summary}}
    responses.update(_errors(*errors))
    return {"summary": summary, "responses": responses, **extra}


def _body(schema: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


PATHS: dict[str, Any] = {
    "/sessions": {
        "post": _op(
            "Create a session",
            "201",
            _ref("Session"),
            (400, 401, 409, 413, 503),
            requestBody=_body(
                {
                    "type": "object",
                    "properties": {
                        "session_id": ID,
                        "team": {"type": "string"},
                        "title": {"type": "string", "maxLength": 200},
                        "multitask_strategy": STRATEGY,
                        "webhook_url": {"type": "string", "maxLength": 2048},
                    },
                }
            ),
        ),
        "get": _op(
            "The caller's sessions, newest activity first",
            "200",
            {
                "type": "object",
                "required": ["sessions"],
                "properties": {"sessions": {"type": "array", "items": _ref("Session")}},
            },
            (401, 503),
        ),
    },
    "/sessions/{session_id}": {
        "parameters": [SESSION_PARAM],
        "get": _op("One session", "200", _ref("Session"), COMMON),
        "delete": _op("Delete a session, its log, queue items and cursors", "204", None, COMMON),
    },
    "/sessions/{session_id}/messages": {
        "parameters": [SESSION_PARAM],
        "get": _op(
            "A page of log entries, oldest first",
            "200",
            _ref("Page"),
            COMMON,
            parameters=[
                _param("after", "query", INT),
                _param("before", "query", INT),
                _param("limit", "query", {**INT, "minimum": 1}),
            ],
        ),
        "post": _op(
            "Enqueue a user message (creates the session if absent)",
            "202",
            _ref("Queued"),
            (400, 401, 404, 409, 413, 429, 503),
            requestBody=_body(
                {
                    "type": "object",
                    "required": ["content"],
                    "properties": {
                        "content": {"type": "string", "minLength": 1, "pattern": "\\S"},
                        "client_msg_id": {"type": "string", "minLength": 1, "maxLength": MAX_CLIENT_MSG_ID},
                        "multitask_strategy": STRATEGY,
                    },
                }
            ),
        ),
    },
    "/sessions/{session_id}/cancel": {
        "parameters": [SESSION_PARAM],
        "post": _op(
            "Cancel the active run (or the pending retry of a failed or interrupted one), if any; with input_seq,"
            " only the run of that input",
            "202",
            {"type": "object", "properties": {"cancelled": {"type": "boolean"}}},
            (*COMMON, 413),
            requestBody=_body(
                {
                    "type": "object",
                    "properties": {"input_seq": {"type": "integer", "minimum": 0, "maximum": MAX_INT}},
                },
                required=False,
            ),
        ),
    },
    "/sessions/{session_id}/reset": {
        "parameters": [SESSION_PARAM],
        "post": _op(
            "Forget the agents' memory (team state); the log is kept. 409 while a run is in progress",
            "200",
            {
                "type": "object",
                "required": ["session_id", "reset", "seq"],
                "properties": {
                    "session_id": {"type": "string"},
                    "reset": {"type": "boolean"},
                    "seq": {"type": "integer"},
                },
            },
            (*COMMON, 409),
        ),
    },
    "/sessions/{session_id}/cursors/{client_id}": {
        "parameters": [SESSION_PARAM, CLIENT_PARAM],
        "get": _op("A client's cursor", "200", _ref("Cursor"), COMMON),
        "put": _op(
            "Move a client's cursor forward (never backwards)",
            "200",
            _ref("Cursor"),
            (*COMMON, 413),
            requestBody=_body(_ref("Cursor")),
        ),
    },
    "/healthz": {"get": _op("Liveness", "200", {"type": "object"}, ())},
    "/readyz": {"get": _op("Readiness: database reachable and migrated", "200", {"type": "object"}, (503,))},
}

SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "Durable chat backend for AutoGen teams",
        "version": "0.1.0",
        "description": "WebSocket /ws/chat/queue and SSE /sessions/{id}/events are described in the README.",
    },
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
    },
    "security": [{}, {"bearer": []}],
}


async def spec_handler(request: web.Request) -> web.Response:
    spec = copy.deepcopy(SPEC)
    create = spec["paths"]["/sessions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    create["properties"]["team"]["enum"] = request.app[keys.TEAMS].names()
    return json_response(spec)
