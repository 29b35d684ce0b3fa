"""A Python client for the chat service (README "A quick tour"): send, follow, history, cancel, answer.

Importing this module starts nothing and imports nothing of the server: it needs only aiohttp and orjson.

* :class:`ChatClient` is the asyncio client (an async context manager). ``send`` retries until the message is
  acknowledged (the ``client_msg_id`` makes retries safe: the server answers a repeated id with the first seq and
  enqueues nothing). ``follow`` is an async iterator over the session's log entries and streamed text that
  reconnects forever with its cursor: no gap, no duplicate, across server restarts.
* :class:`SyncChatClient` wraps it for scripts, running an event loop internally.

Errors: the server's canonical error shape ``{"error": {"code", "message"}}`` becomes :class:`ChatError` (with
``code`` and ``status``); a server that cannot be reached on a single-attempt call is :class:`ChatConnectionError`;
a ``send`` that is not acknowledged within its ``timeout`` is :class:`SendTimeout`. All three are
:class:`ChatClientError`.

What ``follow`` yields (:data:`Event`):

* a **log entry**: the ``dict`` of the README's "Log entries" (``seq`` an int), each seq exactly once, in order;
* a :class:`Chunk` of streamed text of a message still being written (README "Streaming"). The client keeps, per
  message (``Chunk.message_id``, the ``metadata.id`` of the durable entry that follows), how much text it has
  yielded, and trims what a reconnect sends again (the server's ``resumed`` frame repeats the text so far): every
  chunk's ``offset`` is exactly the length of the text yielded before it for that message, so concatenating the
  ``content`` of a message's chunks never shows text twice. The durable entry with ``metadata.id ==
  message_id`` replaces the streamed text (after a crash it is a partial entry, ``metadata.partial``, which may be
  a little shorter than what was streamed); no chunk of that message follows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self, TypeAlias, TypedDict, TypeVar, cast
from urllib.parse import quote

import aiohttp
import orjson

from service.text import repair_json

__all__ = [
    "ChatClient",
    "ChatClientError",
    "ChatConnectionError",
    "ChatError",
    "Chunk",
    "Entry",
    "Event",
    "Follower",
    "Page",
    "SendTimeout",
    "SessionInfo",
    "SyncChatClient",
    "is_terminal",
]

log = logging.getLogger("service.client")

SESSION_DELETED: Final = 4404  # WebSocket close code: the session was deleted (never reconnect to it)
CHUNK_TYPE: Final = "ModelClientStreamingChunkEvent"
# Statuses a send retries (the server or a proxy in front of it is restarting or overloaded for a moment).
RETRY_STATUSES: Final = frozenset({502, 503, 504})
_STATUS_CODES: Final = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    409: "conflict",
    413: "too_large",
    429: "queue_full",
    502: "unavailable",
    503: "unavailable",
    504: "unavailable",
}
_ACK_EVERY: Final = 100  # while entries keep coming, ack at least every this many (else once caught up)
_READ_AHEAD: Final = 256  # frames read ahead of the consumer (then the socket applies backpressure)
_CLIENT_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")

Entry: TypeAlias = dict[str, Any]
"""A log entry as the README's "Log entries" shows it (``seq``, ``type``, ``source``, ``content``, ...)."""


class SessionInfo(TypedDict):
    """A session object (README "The protocol")."""

    session_id: str
    team: str
    title: str | None
    status: str
    last_seq: int
    created_at: str
    updated_at: str


class Page(TypedDict):
    """A page of the log: ``messages`` oldest first; ``has_more`` when the log goes on past the page."""

    session_id: str
    messages: list[Entry]
    last_seq: int
    has_more: bool


@dataclass(frozen=True, slots=True)
class Chunk:
    """Streamed text of a message still being written (README "Streaming"), as ``follow`` yields it.

    ``offset`` is the number of characters (code points) of the message yielded before this chunk, so
    ``text[message_id] += chunk.content`` builds the message without a piece twice. ``resumed`` is true for the
    chunk that catches a (re)connected reader up with the text so far. ``frame`` is the server's frame as sent
    (its ``content``/``offset`` may start before this chunk's when the client trimmed text it had yielded)."""

    session_id: str
    message_id: str
    offset: int
    content: str
    source: str
    run_id: str | None
    resumed: bool
    frame: dict[str, Any]


Event: TypeAlias = Entry | Chunk
"""What ``follow`` yields: a durable log entry (a ``dict``) or a :class:`Chunk` of streamed text."""


def is_terminal(entry: Entry, input_seq: int | None = None) -> bool:
    """True when ``entry`` ends a run: ``run_completed``, ``run_cancelled`` or a final ``run_failed``
    (``retrying: false``); with ``input_seq``, only the run of that user message."""
    kind = entry.get("type")
    final = kind in ("run_completed", "run_cancelled") or (
        kind == "run_failed" and entry.get("retrying") is False
    )
    return final and (input_seq is None or entry.get("input_seq") == input_seq)


class ChatClientError(Exception):
    """Base of every error this client raises."""


class ChatError(ChatClientError):
    """The server refused a request with its canonical error ``{"error": {"code", "message"}}``.

    ``code`` is one of ``bad_request``, ``unauthorized``, ``not_found``, ``conflict``, ``too_large``,
    ``queue_full``, ``unavailable``, ``internal`` (README "HTTP"); ``status`` is the HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class ChatConnectionError(ChatClientError):
    """The server could not be reached, or the connection broke before an answer (single-attempt calls)."""


class SendTimeout(ChatClientError, TimeoutError):
    """``send`` was not acknowledged within its ``timeout``. The message may still have been committed: send it
    again with the same ``client_msg_id`` and the server answers its seq without enqueueing it twice."""

    def __init__(
        self, session_id: str, client_msg_id: str, timeout: float, last_error: BaseException | None
    ) -> None:
        super().__init__(
            f"message {client_msg_id} to session {session_id} not acknowledged within {timeout} s"
            + (f" (last error: {last_error})" if last_error is not None else "")
        )
        self.session_id = session_id
        self.client_msg_id = client_msg_id
        self.timeout = timeout
        self.last_error = last_error


def _error_from(status: int, body: bytes) -> ChatError:
    """The canonical error of a response body, or one made from the status (a proxy's HTML page, say)."""
    code, message = _STATUS_CODES.get(status, "internal"), body[:200].decode("utf-8", "replace")
    with contextlib.suppress(orjson.JSONDecodeError):
        data = orjson.loads(body)
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            code = str(error.get("code", code))
            message = str(error.get("message", message))
    return ChatError(status, code, message)


def _path(session_id: str, *rest: str) -> str:
    return "/".join(("/sessions", quote(session_id, safe=""), *rest))


class ChatClient:
    """An asyncio client for one chat service.

    ``base_url`` is the service's root (``http://127.0.0.1:8080``); ``token`` a JWT sent as ``Authorization:
    Bearer`` (jwt mode); ``client_id`` names this device for the server-side cursor that ``follow`` keeps
    (``[A-Za-z0-9_-]{1,64}``; a random one when absent: pass a stable one to resume where a previous process left
    off). Use it as ``async with ChatClient(...) as client:`` or call :meth:`aclose` when done.

    Raises ``ValueError`` for a ``client_id`` the server would refuse."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        client_id: str | None = None,
        *,
        request_timeout_s: float = 30.0,
        max_backoff_s: float = 2.0,
        heartbeat_s: float = 20.0,
    ) -> None:
        if client_id is not None and not _CLIENT_ID.fullmatch(client_id):
            raise ValueError("client_id must be 1 to 64 of A-Z, a-z, 0-9, '_' and '-'")
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id or f"py-{uuid.uuid4().hex[:16]}"
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._max_backoff_s = max_backoff_s
        self._heartbeat_s = heartbeat_s
        self._http_session: aiohttp.ClientSession | None = None
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connections; followers of this client end. Raises nothing."""
        self._closed = True
        if self._http_session is not None:
            await self._http_session.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _http(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("this ChatClient is closed")
        if self._http_session is None:  # created lazily: it binds to the running event loop
            self._http_session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self._http_session

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: ~0.05 s, 0.1 s, 0.2 s, ... up to ``max_backoff_s``."""
        return min(self._max_backoff_s, 0.05 * 2.0 ** min(attempt - 1, 16)) * random.uniform(0.5, 1.0)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        ok: int = 200,
    ) -> Any:
        """One HTTP request: the decoded JSON body of an ``ok`` answer (None when empty); ChatError for an
        error answer, ChatConnectionError when there is no answer."""
        headers = {"Content-Type": "application/json"} if body is not None else None
        # Text with a lone UTF-16 surrogate (broken input) is sent repaired (U+FFFD), as the server would store it.
        data = orjson.dumps(repair_json(body)) if body is not None else None
        try:
            async with self._http().request(
                method, self.base_url + path, data=data, params=params, headers=headers
            ) as response:
                raw = await response.read()
                if response.status != ok:
                    raise _error_from(response.status, raw)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise ChatConnectionError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        if not raw:
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ChatError(response.status, "internal", "the server's answer is not JSON") from exc

    # --- sending ---------------------------------------------------------------------------------------------
    async def send(
        self,
        session_id: str,
        text: str,
        *,
        client_msg_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (it bounds every retry; SendTimeout names the message)
    ) -> int:
        """Enqueue ``text`` as a user message of ``session_id`` (created when absent) and return its seq once the
        server acknowledged it (202: it is durable and will be processed).

        A ``client_msg_id`` is generated when absent. Connection errors, 502/503/504 and server restarts are
        retried with backoff until acknowledged; a retry never enqueues the message twice (the server answers a
        repeated ``client_msg_id`` with the first seq). ``timeout`` (seconds, None: no limit) bounds all attempts.

        Raises :class:`SendTimeout` when ``timeout`` passes first; :class:`ChatError` for a refusal that retrying
        cannot fix (``bad_request``, ``unauthorized``, ``not_found``, ``too_large``, ``queue_full`` (429: the
        session has too many queued messages), ...)."""
        message_id = client_msg_id or f"py-{uuid.uuid4().hex}"
        body = {"content": text, "client_msg_id": message_id}
        last_error: list[BaseException] = []
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                return await self._send_until_acked(session_id, body, last_error)
        except TimeoutError as exc:
            if deadline.expired() and timeout is not None:
                raise SendTimeout(
                    session_id, message_id, timeout, last_error[-1] if last_error else None
                ) from exc
            raise

    async def _send_until_acked(
        self, session_id: str, body: Mapping[str, Any], errors: list[BaseException]
    ) -> int:
        attempt = 0
        while True:
            try:
                ack = await self._request("POST", _path(session_id, "messages"), body=body, ok=202)
                return int(ack["seq"])
            except ChatError as exc:
                if exc.status not in RETRY_STATUSES:
                    raise
                errors[:] = [exc]
            except ChatConnectionError as exc:
                errors[:] = [exc]
            attempt += 1
            delay = self._backoff(attempt)
            log.info(
                "send of %s to %s not acknowledged (%s); retrying in %.2f s",
                body["client_msg_id"],
                session_id,
                errors[-1],
                delay,
            )
            await asyncio.sleep(delay)

    async def answer(
        self,
        session_id: str,
        text: str,
        *,
        client_msg_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (as send)
    ) -> int:
        """Answer the question the team asked (a ``UserInputRequestedEvent``; session status
        ``awaiting_input``). It is just :meth:`send`: while a team waits for human input, the session's next
        message is the answer (README "Guarantees"); it gets no run of its own, and the run that asked goes on
        to its terminal entry. Returns the answer's seq; raises what :meth:`send` raises."""
        return await self.send(session_id, text, client_msg_id=client_msg_id, timeout=timeout)

    # --- sessions and the log --------------------------------------------------------------------------------
    async def create_session(
        self, session_id: str | None = None, *, team: str | None = None, title: str | None = None
    ) -> SessionInfo:
        """Create a session (id generated by the server when absent; ``team`` defaults to ``default``).

        Raises :class:`ChatError` ``conflict`` (409) when the id is taken, ``bad_request`` (400) for an unknown
        team or a bad id; :class:`ChatConnectionError` when the server cannot be reached."""
        body = {
            k: v for k, v in (("session_id", session_id), ("team", team), ("title", title)) if v is not None
        }
        return cast(SessionInfo, await self._request("POST", "/sessions", body=body, ok=201))

    async def get_session(self, session_id: str) -> SessionInfo:
        """One session. Raises :class:`ChatError` ``not_found`` (404) for a missing (or another user's)
        session; :class:`ChatConnectionError` when the server cannot be reached."""
        return cast(SessionInfo, await self._request("GET", _path(session_id)))

    async def list_sessions(self) -> list[SessionInfo]:
        """Your sessions, newest activity first. Raises :class:`ChatError`, :class:`ChatConnectionError`."""
        data = await self._request("GET", "/sessions")
        return cast(list[SessionInfo], data["sessions"])

    async def delete_session(self, session_id: str) -> None:
        """Delete a session with its log (followers of it end). Raises :class:`ChatError` ``not_found`` (404);
        :class:`ChatConnectionError` when the server cannot be reached."""
        await self._request("DELETE", _path(session_id), ok=204)

    async def history(
        self,
        session_id: str,
        *,
        after: int | None = None,
        before: int | None = None,
        limit: int | None = None,
    ) -> Page:
        """A page of the log, oldest first: the entries with seq > ``after`` (default 0), or with ``before`` the
        ``limit`` entries just below seq ``before`` (load a chat from its end). ``limit`` defaults to 100 on the
        server and is clamped to its ``max_page``.

        Raises ``ValueError`` when both ``after`` and ``before`` are given; :class:`ChatError` ``not_found``
        (404) for a missing session, ``bad_request`` (400) for a negative value; :class:`ChatConnectionError`
        when the server cannot be reached."""
        if after is not None and before is not None:
            raise ValueError("give after or before, not both")
        params = {
            k: str(v) for k, v in (("after", after), ("before", before), ("limit", limit)) if v is not None
        }
        return cast(Page, await self._request("GET", _path(session_id, "messages"), params=params))

    async def cancel(self, session_id: str) -> bool:
        """Cancel the session's active run (or the pending retry of a failed one); True when there was one to
        cancel (it ends with ``run_cancelled``). Raises :class:`ChatError` ``not_found`` (404);
        :class:`ChatConnectionError` when the server cannot be reached."""
        data = await self._request("POST", _path(session_id, "cancel"), ok=202)
        return bool(data["cancelled"])

    async def reset(self, session_id: str) -> int:
        """Forget the agents' memory (the saved team state); the log is kept and gets a ``team_reset`` entry,
        whose seq is returned. Raises :class:`ChatError` ``conflict`` (409) while a run is in progress,
        ``not_found`` (404); :class:`ChatConnectionError` when the server cannot be reached."""
        data = await self._request("POST", _path(session_id, "reset"))
        return int(data["seq"])

    async def get_cursor(self, session_id: str) -> int:
        """The server's cursor of this client's ``client_id`` in the session (0 when none): what ``follow``
        acknowledged. Raises :class:`ChatError`, :class:`ChatConnectionError`."""
        data = await self._request("GET", _path(session_id, "cursors", self.client_id))
        return int(data["seq"])

    # --- following -------------------------------------------------------------------------------------------
    def follow(self, session_id: str, after: int | None = None) -> Follower:
        """Follow the session: its durable entries with seq > ``after`` in order (replay, then live), with
        :class:`Chunk` s of streamed text in between (see the module docstring). ``after=None`` resumes from the
        server's cursor of this ``client_id`` (the whole log when it has none). The session is created when
        absent (the WebSocket endpoint does that).

        Reconnects forever with its cursor (backoff up to ``max_backoff_s``) when the connection or the server
        goes away: no entry twice, none missing. It acknowledges the entries it has yielded (once the consumer
        asks for more), so the server keeps this client's cursor. It ends when the session is deleted (close
        code 4404; also a session found deleted on reconnect) or the client is closed.

        Iterating raises :class:`ChatError` when the server refuses the connection outright (``unauthorized``,
        ``not_found`` for another user's session, ``bad_request``); never for connection losses.
        Use ``async with client.follow(sid) as events: async for event in events: ...`` (or plain ``async for``
        and ``aclose()``) so the socket closes when you stop early."""
        return Follower(self, session_id, after)


class _StreamedText:
    """How much of each streamed message was yielded, so resumed and repeated text is trimmed away."""

    def __init__(self) -> None:
        self._have: OrderedDict[str, int] = OrderedDict()
        self._done: deque[str] = deque(maxlen=64)  # ids of messages already durable: their chunks are stale

    def committed(self, entry: Entry) -> None:
        metadata = entry.get("metadata")
        message_id = metadata.get("id") if isinstance(metadata, dict) else None
        if isinstance(message_id, str):
            self._have.pop(message_id, None)
            self._done.append(message_id)

    def trim(self, frame: dict[str, Any]) -> Chunk | None:
        """The chunk to yield for a frame, trimmed of text already yielded; None when nothing of it is new."""
        message_id, offset, content = frame.get("full_message_id"), frame.get("offset"), frame.get("content")
        if not (isinstance(message_id, str) and isinstance(offset, int) and isinstance(content, str)):
            return None
        if message_id in self._done:
            return None
        have = self._have.get(message_id, 0)
        end = offset + len(content)
        if end <= have:
            return None
        if offset < have:
            content, offset = content[have - offset :], have
        self._have[message_id] = end
        self._have.move_to_end(message_id)
        while len(self._have) > 16:
            self._have.popitem(last=False)
        run_id = frame.get("run_id")
        return Chunk(
            session_id=str(frame.get("session_id", "")),
            message_id=message_id,
            offset=offset,
            content=content,
            source=str(frame.get("source", "")),
            run_id=run_id if isinstance(run_id, str) else None,
            resumed=frame.get("resumed") is True,
            frame=frame,
        )


class _Reconnect(Exception):
    """The connection ended (or showed a gap): connect again after the cursor."""


class _SessionReplaced(_Reconnect):
    """Seen on reconnect: the session's log is shorter than our cursor (it was deleted meanwhile)."""


class Follower:
    """The async iterator ``ChatClient.follow`` returns (also an async context manager that closes it).

    ``cursor`` is the seq of the last durable entry yielded (None before the first connection when following
    from the server's stored cursor): persist it to resume later with ``follow(session_id, after=cursor)``."""

    def __init__(self, client: ChatClient, session_id: str, after: int | None) -> None:
        if after is not None and after < 0:
            raise ValueError("after must be >= 0")
        self.session_id = session_id
        self.cursor: int | None = after
        self._client = client
        self._text = _StreamedText()
        self._acked = 0
        self._connected_once = False
        self._gen = self._run()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        """Stop following and close the socket (the last yielded entry is acknowledged first, when possible)."""
        await self._gen.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _url(self) -> str:
        return self._client.base_url + "/ws/chat/queue"

    async def _session_gone(self) -> bool:
        """Before a reconnect: was the session deleted while we were away? (Connecting would create it anew.)"""
        try:
            await self._client.get_session(self.session_id)
        except ChatError as exc:
            if exc.code == "not_found":
                return True
            if exc.status in RETRY_STATUSES or exc.status >= 500:
                raise _Reconnect(str(exc)) from exc
            raise  # refused (unauthorized, say): retrying cannot help
        except ChatConnectionError as exc:
            raise _Reconnect(str(exc)) from exc
        return False

    async def _run(self) -> AsyncGenerator[Event, None]:
        attempt = 0
        while True:
            if attempt:
                await asyncio.sleep(self._client._backoff(attempt))
            if self._client.closed:
                return
            attempt += 1
            try:
                if self._connected_once and await self._session_gone():
                    return
                ws = await self._connect()
            except _Reconnect as exc:
                log.info("follow %s: cannot connect (%s); retrying", self.session_id, exc)
                continue
            try:
                async with contextlib.aclosing(self._stream(ws)) as events:
                    async for event in events:
                        attempt = 0  # it works: the next reconnect starts with a short pause
                        yield event
                return  # closed with 4404: the session was deleted
            except _SessionReplaced:
                return
            except _Reconnect as exc:
                log.info(
                    "follow %s: connection lost (%s); resuming after %s", self.session_id, exc, self.cursor
                )
            finally:
                await self._close(ws)

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        params = {"session_id": self.session_id, "client_id": self._client.client_id}
        if self.cursor is not None:
            params["after"] = str(self.cursor)
        try:
            return await self._client._http().ws_connect(
                self._url(), params=params, heartbeat=self._client._heartbeat_s
            )
        except aiohttp.WSServerHandshakeError as exc:
            refused = exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _Reconnect(f"{type(exc).__name__}: {exc}") from exc
        if refused.status in RETRY_STATUSES or refused.status >= 500:
            raise _Reconnect(f"{refused.status} {refused.message}") from refused
        if refused.status == 404 and not await self._session_gone():
            # The server answers 404 to a connection that races with the session's creation by another request
            # (a send, say): the session is ours, so connect again.
            raise _Reconnect("404 while the session was being created") from refused
        raise ChatError(
            refused.status,
            _STATUS_CODES.get(refused.status, "internal"),
            f"websocket refused: {refused.message}",
        ) from refused

    async def _stream(self, ws: aiohttp.ClientWebSocketResponse) -> AsyncGenerator[Event, None]:
        """The events of one connection; returns when the session was deleted, raises _Reconnect otherwise."""
        frames: asyncio.Queue[_Frame] = asyncio.Queue(maxsize=_READ_AHEAD)
        reader = asyncio.create_task(_read_into(ws, frames))
        since_ack = 0
        try:
            while True:
                if (
                    self.cursor is not None
                    and self.cursor > self._acked
                    and (frames.empty() or since_ack >= _ACK_EVERY)
                ):
                    await self._ack(ws, self.cursor)
                    since_ack = 0
                msg = await frames.get()
                if isinstance(msg, Exception):
                    raise _Reconnect(f"reading failed: {type(msg).__name__}: {msg}")
                if msg.type in _ENDS:
                    if ws.close_code == SESSION_DELETED:
                        return
                    raise _Reconnect(f"closed with code {ws.close_code}")
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    frame = orjson.loads(msg.data)
                except orjson.JSONDecodeError:
                    log.warning("follow %s: a frame that is not JSON: %.200r", self.session_id, msg.data)
                    continue
                if not isinstance(frame, dict):
                    continue
                seq = frame.get("seq")
                if isinstance(seq, int) and not isinstance(seq, bool):
                    if self.cursor is not None and seq <= self.cursor:
                        continue  # already yielded
                    if self.cursor is not None and seq > self.cursor + 1:
                        raise _Reconnect(f"gap: seq {seq} after {self.cursor}")
                    self._text.committed(frame)
                    self.cursor = seq
                    since_ack += 1
                    yield frame
                elif frame.get("type") == CHUNK_TYPE:
                    chunk = self._text.trim(frame)
                    if chunk is not None:
                        yield chunk
                elif frame.get("type") == "session":
                    self._on_session(frame)
                elif frame.get("type") == "error":
                    log.warning("follow %s: the server refused a frame: %s", self.session_id, frame)
        finally:
            try:
                if self.cursor is not None and self.cursor > self._acked and not ws.closed:
                    with contextlib.suppress(_Reconnect):
                        await self._ack(ws, self.cursor)
                # Closed while the reader still reads: the close handshake completes, so the server has
                # handled the ack above by the time this returns.
                await self._close(ws)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    def _on_session(self, frame: dict[str, Any]) -> None:
        replay_from = frame.get("replay_from")
        if not isinstance(replay_from, int):
            raise _Reconnect("a session frame without replay_from")
        if self._connected_once and self.cursor is not None and replay_from < self.cursor:
            # The log is shorter than what we saw: the session was deleted while we were away (and our connect
            # created it anew). Its old cursor means nothing; end as for a close with 4404.
            raise _SessionReplaced
        if self._connected_once:
            # An ack sent just before the connection broke may have been lost: acknowledge the cursor again.
            self._acked = 0
        else:
            # The server clamps a cursor beyond the log to its end, or used its stored cursor for ours.
            self.cursor = self._acked = replay_from
            self._connected_once = True

    async def _ack(self, ws: aiohttp.ClientWebSocketResponse, seq: int) -> None:
        try:
            await ws.send_str(orjson.dumps({"type": "ack", "seq": seq}).decode())
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            raise _Reconnect(f"ack failed: {exc}") from exc
        self._acked = seq

    @staticmethod
    async def _close(ws: aiohttp.ClientWebSocketResponse) -> None:
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, RuntimeError):
            await ws.close()


async def _read_into(ws: aiohttp.ClientWebSocketResponse, frames: asyncio.Queue[_Frame]) -> None:
    """Read frames ahead of the consumer (so acks can wait until it has caught up), up to the queue's size.
    The last item is the closing message, or the exception that ended the reading."""
    try:
        while True:
            msg = await ws.receive()
            await frames.put(msg)
            if msg.type in _ENDS:
                return
    except Exception as exc:
        await frames.put(exc)


_ENDS: Final = frozenset(
    {aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR}
)
_Frame: TypeAlias = aiohttp.WSMessage | Exception


_T = TypeVar("_T")


class SyncChatClient:
    """A blocking :class:`ChatClient` for scripts: each call runs the async one on an event loop of its own.

    ``with SyncChatClient("http://127.0.0.1:8080") as chat: seq = chat.send("demo", "hello")``. Do not use it
    from inside a running event loop (``asyncio.Runner`` refuses; use :class:`ChatClient` there). The methods
    take the same arguments and raise the same errors as :class:`ChatClient`'s."""

    def __init__(
        self, base_url: str, token: str | None = None, client_id: str | None = None, **options: float
    ) -> None:
        self._runner = asyncio.Runner()
        self._client = ChatClient(base_url, token, client_id, **options)

    @property
    def client_id(self) -> str:
        return self._client.client_id

    def _run(self, call: Callable[[], Awaitable[_T]]) -> _T:
        async def main() -> _T:
            return await call()

        return self._runner.run(main())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections and the event loop. Raises nothing."""
        with contextlib.suppress(RuntimeError):
            self._run(self._client.aclose)
        self._runner.close()

    def send(
        self, session_id: str, text: str, *, client_msg_id: str | None = None, timeout: float | None = None
    ) -> int:
        """:meth:`ChatClient.send`: the seq once acknowledged; raises SendTimeout, ChatError."""
        return self._run(
            lambda: self._client.send(session_id, text, client_msg_id=client_msg_id, timeout=timeout)
        )

    def answer(
        self, session_id: str, text: str, *, client_msg_id: str | None = None, timeout: float | None = None
    ) -> int:
        """:meth:`ChatClient.answer` (a send: the next message answers the team's question)."""
        return self._run(
            lambda: self._client.answer(session_id, text, client_msg_id=client_msg_id, timeout=timeout)
        )

    def history(
        self,
        session_id: str,
        *,
        after: int | None = None,
        before: int | None = None,
        limit: int | None = None,
    ) -> Page:
        """:meth:`ChatClient.history`; raises ValueError, ChatError, ChatConnectionError."""
        return self._run(lambda: self._client.history(session_id, after=after, before=before, limit=limit))

    def cancel(self, session_id: str) -> bool:
        """:meth:`ChatClient.cancel`; raises ChatError, ChatConnectionError."""
        return self._run(lambda: self._client.cancel(session_id))

    def create_session(
        self, session_id: str | None = None, *, team: str | None = None, title: str | None = None
    ) -> SessionInfo:
        """:meth:`ChatClient.create_session`; raises ChatError, ChatConnectionError."""
        return self._run(lambda: self._client.create_session(session_id, team=team, title=title))

    def reset(self, session_id: str) -> int:
        """:meth:`ChatClient.reset`; raises ChatError, ChatConnectionError."""
        return self._run(lambda: self._client.reset(session_id))

    def follow(self, session_id: str, after: int | None = None) -> Iterator[Event]:
        """:meth:`ChatClient.follow` as a blocking iterator (the socket is read only while you iterate). Close it
        when you stop early and keep a reference (``with contextlib.closing(chat.follow(sid)) as events:``)."""
        follower = self._client.follow(session_id, after)
        try:
            while True:
                try:
                    yield self._run(follower.__anext__)
                except StopAsyncIteration:
                    return
        finally:
            with contextlib.suppress(RuntimeError):
                self._run(follower.aclose)
