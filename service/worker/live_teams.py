"""Live teams: the team object of a session's last completed run, kept in this process for its next run
(README "Configuration": ``live_teams``).

Building a team and loading a long conversation into it costs CPU in proportion to the conversation: AutoGen
validates every saved message again. A team kept alive already holds the conversation, so the next run of the
session in this process skips both. It is used only when it is exactly what the ordinary path would build:

* **Taken, not borrowed.** A run takes its session's team out of the cache; only a run that completes (its state
  saved and committed with its ``run_completed``) puts it back. A failed, cancelled, rolled-back, interrupted,
  stalled or abandoned run, a lost lease or an error while saving drops it: the next run builds afresh. So does
  a completed run whose saved text needed repair (README "Log entries"): the team still holds the broken text.
* **Same state, same team.** It is put back with the state it saved, and used again only when the claim's saved
  state is that state (nothing else wrote it meanwhile: another instance, a reset, a rollback that kept an older
  state) and the session's team is the same configured team. A store that knows the state it holds is the one
  this process saved (SQLite: the stored head is the one it wrote with that very state, see ``Store.claim``'s
  ``held``) hands back that very object, and the check is its identity; any other claim's state is compared with
  it in full.
* **Same start.** Before it is put back it is brought to what a fresh team would load for the next run
  (``state.next_round``): its termination condition is reset and its manager gets the fresh counters (turn,
  round-robin position, graph progress) with its thread kept. When more than that would differ, it is not kept.

The state is still saved durably with every run, so any instance (or this one after a restart) can take the next
run from the store; the cache is only a shortcut. It is bounded (least recently used first out); a team that
leaves it has its model clients closed.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from autogen_agentchat.agents import UserProxyAgent
from autogen_agentchat.base import Team, TerminationCondition
from autogen_core import AgentId

from service.worker.logs import error_line
from service.worker.state import NextRound, State
from service.worker.state_saver import StateSaver

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LiveTeam:
    """A team kept after a completed run: the team name and builder it was built from, the state it saved
    (``saved``: the very object given to ``Store.finish``, never changed), its fresh state (what ``prepare_state``
    merges onto) and its ``StateSaver`` (the dumps of its conversation, so its next save dumps only what the next
    run adds)."""

    team: Team
    team_name: str
    builder: object
    saved: State
    fresh: State
    saver: StateSaver

    def fits(self, team_name: str, builder: object, saved: dict[str, Any] | None) -> bool:
        """Whether this team may run a claim of ``team_name`` (built by ``builder``) whose saved state is ``saved``."""
        if team_name != self.team_name or builder is not self.builder or saved is None:
            return False
        # The store handed back the state this team saved (see the module docstring), or one to compare in full.
        return saved is self.saved or saved == self.saved


class _SavedStates(Mapping[str, State]):
    """The ``saved`` state of each live team, by session id."""

    def __init__(self, teams: Mapping[str, LiveTeam]) -> None:
        self._teams = teams

    def __getitem__(self, session_id: str) -> State:
        return self._teams[session_id].saved

    def __iter__(self) -> Iterator[str]:
        return iter(self._teams)

    def __len__(self) -> int:
        return len(self._teams)


class LiveTeams:
    """At most ``size`` live teams by session id, least recently used first out (``size`` 0: none kept)."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError("size must be >= 0")
        self.size = size
        self._teams: OrderedDict[str, LiveTeam] = OrderedDict()
        self.reused = 0  # runs that took a live team and ran it
        self.dropped = 0  # live teams found not to fit their session's next claim

    def __len__(self) -> int:
        return len(self._teams)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._teams

    @property
    def saved_states(self) -> Mapping[str, State]:
        """Per session, the state its live team saved: ``Store.claim``'s ``held`` (a live view, not a copy)."""
        return _SavedStates(self._teams)

    def peek(self, session_id: str) -> LiveTeam | None:
        """The session's live team, left in the cache."""
        return self._teams.get(session_id)

    def take(self, session_id: str) -> LiveTeam | None:
        """The session's live team, out of the cache (a run that does not complete never puts it back)."""
        return self._teams.pop(session_id, None)

    def put(self, session_id: str, live: LiveTeam) -> list[LiveTeam]:
        """Keep ``live`` for the session's next run; the teams pushed out (close their model clients)."""
        if self.size == 0:
            return [live]
        self._teams[session_id] = live
        self._teams.move_to_end(session_id)
        out: list[LiveTeam] = []
        while len(self._teams) > self.size:
            out.append(self._teams.popitem(last=False)[1])
        return out

    def drain(self) -> list[LiveTeam]:
        """Every live team, out of the cache (the pool stops)."""
        out = list(self._teams.values())
        self._teams.clear()
        return out


async def start_next_round(team: Team, next_round: NextRound) -> bool:
    """Bring a team that just completed a run to ``next_round.start``, what a fresh team would load: reset its
    termination condition and, when ``next_round.manager`` is set, reload that manager's state with its thread
    kept (loading the thread would validate the whole conversation again). False when the team is not a group
    chat this knows how to do that for (autogen-agentchat 0.7.5 internals): then it is not kept."""
    condition = getattr(team, "_termination_condition", None)
    if condition is not None:
        if not isinstance(condition, TerminationCondition):
            return False
        await condition.reset()  # AutoGen resets it when it ends a run; a fresh team's is fresh
    if next_round.manager is None:
        return True
    manager = await _manager(team, next_round.manager)
    if manager is None:
        return False
    thread = manager._message_thread
    state = copy.deepcopy({**next_round.start["agent_states"][next_round.manager], "message_thread": []})
    await manager.load_state(state)  # a GraphFlow manager keeps parts of the dict: a copy of its own
    manager._message_thread = thread
    return True


def release_proxies(team: Team, proxies: list[UserProxyAgent]) -> None:
    """Unhook a kept team's user proxies from the run that wired them (the next run wires its own), so the team
    does not keep that run (and its claim's state) alive."""
    for proxy in proxies:
        proxy.input_func = _no_input
        proxy._is_async = True


async def _no_input(prompt: str, cancellation_token: Any = None) -> str:
    raise RuntimeError("a live team's user proxy asked for input outside a run")


async def _manager(team: Team, name: str) -> Any:
    """The team's group chat manager agent named ``name``, when it has the attributes this module relies on."""
    runtime = getattr(team, "_runtime", None)
    topic_type = getattr(team, "_group_chat_manager_topic_type", None)
    team_id = getattr(team, "_team_id", None)
    if runtime is None or getattr(team, "_group_chat_manager_name", None) != name:
        return None
    if not (isinstance(topic_type, str) and isinstance(team_id, str)):
        return None
    try:
        manager = await runtime.try_get_underlying_agent_instance(AgentId(topic_type, team_id))
    except Exception as exc:
        log.debug("no manager instance to keep the team alive: %s", error_line(exc))
        return None
    if not isinstance(getattr(manager, "_message_thread", None), list) or not hasattr(manager, "load_state"):
        return None
    return manager
