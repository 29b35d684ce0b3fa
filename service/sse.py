"""``GET /sessions/{id}/events``: Server-Sent Events, replay then live; ``id:`` is the seq.

A reconnecting EventSource sends ``Last-Event-ID``, which wins over ``?after=`` (the URL still carries the first
cursor). Ephemeral frames carry no ``id:`` so they never move the browser's resume point.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress

import orjson
from aiohttp import web

from service import keys, parse
from service.errors import ServiceError
from service.handlers import owned_session
from service.models import Entry, Frames
from service.stream import follow_pages

log = logging.getLogger("service.sse")
KEEPALIVE_S = 15.0


async def events(request: web.Request) -> web.StreamResponse:
    session = await owned_session(request)
    after = parse.non_negative_int(request.headers.get("Last-Event-ID"), "Last-Event-ID")
    if after is None:
        after = parse.non_negative_int(request.query.get("after"), "after", 0)
    assert after is not None
    after = min(after, session.last_seq)  # as on the WebSocket: a cursor beyond the log resumes at its end
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    request.app[keys.METRICS].replay_entries.observe(session.last_seq - after)
    keepalive = asyncio.create_task(_keepalive(response))
    streams = request.app[keys.STREAMS]
    this = asyncio.current_task()
    assert this is not None  # a handler always runs in a task
    streams.add(this)
    try:
        store, hub = request.app[keys.STORE], request.app[keys.HUB]
        async for item in follow_pages(store, hub, session.session_id, after):
            if isinstance(item, Frames):  # a replayed page: one write
                await response.write(
                    b"".join(
                        b"id: %d\ndata: %b\n\n" % (seq, frame)
                        for seq, frame in zip(item.seqs, item.frames, strict=True)
                    )
                )
            elif isinstance(item, Entry):
                await response.write(
                    f"id: {item.seq}\ndata: ".encode() + orjson.dumps(item.to_json()) + b"\n\n"
                )
            else:
                await response.write(b"data: " + orjson.dumps(item) + b"\n\n")
    except ConnectionError:
        pass  # the client went away; it resumes with Last-Event-ID
    except ServiceError as exc:
        # The headers are sent: no error response can follow. End the stream; EventSource resumes from its
        # Last-Event-ID once the store is back.
        log.warning("ending an event stream of %s: %s", session.session_id, exc.message)
        with suppress(ConnectionError):
            await response.write_eof()
    except asyncio.CancelledError:
        if not request.app[keys.SHUTTING_DOWN].is_set():
            raise
        this.uncancel()  # our own shutdown: end the stream properly; the client resumes elsewhere
        with suppress(ConnectionError):
            await response.write_eof()
    finally:
        streams.discard(this)
        keepalive.cancel()
        with suppress(asyncio.CancelledError):
            await keepalive
    return response


async def _keepalive(response: web.StreamResponse) -> None:
    # A comment line keeps proxies from closing an idle stream.
    with suppress(ConnectionError):
        while True:
            await asyncio.sleep(KEEPALIVE_S)
            await response.write(b": keepalive\n\n")
