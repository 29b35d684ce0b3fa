"""AutoGen messages and events -> log entries (``msg.dump()``); streaming chunks -> ephemeral frames."""

from __future__ import annotations

from typing import Any

from autogen_agentchat.messages import BaseAgentEvent, BaseChatMessage, ModelClientStreamingChunkEvent

from service.models import NewEntry, ephemeral, iso

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


def chunk_frame(session_id: str, run_id: str, chunk: ModelClientStreamingChunkEvent) -> dict[str, Any]:
    """A live-only frame for one streamed chunk: the log entry's shape with ``seq`` null, plus
    ``full_message_id`` (the ``metadata.id`` of the durable message that follows it in the log)."""
    entry = to_entry(chunk)
    metadata = {k: v for k, v in entry.metadata.items() if k != "full_message_id"}
    return ephemeral(
        session_id,
        {
            "type": entry.type,
            "source": entry.source,
            "content": entry.content,
            "created_at": iso(chunk.created_at),
            "run_id": run_id,
            "client_msg_id": None,
            "metadata": metadata,
            "full_message_id": chunk.full_message_id,
        },
    )
