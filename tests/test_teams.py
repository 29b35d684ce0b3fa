"""TeamRegistry: the shipped default team, Studio-style JSON, Python factories, and clear errors at start."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.base import TaskResult, Team
from autogen_agentchat.conditions import MaxMessageTermination
from autogen_agentchat.messages import TextMessage, ToolCallExecutionEvent
from autogen_agentchat.teams import RoundRobinGroupChat
from autogen_core.tools import FunctionTool

from service.worker.demo_model import DemoChatCompletionClient
from service.worker.teams import (
    DEFAULT_TEAM_FILE,
    TeamConfigError,
    TeamRegistry,
    default_team,
    default_team_config,
    dump_json,
)
from service.worker.tools import calculator


def studio_team() -> RoundRobinGroupChat:
    """A team as AutoGen Studio would export it: one assistant with a tool, ended by a message count."""
    agent = AssistantAgent(
        "helper",
        model_client=DemoChatCompletionClient(),
        tools=[FunctionTool(calculator, description="calc", name="calculator")],
        reflect_on_tool_use=True,
    )
    return RoundRobinGroupChat([agent], termination_condition=MaxMessageTermination(4))


def not_a_team() -> str:
    return "nope"


async def run_once(team: Team, task: str) -> list[object]:
    return [item async for item in team.run_stream(task=task, output_task_messages=False)]


def test_default_json_is_the_dump_of_the_python_team() -> None:
    shipped = DEFAULT_TEAM_FILE.read_bytes()
    assert orjson.loads(shipped) == default_team_config()
    assert shipped == dump_json(default_team_config()), "run: python -m service.worker.teams --dump-default"


async def test_default_team_is_always_there_and_fresh() -> None:
    registry = TeamRegistry.from_config({})
    assert registry.names() == ["default"] and "default" in registry
    first, second = registry.build("default"), registry.build("default")
    assert first is not second
    items = await run_once(first, "hi there")
    assert isinstance(items[-1], TaskResult)
    assert [m.content for m in items if isinstance(m, TextMessage)] == ["You said: hi there [context: 1]"]


async def test_studio_json_and_factory_teams_load_and_run(tmp_path: Path) -> None:
    path = tmp_path / "studio.json"
    path.write_text(studio_team().dump_component().model_dump_json())
    registry = TeamRegistry.from_config({"studio": str(path), "factory": "tests.test_teams:studio_team"})
    assert registry.names() == ["default", "factory", "studio"]
    for name in ("studio", "factory"):
        items = await run_once(registry.build(name), "[[tool:calculator:2**8]]")
        assert any(isinstance(m, ToolCallExecutionEvent) and m.content[0].content == "256" for m in items)
        assert isinstance(items[-1], TaskResult)


def test_a_configured_default_replaces_the_shipped_one(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_bytes(dump_json(default_team(chunk_delay_s=0.0).dump_component().model_dump(mode="json")))
    assert TeamRegistry.from_config({"default": str(path)}).names() == ["default"]


def test_unknown_team_is_a_clear_error() -> None:
    with pytest.raises(TeamConfigError, match="unknown team 'other'"):
        TeamRegistry.from_config({}).build("other")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"team 'bad': cannot read .*missing\.json"),
        (b"{not json", r"team 'bad': .* is not valid JSON"),
        (b"[1, 2]", r"team 'bad': .* is not a component config"),
        (
            b'{"provider": "nowhere.NoSuchTeam", "component_type": "team", "config": {}}',
            r"team 'bad': .* does not load: .*nowhere",
        ),
        (
            b'{"provider": "autogen_agentchat.teams.RoundRobinGroupChat", "component_type": "team", '
            b'"config": {"participants": "oops"}}',
            r"team 'bad': .* does not load: ValidationError",
        ),
    ],
)
def test_bad_team_files_fail_at_start(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / ("missing.json" if content is None else "bad.json")
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TeamConfigError, match=message):
        TeamRegistry.from_config({"bad": str(path)})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.no_such_module:team", r"team 'bad': cannot import factory"),
        ("tests.test_teams:no_such_function", r"team 'bad': cannot import factory"),
        ("tests.test_teams:not_a_team", r"team 'bad': factory .* returned str, not a Team"),
    ],
)
def test_bad_factories_fail_at_start(spec: str, message: str) -> None:
    with pytest.raises(TeamConfigError, match=message):
        TeamRegistry.from_config({"bad": spec})
