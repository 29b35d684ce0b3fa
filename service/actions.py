"""What a client can do, whichever way it speaks (HTTP or WebSocket): send a message, cancel a run."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from service import keys, parse, tracing
from service.models import Enqueued, MultitaskStrategy


async def submit(app: web.Application, owner: str, session_id: str, message: dict[str, Any]) -> Enqueued:
    """Enqueue a user message (durable when this returns), then ring the doorbell for live readers."""
    config = app[keys.CONFIG]
    queued = await app[keys.STORE].enqueue(
        owner,
        session_id,
        parse.content(message, config),
        parse.client_msg_id(message),
        max_queued=config.max_queued_per_session,
        strategy=parse.multitask_strategy(message),
        trace_context=tracing.carrier() or None,  # README "Tracing": the run joins this request's trace
    )
    if queued.entry is not None:  # a repeated client_msg_id wrote nothing
        app[keys.HUB].publish(session_id, [queued.entry])
        app[keys.METRICS].inputs_enqueued.inc()
        if queued.strategy in (MultitaskStrategy.INTERRUPT, MultitaskStrategy.ROLLBACK):
            # README "Double-texting": the session's run stops; this message runs next. A run waiting for a
            # human does not take it as the answer (the store never hands such a message out as one).
            await cancel(app, owner, session_id)
    return queued


async def cancel(app: web.Application, owner: str, session_id: str, input_seq: int | None = None) -> bool:
    """Stop the session's run (only the run of ``input_seq`` when given): at once when it runs here, through the
    store when another process runs it."""
    requested = await app[keys.STORE].request_cancel(owner, session_id, input_seq)
    if requested.entry is not None:  # a pending retry, ended by the store itself
        app[keys.HUB].publish(session_id, [requested.entry])
    local = requested.cancelled and app[keys.POOL].cancel(session_id, input_seq)
    return requested.cancelled or local
