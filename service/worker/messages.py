"""AutoGen messages and events -> log entries (``msg.dump()``); streaming chunks -> ephemeral frames."""

from __future__ import annotations

from typing import Any

from autogen_agentchat.messages import BaseAgentEvent, BaseChatMessage, ModelClientStreamingChunkEvent

from service.models import NewEntry, ephemeral

# Stored in the entry's own columns (type, source, content) or not worth storing (AutoGen's creation time: the
# entry has the commit time).
_OWN_FIELDS = frozenset({"type", "source", "content", "created_at"})


def to_entry(msg: BaseAgentEvent | BaseChatMessage) -> NewEntry:
    """The entry for one yielded message. ``metadata`` keeps the dump's other fields (``id``, which streamed
    chunks name as ``full_message_id``; ``models_usage``; ``request_id``; ``tool_calls``/``results``; ...)."""
    dump = msg.dump()
    metadata = {k: v for k, v in dump.items() if k not in _OWN_FIELDS and v not in (None, {}, [])}
    return NewEntry(
        type=str(dump["type"]), source=str(dump["source"]), content=dump["content"], metadata=metadata
    )


def chunk_frame(session_id: str, chunk: ModelClientStreamingChunkEvent) -> dict[str, Any]:
    """A live-only frame (seq null) for one streamed chunk; the final message follows in the log."""
    return ephemeral(session_id, dict(chunk.dump()))
