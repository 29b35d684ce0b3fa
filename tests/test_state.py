"""service/worker/state.py on real AutoGen teams: what a run starts from."""

from __future__ import annotations

from typing import Any

from autogen_agentchat.agents import AssistantAgent, SocietyOfMindAgent
from autogen_agentchat.base import ChatAgent, Team
from autogen_agentchat.teams import RoundRobinGroupChat

from service.models import Draft
from service.worker.demo_model import DemoChatCompletionClient
from service.worker.state import CANCELLED_TOOL_RESULT, prepare_state, remember_partial, repair_tool_calls


def _society(with_editor: bool) -> RoundRobinGroupChat:
    inner: list[ChatAgent | Team] = [AssistantAgent("writer", model_client=DemoChatCompletionClient())]
    if with_editor:
        inner.append(AssistantAgent("editor", model_client=DemoChatCompletionClient()))
    som = SocietyOfMindAgent(
        "som", team=RoundRobinGroupChat(inner, max_turns=1), model_client=DemoChatCompletionClient()
    )
    return RoundRobinGroupChat([som], max_turns=1)


async def test_an_agent_wrapping_a_team_survives_a_new_inner_agent() -> None:
    before = _society(with_editor=False)
    await before.run(task="hello")
    saved = await before.save_state()
    after = _society(with_editor=True)
    state = prepare_state(saved, await after.save_state())
    await after.load_state(state)  # AutoGen alone: "Agent state for editor not found"
    result = await after.run(task="again")
    assert result.messages[-1].source == "som"
    manager = state["agent_states"]["RoundRobinGroupChatManager"]
    assert manager["message_thread"][0]["content"] == "hello"  # the conversation is kept


def test_dangling_tool_calls_get_error_results_and_complete_ones_stay() -> None:
    call = {"id": "c1", "name": "slow", "arguments": "{}"}
    other = {"id": "c2", "name": "calc", "arguments": "{}"}
    done = {"content": "4", "name": "calc", "call_id": "c2", "is_error": False}
    messages: list[Any] = [
        {"type": "UserMessage", "content": "hi", "source": "user"},
        {"type": "AssistantMessage", "content": [other], "source": "a"},
        {"type": "FunctionExecutionResultMessage", "content": [done]},
        {"type": "AssistantMessage", "content": [call, other], "source": "a"},
        {"type": "FunctionExecutionResultMessage", "content": [done]},
        {"type": "AssistantMessage", "content": [call], "source": "a"},
    ]
    repaired = repair_tool_calls(messages)
    assert repaired[:3] == messages[:3]
    assert [r["call_id"] for r in repaired[4]["content"]] == ["c2", "c1"]
    assert repaired[4]["content"][1] == {
        "content": CANCELLED_TOOL_RESULT,
        "name": "slow",
        "call_id": "c1",
        "is_error": True,
    }
    assert repaired[6]["type"] == "FunctionExecutionResultMessage"
    assert [r["call_id"] for r in repaired[6]["content"]] == ["c1"]
    assert len(repaired) == 7
    assert repair_tool_calls(repaired) == repaired  # repairing twice changes nothing


async def test_a_cancelled_message_is_remembered_as_the_user_saw_it() -> None:
    team = RoundRobinGroupChat(
        [
            AssistantAgent("a", model_client=DemoChatCompletionClient()),
            AssistantAgent("b", model_client=DemoChatCompletionClient()),
        ],
        max_turns=2,
    )
    await team.run(task="start")
    state = remember_partial(await team.save_state(), Draft("r1", "m1", "a", "Half a tho"))
    agents = state["agent_states"]
    assert agents["RoundRobinGroupChatManager"]["message_thread"][-1]["content"] == "Half a tho"
    assert agents["a"]["agent_state"]["llm_context"]["messages"][-1] == {
        "content": "Half a tho",
        "thought": None,
        "source": "a",
        "type": "AssistantMessage",
    }
    assert agents["b"]["message_buffer"][-1]["content"] == "Half a tho"
    fresh = RoundRobinGroupChat(
        [
            AssistantAgent("a", model_client=DemoChatCompletionClient()),
            AssistantAgent("b", model_client=DemoChatCompletionClient()),
        ],
        max_turns=2,
    )
    await fresh.load_state(prepare_state(state, await fresh.save_state()))
    assert (await fresh.run(task="next")).messages[-1].source == "b"
