"""HTTP handlers: parse, call the store, answer."""

from __future__ import annotations

from aiohttp import web

from service import actions, keys, parse
from service.auth import current_user
from service.errors import BadRequest, NotFound
from service.models import Session
from service.queue.store import Store
from service.respond import json_response


def _store(request: web.Request) -> Store:
    return request.app[keys.STORE]


async def owned_session(request: web.Request, session_id: str | None = None) -> Session:
    """The caller's session, or 404 (another owner's session is exactly as missing as an unknown one)."""
    sid = session_id or parse.session_id(request)
    session = await _store(request).get_session(current_user(request), sid)
    if session is None:
        raise NotFound(f"no session {sid}")
    return session


async def create_session(request: web.Request) -> web.Response:
    data = await parse.body(request)
    raw_id = data.get("session_id")
    sid = None if raw_id is None else parse.ident(raw_id if isinstance(raw_id, str) else None, "session_id")
    team = parse.optional_str(data, "team", 64) or "default"
    if team not in request.app[keys.TEAMS].names():
        raise BadRequest(f"unknown team {team!r}; configured: {', '.join(request.app[keys.TEAMS].names())}")
    title = parse.optional_str(data, "title", parse.MAX_TITLE)
    strategy = parse.multitask_strategy(data) or "enqueue"
    webhook_url = parse.webhook_url(data, request.app[keys.CONFIG])
    session = await _store(request).create_session(
        current_user(request), sid, team, title, multitask_strategy=strategy, webhook_url=webhook_url
    )
    return json_response(session.to_json(), status=201)


async def list_sessions(request: web.Request) -> web.Response:
    sessions = await _store(request).list_sessions(current_user(request))
    return json_response({"sessions": [s.to_json() for s in sessions]})


async def get_session(request: web.Request) -> web.Response:
    return json_response((await owned_session(request)).to_json())


async def delete_session(request: web.Request) -> web.Response:
    session = await owned_session(request)  # before anything else: another user's session is left untouched
    sid = session.session_id
    request.app[keys.POOL].cancel(sid)
    if not await _store(request).delete_session(current_user(request), sid):
        raise NotFound(f"no session {sid}")
    request.app[keys.HUB].close_session(sid)  # open streams of it end (their cursors mean nothing now)
    return web.Response(status=204)


async def read_messages(request: web.Request) -> web.Response:
    session = await owned_session(request)
    config = request.app[keys.CONFIG]
    after = parse.non_negative_int(request.query.get("after"), "after")
    before = parse.non_negative_int(request.query.get("before"), "before")
    if after is not None and before is not None:
        raise BadRequest("give after or before, not both")
    page = await _store(request).read_log(
        session.session_id, after=after, before=before, limit=parse.limit(request.query.get("limit"), config)
    )
    return json_response(page.to_json())


async def post_message(request: web.Request) -> web.Response:
    sid = parse.session_id(request)
    queued = await actions.submit(request.app, current_user(request), sid, await parse.body(request))
    return json_response(queued.to_json(), status=202)


async def cancel(request: web.Request) -> web.Response:
    session = await owned_session(request)
    data = await parse.body(request)
    input_seq = None if data.get("input_seq") is None else parse.seq(data["input_seq"], "input_seq")
    cancelled = await actions.cancel(request.app, current_user(request), session.session_id, input_seq)
    return json_response({"cancelled": cancelled}, status=202)


async def reset(request: web.Request) -> web.Response:
    """Forget the agents' memory (team state), keep the log: the way out of a state the team cannot load."""
    session = await owned_session(request)
    entry = await _store(request).reset_team_state(current_user(request), session.session_id)
    if entry is None:
        raise NotFound(f"no session {session.session_id}")
    request.app[keys.HUB].publish(session.session_id, [entry])
    return json_response({"session_id": session.session_id, "reset": True, "seq": entry.seq})


async def get_cursor(request: web.Request) -> web.Response:
    session = await owned_session(request)
    client_id = parse.ident(request.match_info.get("client_id"), "client_id")
    seq = await _store(request).get_cursor(session.session_id, client_id)
    return json_response({"seq": seq or 0})


async def put_cursor(request: web.Request) -> web.Response:
    session = await owned_session(request)
    client_id = parse.ident(request.match_info.get("client_id"), "client_id")
    data = await parse.body(request)
    raw = parse.seq(data.get("seq"))
    seq = await _store(request).set_cursor(session.session_id, client_id, raw)
    return json_response({"seq": seq})
