"""Termination conditions whose component config keeps every argument.

autogen-agentchat 0.7.5's ``TextMentionTermination`` dumps only its ``text``, not ``sources``: a team loaded
from its JSON then also stops on the user's own message when it mentions the text (the shipped team stopped
on ``[context: 3]`` in a user message, with no reply). ``SourceTextMentionTermination`` is the same condition
with ``sources`` in its config, so the loaded team behaves like the one dumped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from autogen_agentchat.conditions import TextMentionTermination
from pydantic import BaseModel


class SourceTextMentionTerminationConfig(BaseModel):
    text: str
    sources: list[str] | None = None


class SourceTextMentionTermination(TextMentionTermination):  # type: ignore[misc]
    """Stop when ``text`` is mentioned in a message of one of ``sources`` (any source when None)."""

    component_config_schema = SourceTextMentionTerminationConfig  # type: ignore[assignment]
    component_provider_override = "service.worker.conditions.SourceTextMentionTermination"

    def __init__(self, text: str, sources: Sequence[str] | None = None) -> None:
        super().__init__(text, sources)
        self._source_list = None if sources is None else list(sources)

    def _to_config(self) -> SourceTextMentionTerminationConfig:  # type: ignore[override]
        return SourceTextMentionTerminationConfig(text=self._termination_text, sources=self._source_list)

    @classmethod
    def _from_config(cls, config: SourceTextMentionTerminationConfig) -> Self:  # type: ignore[override]
        return cls(text=config.text, sources=config.sources)
