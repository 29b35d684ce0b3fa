"""The offline demo model (README "The offline demo model") and the calculator tool."""

from __future__ import annotations

import asyncio
import re
import sys

import orjson
import pytest
from autogen_core import CancellationToken, FunctionCall
from autogen_core.models import (
    AssistantMessage,
    ChatCompletionClient,
    CreateResult,
    FunctionExecutionResult,
    FunctionExecutionResultMessage,
    LLMMessage,
    SystemMessage,
    UserMessage,
)
from autogen_core.tools import FunctionTool

from service.worker.demo_model import (
    ASK_TEXT,
    MAX_SLEEP_S,
    DemoChatCompletionClient,
    DemoModelError,
    sleep_seconds,
)
from service.worker.tools import CalculatorError, calculate, calculator

CALC = FunctionTool(calculator, description="calc", name="calculator")


def chat(*texts: str) -> list[LLMMessage]:
    """A conversation where the user said ``texts`` and the assistant answered each but the last."""
    messages: list[LLMMessage] = [SystemMessage(content="be nice")]
    for i, text in enumerate(texts):
        if i:
            messages.append(AssistantMessage(content=f"answer {i}", source="assistant"))
        messages.append(UserMessage(content=text, source="user"))
    return messages


async def stream(client: DemoChatCompletionClient, messages: list[LLMMessage], **kw: object) -> list[object]:
    return [item async for item in client.create_stream(messages, **kw)]  # type: ignore[arg-type]


async def test_reply_contains_the_message_and_counts_user_messages() -> None:
    client = DemoChatCompletionClient()
    messages = [*chat("hello", "second one"), UserMessage(content="not a user", source="critic")]
    result = await client.create(messages)
    assert result.content == "You said: second one [context: 2]"
    assert result.finish_reason == "stop" and result.usage.completion_tokens == 6


async def test_streams_chunks_then_the_same_result() -> None:
    client = DemoChatCompletionClient(chunk_size=2)
    items = await stream(client, chat("one two three four five"))
    *chunks, result = items
    assert isinstance(result, CreateResult) and all(isinstance(c, str) for c in chunks)
    assert len(chunks) == 5  # 9 words, 2 a chunk
    assert "".join(str(c) for c in chunks) == result.content
    assert result == await client.create(chat("one two three four five"))


async def test_sleep_is_cancellable_and_bounded() -> None:
    assert sleep_seconds("x [[sleep:0.25]] y") == 0.25
    assert sleep_seconds("[[sleep:99999]]") == MAX_SLEEP_S
    assert sleep_seconds("[[sleep:abc]]") == 0.0
    token = CancellationToken()
    call = asyncio.create_task(
        DemoChatCompletionClient().create(chat("[[sleep:600]] slow"), cancellation_token=token)
    )
    await asyncio.sleep(0)  # let the call start sleeping
    token.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


async def test_fail_raises_every_time() -> None:
    client = DemoChatCompletionClient()
    for _ in range(2):
        with pytest.raises(DemoModelError, match="failed on purpose"):
            await client.create(chat("[[fail]] now"))
    with pytest.raises(DemoModelError):
        await stream(client, chat("[[fail]]"))


async def test_tool_directive_calls_the_calculator_then_answers_with_its_result() -> None:
    client = DemoChatCompletionClient()
    messages = chat("[[tool:calculator:6*7]] please")
    first = await client.create(messages, tools=[CALC])
    assert first.finish_reason == "function_calls"
    assert isinstance(first.content, list)
    call = first.content[0]
    assert isinstance(call, FunctionCall)
    assert (call.name, orjson.loads(call.arguments)) == ("calculator", {"expression": "6*7"})
    messages += [
        AssistantMessage(content=[call], source="assistant"),
        FunctionExecutionResultMessage(
            content=[
                FunctionExecutionResult(content="42", name="calculator", call_id=call.id, is_error=False)
            ]
        ),
    ]
    *chunks, final = await stream(client, messages)
    assert isinstance(final, CreateResult) and isinstance(final.content, str)
    assert "42" in final.content and "[[tool:calculator:6*7]] please" in final.content
    assert final.content.endswith("[context: 1]") and chunks
    # Without the tool the model says so instead of calling it.
    no_tool = await client.create(chat("[[tool:calculator:1+1]]"))
    assert "no tool called 'calculator'" in str(no_tool.content)


async def test_ask_directive_asks_without_ending_the_turn() -> None:
    result = await DemoChatCompletionClient().create(chat("[[ask]] hi"))
    assert result.content == ASK_TEXT and "[context:" not in ASK_TEXT


def test_loads_from_a_component_config() -> None:
    dumped = (
        DemoChatCompletionClient(chunk_size=3, chunk_delay_s=0.5).dump_component().model_dump(mode="json")
    )
    assert dumped["provider"] == "service.worker.demo_model.DemoChatCompletionClient"
    assert dumped["config"] == {"chunk_size": 3, "chunk_delay_s": 0.5}
    loaded = ChatCompletionClient.load_component(dumped)
    assert isinstance(loaded, DemoChatCompletionClient)
    assert loaded.dump_component().model_dump(mode="json") == dumped


def test_count_tokens_needs_no_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # any import of it now fails
    client = DemoChatCompletionClient()
    assert client.count_tokens(chat("one two", "three")) == 7  # "be nice" + "one two" + "answer 1" + "three"
    assert client.remaining_tokens(chat("x")) > 0


@pytest.mark.parametrize(
    ("expression", "result"),
    [
        ("6*7", "42"),
        ("(1 + 2) * 3", "9"),
        ("-3 + +2", "-1"),
        ("7 / 2", "3.5"),
        ("8 / 2", "4"),
        ("7 // 2", "3"),
        ("7 % 3", "1"),
        ("2 ** 10", "1024"),
        ("1.5 * 2", "3"),
    ],
)
def test_calculator(expression: str, result: str) -> None:
    assert calculator(expression) == result


@pytest.mark.parametrize(
    ("expression", "error"),
    [
        ("1/0", "division by zero"),
        ("2 ** 100000", "exponent too large"),
        ("99 ** 999", "result too large"),
        ("__import__('os').system('id')", "unsupported element 'Call'"),
        ("a + 1", "unsupported element 'Name'"),
        ("True + 1", "unsupported element 'Constant'"),
        ("1 +", "not an arithmetic expression"),
        ("1" * 300, "expression too long"),
        ("(-8) ** 0.5", "not a real number"),
    ],
)
def test_calculator_errors(expression: str, error: str) -> None:
    with pytest.raises(CalculatorError, match=re.escape(error)):
        calculate(expression)
