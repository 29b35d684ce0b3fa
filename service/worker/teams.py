"""Teams by name: AutoGen declarative component JSON (``dump_component()``, AutoGen Studio exports) or a
Python factory ``"module:function"``. Every config is loaded once at construction, so a bad one stops the service at
start instead of failing at the first message; ``build(name)`` then returns a FRESH team (for every run that has
no live team to take: ``live_teams``).

API keys never come from a team file: a dumped key is the mask ``**********``, which we drop so that the model
client reads its environment variable (``OPENAI_API_KEY``) instead.

``python -m service.worker.teams --dump-default`` writes service/teams/default.json from ``default_team()``.
"""

from __future__ import annotations

import copy
import importlib
import logging
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
from autogen_agentchat.agents import AssistantAgent, UserProxyAgent
from autogen_agentchat.base import Team
from autogen_agentchat.conditions import MaxMessageTermination
from autogen_agentchat.teams import RoundRobinGroupChat
from autogen_core.tools import FunctionTool

from service.config import names_a_factory
from service.errors import ServiceError
from service.worker.conditions import SourceTextMentionTermination
from service.worker.demo_model import DemoChatCompletionClient
from service.worker.tools import calculator

log = logging.getLogger(__name__)

DEFAULT_TEAM = "default"
DEFAULT_TEAM_FILE = Path(__file__).resolve().parent.parent / "teams" / "default.json"
MASKED_SECRET = "**********"
DEFAULT_SYSTEM_MESSAGE = "You are the assistant of a durable chat service. Answer the user; use the calculator tool for arithmetic."

TeamBuilder = Callable[[], Team]


class TeamConfigError(ServiceError):
    """A team is misconfigured."""

    code = "internal"
    status = 500


def default_team(chunk_delay_s: float = 0.03) -> RoundRobinGroupChat:
    """The shipped team: the demo model's assistant and a user proxy that answers its questions ([[ask]])."""
    assistant = AssistantAgent(
        "assistant",
        model_client=DemoChatCompletionClient(chunk_size=1, chunk_delay_s=chunk_delay_s),
        tools=[FunctionTool(calculator, description="Evaluate an arithmetic expression.", name="calculator")],
        system_message=DEFAULT_SYSTEM_MESSAGE,
        model_client_stream=True,
        reflect_on_tool_use=True,
    )
    user = UserProxyAgent("user", description="The human user; asked when the assistant has a question.")
    # A normal reply ends with "[context: N]" and ends the run; a question does not: the user proxy speaks next.
    termination = SourceTextMentionTermination("[context:", sources=["assistant"]) | MaxMessageTermination(12)
    return RoundRobinGroupChat([assistant, user], termination_condition=termination)


def default_team_config() -> dict[str, Any]:
    config: dict[str, Any] = default_team().dump_component().model_dump(mode="json")
    return config


def dump_json(config: Mapping[str, Any]) -> bytes:
    return orjson.dumps(config, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def _drop_masked_keys(node: Any) -> Any:
    """Remove masked secrets anywhere in a config, so clients fall back to their environment variables."""
    if isinstance(node, dict):
        return {
            k: _drop_masked_keys(v) for k, v in node.items() if not (k == "api_key" and v == MASKED_SECRET)
        }
    if isinstance(node, list):
        return [_drop_masked_keys(v) for v in node]
    return node


def _load_component(config: dict[str, Any]) -> Team:
    with warnings.catch_warnings():
        # FunctionTool configs are exec'd source; configured team files are trusted (logged once at load).
        warnings.filterwarnings("ignore", message=r"[\s\S]*SECURITY WARNING", category=UserWarning)
        return Team.load_component(copy.deepcopy(config))


def _builder_from_file(name: str, path: Path) -> TeamBuilder:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TeamConfigError(f"team {name!r}: cannot read {path}: {exc.strerror or exc}") from exc
    try:
        config = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise TeamConfigError(f"team {name!r}: {path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or "provider" not in config:
        raise TeamConfigError(f"team {name!r}: {path} is not a component config (no 'provider')")
    config = _drop_masked_keys(config)
    try:
        _load_component(config)
    except Exception as exc:
        raise TeamConfigError(f"team {name!r}: {path} does not load: {type(exc).__name__}: {exc}") from exc
    if b"source_code" in raw:
        log.info("team %r: %s holds tool source code, which is executed on load (trusted file)", name, path)
    return lambda: _load_component(config)


def _builder_from_factory(name: str, spec: str) -> TeamBuilder:
    module_name, _, func_name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise TeamConfigError(f"team {name!r}: cannot import factory {spec!r}: {exc}") from exc
    try:
        team = factory()
    except Exception as exc:
        raise TeamConfigError(f"team {name!r}: factory {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(team, Team):
        raise TeamConfigError(f"team {name!r}: factory {spec!r} returned {type(team).__name__}, not a Team")
    built: TeamBuilder = factory
    return built


def _builder(name: str, spec: str) -> TeamBuilder:
    path = Path(spec)
    if path.exists() or not names_a_factory(spec):
        return _builder_from_file(name, path)
    return _builder_from_factory(name, spec)


class TeamRegistry:
    """Configured teams by name; ``default`` is always present."""

    def __init__(self, builders: Mapping[str, TeamBuilder]) -> None:
        if DEFAULT_TEAM not in builders:
            raise TeamConfigError(f"no {DEFAULT_TEAM!r} team configured")
        self._builders = dict(builders)

    @classmethod
    def from_config(cls, teams: Mapping[str, str] | None = None) -> TeamRegistry:
        """Load and check every team (a JSON file path or ``module:function``). Raises TeamConfigError."""
        specs = {DEFAULT_TEAM: str(DEFAULT_TEAM_FILE), **(teams or {})}
        return cls({name: _builder(name, spec) for name, spec in specs.items()})

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def builder(self, name: str) -> TeamBuilder | None:
        """What builds the team ``name`` (a live team is used again only for the builder that made it)."""
        return self._builders.get(name)

    def build(self, name: str) -> Team:
        """A fresh team object. A team is used for another run only when its run completed (a cancelled or failed
        team is broken): ``live_teams``."""
        builder = self._builders.get(name)
        if builder is None:
            raise TeamConfigError(f"unknown team {name!r} (configured: {', '.join(self.names())})")
        return builder()


def main(argv: list[str]) -> int:
    if argv != ["--dump-default"]:
        print("usage: python -m service.worker.teams --dump-default", file=sys.stderr)
        return 2
    DEFAULT_TEAM_FILE.parent.mkdir(parents=True, exist_ok=True)
    DEFAULT_TEAM_FILE.write_bytes(dump_json(default_team_config()))
    print(f"wrote {DEFAULT_TEAM_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
