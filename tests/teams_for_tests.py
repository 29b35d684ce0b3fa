"""Team factories for tests/test_never_stuck.py: the shapes AutoGen users build every day, on the offline demo
model (no streaming delay) unless a fake OpenAI-compatible server is given.

Importable as ``tests.teams_for_tests`` (so ``--teams name=tests.teams_for_tests:factory`` works too)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping, Sequence
from functools import partial
from typing import Any, Literal

from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.base import ChatAgent, Team, TerminationCondition
from autogen_agentchat.conditions import HandoffTermination, MaxMessageTermination, TextMentionTermination
from autogen_agentchat.teams import DiGraphBuilder, GraphFlow, RoundRobinGroupChat, SelectorGroupChat, Swarm
from autogen_core import CancellationToken
from autogen_core.models import AssistantMessage, CreateResult, LLMMessage, UserMessage
from autogen_core.tools import FunctionTool, Tool, ToolSchema
from autogen_ext.models.openai import OpenAIChatCompletionClient
from pydantic import BaseModel

from service.worker.demo_model import DemoChatCompletionClient, latest_user_text
from service.worker.teams import TeamBuilder, default_team

HOLD = "[[hold]]"
HOLD_S = 300.0
OPENAI_MODEL_INFO: dict[str, Any] = {
    "vision": False,
    "function_calling": True,
    "json_output": False,
    "family": "unknown",
    "structured_output": False,
}


def demo() -> DemoChatCompletionClient:
    return DemoChatCompletionClient(chunk_size=1, chunk_delay_s=0.0)


def replied(*agents: str) -> TerminationCondition:
    """Stop once one of ``agents`` gave a normal demo reply (it ends with "[context: N]")."""
    return TextMentionTermination("[context:", sources=list(agents)) | MaxMessageTermination(10)


async def slow(expression: str) -> str:
    """Sleep for ``expression`` seconds (a slow tool: a long HTTP call, a build, a query), then say so."""
    seconds = float(expression)
    await asyncio.sleep(seconds)
    return f"slept {seconds:g} s"


def slow_tool() -> FunctionTool:
    return FunctionTool(slow, description="Wait the given number of seconds.", name="slow")


def assistant(name: str = "assistant", **options: Any) -> AssistantAgent:
    """A demo assistant; its first turn holds when the task says ``[[hold]]`` (see ``HoldingDemo``)."""
    return AssistantAgent(name, model_client=HoldingDemo(), **options)


# --- kind 2 and the stall: a tool that takes its time ---------------------------------------------------------
def slow_tool_team() -> RoundRobinGroupChat:
    """One assistant with the async ``slow`` tool: ``[[tool:slow:8]]`` makes it sleep 8 s inside the tool."""
    agent = assistant(tools=[slow_tool()], reflect_on_tool_use=True)
    return RoundRobinGroupChat([agent], termination_condition=replied("assistant"))


def openai_slow_tool_team(base_url: str) -> RoundRobinGroupChat:
    """The same on a real provider client (OpenAI-compatible server at ``base_url``)."""
    client = OpenAIChatCompletionClient(
        model="fake",
        base_url=base_url,
        api_key="sk-test-not-a-real-key",
        model_info=OPENAI_MODEL_INFO,  # type: ignore[arg-type]
    )
    agent = AssistantAgent("assistant", model_client=client, tools=[slow_tool()], reflect_on_tool_use=True)
    return RoundRobinGroupChat([agent], max_turns=1)


# --- kind 4: a group chat with max_turns -----------------------------------------------------------------------
class HoldSignal:
    """Tells a test that a model call now holds, so a cancel sent then lands mid-turn (no timing guesses)."""

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def reset(self) -> None:
        """Call at the start of a test (an Event belongs to one event loop)."""
        self._event = asyncio.Event()

    def set(self) -> None:
        if self._event is not None:
            self._event.set()

    async def wait(self) -> None:
        assert self._event is not None, "HOLDING.reset() first"
        await self._event.wait()


HOLDING = HoldSignal()


class HoldingDemo(DemoChatCompletionClient):
    """The demo model, except that when the task says ``[[hold]]`` an agent's ``turn``-th model call in the run
    signals ``HOLDING`` and then waits (cancellable, 300 s) before answering."""

    def __init__(self, turn: int = 1) -> None:
        super().__init__(chunk_size=1, chunk_delay_s=0.0)
        self._turn = turn

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
        if HOLD in latest_user_text(messages) and _turns_since_the_task(messages) + 1 == self._turn:
            waiter = asyncio.ensure_future(asyncio.sleep(HOLD_S))
            if cancellation_token is not None:
                cancellation_token.link_future(waiter)
            HOLDING.set()
            await waiter
        return await super().create(
            messages,
            tools=tools,
            tool_choice=tool_choice,
            json_output=json_output,
            extra_create_args=extra_create_args,
            cancellation_token=cancellation_token,
        )

    def create_stream(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = [],
        tool_choice: Tool | Literal["auto", "required", "none"] = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> AsyncGenerator[str | CreateResult, None]:
        raise NotImplementedError("HoldingDemo is used without model_client_stream")


def _turns_since_the_task(messages: Sequence[LLMMessage]) -> int:
    """How often this agent spoke since the latest user message."""
    turns = 0
    for m in reversed(messages):
        if isinstance(m, AssistantMessage):
            turns += 1
        elif isinstance(m, UserMessage) and m.source == "user":
            break
    return turns


def four_turns_team() -> RoundRobinGroupChat:
    """Two assistants taking turns, stopped by ``max_turns=4`` only (every run: 4 replies)."""
    agents: list[ChatAgent | Team] = [
        AssistantAgent(name, model_client=HoldingDemo(turn=2)) for name in ("assistant", "helper")
    ]
    return RoundRobinGroupChat(agents, max_turns=4)


# --- kind 5: team shapes ---------------------------------------------------------------------------------------
def swarm_team() -> Swarm:
    """AutoGen's documented human-in-the-loop Swarm: the agent hands off to the user, which ends the run."""
    alice = assistant("alice", handoffs=["user"])
    termination = HandoffTermination(target="user") | replied("alice")
    return Swarm([alice], termination_condition=termination)


def round_robin_one_team() -> RoundRobinGroupChat:
    return RoundRobinGroupChat([assistant()], termination_condition=replied("assistant"))


def selector_team() -> SelectorGroupChat:
    """Two assistants; the selector is the demo model (it never names a speaker, so AutoGen falls back: the
    first participant, then anyone but the previous speaker)."""
    return SelectorGroupChat(
        [assistant("assistant"), assistant("helper")],
        model_client=demo(),
        termination_condition=replied("assistant", "helper"),
    )


def nested_team() -> RoundRobinGroupChat:
    """A team as a participant of another: an inner round robin answers, then a reviewer."""
    inner = RoundRobinGroupChat(
        [assistant("writer")], max_turns=1, name="inner", description="Writes the answer."
    )
    return RoundRobinGroupChat([inner, assistant("reviewer")], max_turns=2)


def graph_team() -> GraphFlow:
    """GraphFlow: two agents in sequence (first -> second)."""
    first, second = assistant("first"), assistant("second")
    builder = DiGraphBuilder()
    builder.add_node(first).add_node(second).add_edge(first, second)
    return GraphFlow([first, second], graph=builder.build())


def single_agent_team() -> RoundRobinGroupChat:
    """A single assistant, one reply per message."""
    return RoundRobinGroupChat([assistant()], max_turns=1)


# --- kind 6: a team that evolves -------------------------------------------------------------------------------
def grown_default_team() -> RoundRobinGroupChat:
    """The default team (assistant + user proxy, same names) plus a second assistant, ``helper``."""
    team = default_team(0.0)
    agents = [*team._participants, assistant("helper")]
    return RoundRobinGroupChat(agents, termination_condition=replied("assistant"))


def selector_default_team() -> SelectorGroupChat:
    """The default team's participants (same names, same classes) under a selector instead of a round robin.
    The selector function picks the assistant (the model would be asked only when it returned None)."""
    team = default_team(0.0)
    return SelectorGroupChat(
        list(team._participants),
        model_client=demo(),
        selector_func=lambda messages: "assistant",
        termination_condition=replied("assistant"),
    )


def fast_default_team() -> RoundRobinGroupChat:
    """The default team without its typing delay (for ``--teams name=tests.teams_for_tests:fast_default_team``)."""
    return default_team(0.0)


# Every shape of team the service is tested with (AutoGen's group chats, nested, graph, a lone agent), by name:
# the worker tests run each of them through the same faults and the same reuse.
TEAM_SHAPES: dict[str, TeamBuilder] = {
    "default": partial(default_team, 0.0),
    "slow": slow_tool_team,
    "turns": four_turns_team,
    "swarm": swarm_team,
    "round_robin_one": round_robin_one_team,
    "selector": selector_team,
    "nested": nested_team,
    "graph": graph_team,
    "single_agent": single_agent_team,
}
