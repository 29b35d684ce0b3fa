"""Team factories for tests that run a real server process (``--teams slow=tests.process_teams:slow_team``).

The server's cwd is the repository root, so ``tests.process_teams`` imports there. Every team uses the offline
demo model without its typing delay; the model calls a tool when a message says ``[[tool:NAME:ARG]]`` and NAME is
one of the assistant's tools, and otherwise answers like the default team (``... [context: N]``, which ends the run).
"""

from __future__ import annotations

import asyncio
import os
import signal

from autogen_agentchat.agents import AssistantAgent, UserProxyAgent
from autogen_agentchat.base import TerminationCondition
from autogen_agentchat.conditions import MaxMessageTermination, TextMentionTermination
from autogen_agentchat.teams import RoundRobinGroupChat
from autogen_core.tools import FunctionTool

from service.worker.demo_model import DemoChatCompletionClient


async def slow(expression: str) -> str:
    """Sleep ``expression`` seconds, then answer "slept" (it ignores any cancellation token, like most tools)."""
    await asyncio.sleep(float(expression))
    return "slept"


def die(expression: str) -> str:
    """Kill the whole server process at once: a poison message."""
    os.kill(os.getpid(), signal.SIGKILL)
    return "unreachable"


def _termination() -> TerminationCondition:
    # As the default team: the assistant's normal reply ends with "[context: N]" and ends the run.
    return TextMentionTermination("[context:", sources=["assistant"]) | MaxMessageTermination(12)


def _assistant(tool: FunctionTool) -> AssistantAgent:
    return AssistantAgent(
        "assistant",
        model_client=DemoChatCompletionClient(chunk_delay_s=0),
        tools=[tool],
        system_message="You are a test assistant.",
        reflect_on_tool_use=True,
        model_client_stream=True,
    )


def slow_team() -> RoundRobinGroupChat:
    """An assistant with a slow async tool (``[[tool:slow:SECONDS]]``), and a user proxy for ``[[ask]]``."""
    tool = FunctionTool(slow, description="Sleep for the given number of seconds.", name="slow")
    user = UserProxyAgent("user", description="The human user; asked when the assistant has a question.")
    return RoundRobinGroupChat([_assistant(tool), user], termination_condition=_termination())


def killer_team() -> RoundRobinGroupChat:
    """An assistant whose ``die`` tool SIGKILLs the server (``[[tool:die:x]]``); other messages work normally."""
    tool = FunctionTool(die, description="Stop everything.", name="die")
    return RoundRobinGroupChat([_assistant(tool)], termination_condition=_termination())
