"""WebSocket ``/ws/chat/queue``: a session frame, replay after a cursor, then live; client frames in between."""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from service import actions, keys, parse
from service.auth import current_user
from service.errors import BadRequest, Conflict, NotFound, ServiceError, TooLarge
from service.models import Entry, Frames, Session
from service.stream import follow_pages

log = logging.getLogger("service.ws")
SESSION_DELETED = 4404  # close code: the session was deleted (do not reconnect to it)


class Connection:
    """One client socket: sends are serialised through one lock (replay/live and answers share the socket)."""

    def __init__(
        self, request: web.Request, ws: web.WebSocketResponse, session: Session, client_id: str | None
    ):
        self.app = request.app
        self.owner = current_user(request)
        self.ws = ws
        self.session = session
        self.client_id = client_id
        self._lock = asyncio.Lock()

    async def send(self, frame: dict[str, Any]) -> None:
        async with self._lock:
            # orjson's bytes are UTF-8 already: send them as a text frame without a decode/encode round trip.
            await self.ws.send_frame(orjson.dumps(frame), WSMsgType.TEXT)

    async def send_frames(self, page: Frames) -> None:
        """A replayed page: its pre-serialised frames back to back, under one hold of the lock."""
        send = self.ws.send_frame
        async with self._lock:
            for frame in page.frames:
                await send(frame, WSMsgType.TEXT)

    async def error(self, exc: ServiceError, client_msg_id: Any = None) -> None:
        if exc.status >= 500:
            log.warning("websocket of %s: %s", self.session.session_id, exc.message)
        frame: dict[str, Any] = {"type": "error", "code": exc.code, "message": exc.public_message}
        if isinstance(client_msg_id, str):
            frame["client_msg_id"] = client_msg_id  # so the client knows which pending message was refused
        await self.send(frame)

    async def pump(self, after: int) -> None:
        """Replay then live, until the socket closes. A store failure closes the socket (the client resumes)."""
        try:
            async for item in follow_pages(
                self.app[keys.STORE], self.app[keys.HUB], self.session.session_id, after, pages=True
            ):
                if isinstance(item, Frames):
                    await self.send_frames(item)
                else:
                    await self.send(item.to_json() if isinstance(item, Entry) else item)
            # follow_pages() ends only when the session was deleted.
            await self.ws.close(code=SESSION_DELETED, message=b"session deleted")
        except ServiceError as exc:
            log.warning("closing a websocket of %s: %s", self.session.session_id, exc.message)
            await self.ws.close(code=1011, message=exc.code.encode())
        except ConnectionError:
            pass  # the client went away
        except Exception:
            # Never leave a socket open that no longer streams: the client must see it end and resume.
            log.exception("the stream of a websocket of %s failed", self.session.session_id)
            await self.ws.close(code=1011, message=b"internal")

    async def handle(self, raw: str | bytes) -> None:
        config = self.app[keys.CONFIG]
        size = len(raw) if isinstance(raw, bytes) else len(raw.encode())
        if size > config.max_frame_bytes:
            raise TooLarge(f"frame larger than {config.max_frame_bytes} bytes")
        if isinstance(raw, bytes):
            raise BadRequest("binary frames are not supported; send JSON text frames")
        frame = parse.json_object(raw, "the frame")
        kind = frame.get("type")
        if kind == "TextMessage":
            try:
                await self.on_text(frame)
            except ServiceError as exc:
                await self.error(exc, frame.get("client_msg_id"))
        elif kind == "ack":
            await self.on_ack(frame)
        elif kind == "cancel":
            input_seq = None if frame.get("input_seq") is None else parse.seq(frame["input_seq"], "input_seq")
            cancelled = await actions.cancel(self.app, self.owner, self.session.session_id, input_seq)
            await self.send({"type": "cancelled", "cancelled": cancelled, "input_seq": input_seq})
        elif kind == "ping":
            await self.send({"type": "pong"})
        elif kind is None:
            raise BadRequest("the frame has no type: use TextMessage, ack, cancel or ping")
        else:
            raise BadRequest(f"unknown frame type {str(kind)[:40]!r}: use TextMessage, ack, cancel or ping")

    async def on_text(self, frame: dict[str, Any]) -> None:
        if frame.get("source", "user") != "user":
            raise BadRequest("source must be 'user'")
        queued = await actions.submit(self.app, self.owner, self.session.session_id, frame)
        await self.send({"type": "ack", "client_msg_id": queued.client_msg_id, "seq": queued.seq})

    async def on_ack(self, frame: dict[str, Any]) -> None:
        seq = parse.seq(frame.get("seq"))
        if self.client_id is not None:
            await self.app[keys.STORE].set_cursor(self.session.session_id, self.client_id, seq)


async def _open_session(request: web.Request) -> Session:
    """The session named by ?session_id= (created when absent), or a new one."""
    store = request.app[keys.STORE]
    owner = current_user(request)
    raw = request.query.get("session_id")
    if raw is None or raw == "":
        return await store.create_session(owner, None, "default", None)
    sid = parse.ident(raw, "session_id")
    session = await store.get_session(owner, sid)
    if session is not None:
        return session
    try:
        return await store.create_session(owner, sid, "default", None)
    except Conflict as exc:
        # Created meanwhile (a POST of the same client racing this connect): ours after all. Else it is someone
        # else's: exactly like a missing session we may not create.
        raced = await store.get_session(owner, sid)
        if raced is not None:
            return raced
        raise NotFound(f"no session {sid}") from exc


async def chat_queue(request: web.Request) -> web.StreamResponse:
    config = request.app[keys.CONFIG]
    client_raw = request.query.get("client_id")
    client_id = parse.ident(client_raw, "client_id") if client_raw else None
    after = parse.non_negative_int(request.query.get("after"), "after")
    # Everything that can be refused is refused before the upgrade, as a plain HTTP error.
    # aiohttp closes the socket on frames over max_msg_size; keep a hard cap well above our limit so an oversized
    # frame gets an error frame instead, while a giant one cannot exhaust memory.
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=config.max_frame_bytes * 4)
    if not ws.can_prepare(request).ok:  # a plain GET creates nothing
        raise BadRequest("this endpoint speaks WebSocket: send an Upgrade request")
    session = await _open_session(request)
    if after is None and client_id is not None:
        after = await request.app[keys.STORE].get_cursor(session.session_id, client_id)
    after = min(after or 0, session.last_seq)
    await ws.prepare(request)
    request.app[keys.SOCKETS].add(ws)
    metrics = request.app[keys.METRICS]
    metrics.ws_connections.inc()
    metrics.replay_entries.observe(session.last_seq - after)
    conn = Connection(request, ws, session, client_id)
    pump: asyncio.Task[None] | None = None
    try:
        await conn.send(
            {
                "type": "session",
                "session_id": session.session_id,
                "status": session.status.value,
                "last_seq": session.last_seq,
                "replay_from": after,
            }
        )
        pump = asyncio.create_task(conn.pump(after))
        await _receive(conn)
    finally:
        metrics.ws_connections.dec()
        if pump is not None:
            pump.cancel()
            with suppress(asyncio.CancelledError, ConnectionError):
                await pump
    return ws


async def _receive(conn: Connection) -> None:
    async for msg in conn.ws:
        if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            try:
                await conn.handle(msg.data)
            except ServiceError as exc:
                await conn.error(exc)
        elif msg.type == WSMsgType.ERROR:
            log.info("websocket closed with error: %s", conn.ws.exception())
