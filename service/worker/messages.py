"""AutoGen messages and events -> log entries (``msg.dump()``), with their text repaired (``service.text``)."""

from __future__ import annotations

from autogen_agentchat.messages import BaseAgentEvent, BaseChatMessage

from service.models import NewEntry
from service.text import repair_json

# Stored in the entry's own columns (type, source, content) or not worth storing (AutoGen's creation time: the
# entry has the commit time).
_OWN_FIELDS = frozenset({"type", "source", "content", "created_at"})


def to_entry(msg: BaseAgentEvent | BaseChatMessage) -> NewEntry:
    """The entry for one yielded message. ``metadata`` keeps the dump's other fields (``id``, which streamed
    chunks name as ``full_message_id``; ``models_usage``; ``request_id``; ``tool_calls``/``results``; ...)."""
    dump = msg.dump()
    metadata = {k: v for k, v in dump.items() if k not in _OWN_FIELDS and v not in (None, {}, [])}
    # Text as providers send it may hold halves of UTF-16 pairs (an emoji split across stream deltas).
    return NewEntry(
        type=str(dump["type"]),
        source=str(dump["source"]),
        content=repair_json(dump["content"]),
        metadata=repair_json(metadata),
    )
