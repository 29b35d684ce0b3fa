"""The offline demo model (README "The offline demo model"): a deterministic ``ChatCompletionClient`` that needs no network.

Its reply to a user message X contains X and ends with ``[context: N]``, N being the number of user messages
(``UserMessage`` with source ``user``) it was given, so anyone can see that a conversation's memory survived a
restart. Directives in the latest user message: ``[[sleep:S]]``, ``[[fail]]``, ``[[tool:calculator:EXPR]]``,
``[[ask]]``. It loads from a component config:
``"provider": "service.worker.demo_model.DemoChatCompletionClient"``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self

import orjson
from autogen_core import CancellationToken, Component, FunctionCall
from autogen_core.models import (
    ChatCompletionClient,
    CreateResult,
    FunctionExecutionResultMessage,
    LLMMessage,
    ModelCapabilities,
    ModelFamily,
    ModelInfo,
    RequestUsage,
    UserMessage,
)
from autogen_core.tools import Tool, ToolSchema
from pydantic import BaseModel, Field

from service.worker.state_saver import same_prefix

MAX_SLEEP_S = 600.0
ASK_TEXT = (
    "Before I answer, I have a question for you: what should I know? (Your next message is the answer.)"
)

_SLEEP = re.compile(r"\[\[sleep:\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*\]\]")
_TOOL = re.compile(r"\[\[tool:([A-Za-z_][A-Za-z0-9_]*):(.*?)\]\]", re.DOTALL)
_FAIL = "[[fail]]"
_ASK = "[[ask]]"

DEMO_MODEL_INFO = ModelInfo(
    vision=False,
    function_calling=True,
    json_output=False,
    family=ModelFamily.UNKNOWN,
    structured_output=False,
)


class DemoModelError(RuntimeError):
    """The demo model was told to fail (``[[fail]]``)."""


class DemoChatCompletionClientConfig(BaseModel):
    """What a team JSON may set for the demo model."""

    chunk_size: int = Field(default=1, ge=1, description="words per streamed chunk")
    chunk_delay_s: float = Field(default=0.0, ge=0.0, le=10.0, description="pause between streamed chunks")


@dataclass(frozen=True, slots=True)
class Plan:
    """What the model will answer, decided from the messages alone (deterministic)."""

    content: str | list[FunctionCall]
    sleep_s: float = 0.0
    fail: bool = False


def count_user_messages(messages: Sequence[LLMMessage]) -> int:
    return sum(1 for m in messages if isinstance(m, UserMessage) and m.source == "user")


def latest_user_text(messages: Sequence[LLMMessage]) -> str:
    for m in reversed(messages):
        if isinstance(m, UserMessage) and m.source == "user":
            return (
                m.content
                if isinstance(m.content, str)
                else " ".join(c for c in m.content if isinstance(c, str))
            )
    return ""


def sleep_seconds(text: str) -> float:
    match = _SLEEP.search(text)
    return min(float(match.group(1)), MAX_SLEEP_S) if match else 0.0


def plan_reply(messages: Sequence[LLMMessage], tool_names: Sequence[str]) -> Plan:
    """The reply to ``messages``: a text, or a call to the ``calculator`` tool."""
    text = latest_user_text(messages)
    context = f"[context: {count_user_messages(messages)}]"
    if messages and isinstance(messages[-1], FunctionExecutionResultMessage):
        results = "; ".join(f"{r.name} returned {r.content}" for r in messages[-1].content)
        return Plan(f"The tool answered: {results}. You said: {text} {context}")
    sleep_s, fail = sleep_seconds(text), _FAIL in text
    tool = _TOOL.search(text)
    if tool is not None:
        name, expression = tool.group(1), tool.group(2).strip()
        if name in tool_names:
            call_id = f"call_{len(messages)}"
            arguments = orjson.dumps({"expression": expression}).decode()
            return Plan([FunctionCall(id=call_id, name=name, arguments=arguments)], sleep_s, fail)
        return Plan(f"I have no tool called {name!r}. You said: {text} {context}", sleep_s, fail)
    if _ASK in text:
        return Plan(ASK_TEXT, sleep_s, fail)
    return Plan(f"You said: {text} {context}", sleep_s, fail)


def _words(text: str) -> int:
    return len(text.split())


def _chunks(text: str, words_per_chunk: int) -> list[str]:
    words = re.findall(r"\S+\s*", text)
    return ["".join(words[i : i + words_per_chunk]) for i in range(0, len(words), words_per_chunk)]


class DemoChatCompletionClient(ChatCompletionClient, Component[DemoChatCompletionClientConfig]):
    """A deterministic, offline chat model for demos and tests (see the module docstring)."""

    component_type = "model"
    component_provider_override = "service.worker.demo_model.DemoChatCompletionClient"
    component_config_schema = DemoChatCompletionClientConfig

    def __init__(self, chunk_size: int = 1, chunk_delay_s: float = 0.0) -> None:
        self._config = DemoChatCompletionClientConfig(chunk_size=chunk_size, chunk_delay_s=chunk_delay_s)
        self._usage = RequestUsage(prompt_tokens=0, completion_tokens=0)
        self._last_usage = RequestUsage(prompt_tokens=0, completion_tokens=0)
        # The words of the messages of the last prompt, by message (the same objects open the next prompt): a
        # prompt's count costs what is new in it, not the whole conversation (README "Benchmarks").
        self._counted: list[LLMMessage] = []
        self._word_counts: list[int] = []

    async def create(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = [],
        tool_choice: Tool | Literal["auto", "required", "none"] = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> CreateResult:
        plan = plan_reply(messages, _tool_names(tools))
        await _pause(plan.sleep_s, cancellation_token)
        return self._result(messages, plan)

    async def create_stream(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = [],
        tool_choice: Tool | Literal["auto", "required", "none"] = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> AsyncGenerator[str | CreateResult, None]:
        plan = plan_reply(messages, _tool_names(tools))
        await _pause(plan.sleep_s, cancellation_token)
        result = self._result(messages, plan)
        if isinstance(result.content, str):
            for i, chunk in enumerate(_chunks(result.content, self._config.chunk_size)):
                if i and self._config.chunk_delay_s:
                    await _pause(self._config.chunk_delay_s, cancellation_token)
                yield chunk
        yield result

    def _prompt_words(self, messages: Sequence[LLMMessage]) -> int:
        """The words of every message of a prompt (its usage's ``prompt_tokens``)."""
        messages = list(messages)
        same = same_prefix(self._counted, messages)
        del self._counted[same:], self._word_counts[same:]
        for m in messages[same:]:
            self._counted.append(m)
            self._word_counts.append(_words(str(getattr(m, "content", ""))))
        return sum(self._word_counts)

    def _result(self, messages: Sequence[LLMMessage], plan: Plan) -> CreateResult:
        if plan.fail:
            raise DemoModelError("the demo model failed on purpose ([[fail]] in the message)")
        prompt = self._prompt_words(messages)
        completion = _words(plan.content) if isinstance(plan.content, str) else len(plan.content)
        self._last_usage = RequestUsage(prompt_tokens=prompt, completion_tokens=completion)
        self._usage = RequestUsage(
            self._usage.prompt_tokens + prompt, self._usage.completion_tokens + completion
        )
        reason: Literal["stop", "function_calls"] = (
            "stop" if isinstance(plan.content, str) else "function_calls"
        )
        return CreateResult(finish_reason=reason, content=plan.content, usage=self._last_usage, cached=False)

    async def close(self) -> None:
        return None

    def actual_usage(self) -> RequestUsage:
        return self._last_usage

    def total_usage(self) -> RequestUsage:
        return self._usage

    def count_tokens(self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = []) -> int:
        # Words, not tiktoken: tiktoken would try to download its tables (no network here).
        return sum(_words(str(getattr(m, "content", ""))) for m in messages)

    def remaining_tokens(
        self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = []
    ) -> int:
        return max(0, 1_000_000 - self.count_tokens(messages, tools=tools))

    @property
    def capabilities(self) -> ModelCapabilities:  # type: ignore[override]
        return DEMO_MODEL_INFO  # type: ignore[return-value]

    @property
    def model_info(self) -> ModelInfo:
        return DEMO_MODEL_INFO

    def _to_config(self) -> DemoChatCompletionClientConfig:
        return self._config.model_copy()

    @classmethod
    def _from_config(cls, config: DemoChatCompletionClientConfig) -> Self:
        return cls(chunk_size=config.chunk_size, chunk_delay_s=config.chunk_delay_s)


def _tool_names(tools: Sequence[Tool | ToolSchema]) -> list[str]:
    return [t.name if isinstance(t, Tool) else t["name"] for t in tools]


async def _pause(seconds: float, token: CancellationToken | None) -> None:
    """Sleep that a cancelled token stops at once (the run's token is linked to the sleeping future)."""
    if seconds <= 0:
        return
    sleeper = asyncio.ensure_future(asyncio.sleep(seconds))
    if token is not None:
        token.link_future(sleeper)
    await sleeper
