"""A team's state saved with work that follows what its run added (README "Architecture": "A live team's turn
costs what the turn adds", and "Benchmarks": ``bench/long.py``).

AutoGen's ``team.save_state()`` dumps every message of the conversation, every time it is called: the manager's
thread, each agent container's buffer and each agent's model context, each a pydantic dump of every message, and
then copies the result again in each pydantic wrapper (agent, container, team). The state is saved after every
run, so with a session's team kept alive that was most of a late turn's CPU. A ``StateSaver`` gives exactly what
``team.save_state()`` gives, keeping the dumps of those growing lists from one save of the team to the next:

* Every growing list it knows (a group chat manager's ``_message_thread``, a ``ChatAgentContainer``'s
  ``_message_buffer``, the ``_messages`` of an AssistantAgent's model context) has a ``ListDumps``: the message
  objects it dumped last time and their dumps. A save dumps only the messages after the longest prefix of the very
  same objects (compared by identity, so a list cleared or replaced is dumped again), with AutoGen's own dump for
  that kind of list.
* AutoGen's own ``team.save_state()`` then runs with those lists swapped for empty ones, so it saves the small
  rest (counters, current speaker, every wrapper's ``type`` and ``version``, agents this module does not know), and
  the kept dumps take the empty lists' places in what it returned.

This relies on two facts of autogen-agentchat/autogen-core 0.7.5: AutoGen never changes a message in place once
it is in one of those lists (messages are values there; the lists only grow, are cleared or are replaced), and
the owners save those lists as the dump of each item. So lists are swapped only on the exact classes listed below,
whose ``save_state`` is AutoGen's own; anything else is saved by AutoGen as it is. The tests check that it gives
what ``team.save_state()`` gives for every team shape, run after run (``tests/test_live_teams.py``). Known
in-place changes in AutoGen 0.7.5, none reachable here: its OpenAI client (for ``claude-*`` models) and its
Anthropic client strip trailing spaces from a prompt's last ``AssistantMessage``, but a run's prompts end with its
task (a user message); the ``ReasoningModelContext`` of its documentation clears ``thought``, but that class is
not one of the contexts listed below.

The team must not be running while it saves (AutoGen's rule too). The dumps returned are shared with the next
saves: the state is data to read (serialise, compare, store), never to change in place.
"""

from __future__ import annotations

import asyncio
import logging
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.base import Team
from autogen_agentchat.teams import BaseGroupChat
from autogen_agentchat.teams._group_chat._chat_agent_container import ChatAgentContainer
from autogen_agentchat.teams._group_chat._graph._digraph_group_chat import GraphFlowManager
from autogen_agentchat.teams._group_chat._round_robin_group_chat import RoundRobinGroupChatManager
from autogen_agentchat.teams._group_chat._selector_group_chat import SelectorGroupChatManager
from autogen_agentchat.teams._group_chat._swarm_group_chat import SwarmGroupChatManager
from autogen_core import AgentId
from autogen_core.model_context import (
    BufferedChatCompletionContext,
    ChatCompletionContext,
    HeadAndTailChatCompletionContext,
    TokenLimitedChatCompletionContext,
    UnboundedChatCompletionContext,
)
from autogen_core.model_context._chat_completion_context import ChatCompletionContextState

from service.queue.state_pieces import PiecesMemo
from service.text import clean_json

log = logging.getLogger(__name__)

State = dict[str, Any]
Dump = Callable[[Sequence[Any]], list[Any]]

# Managers whose save_state puts ``[m.dump() for m in self._message_thread]`` at "message_thread".
MANAGERS = (RoundRobinGroupChatManager, SelectorGroupChatManager, SwarmGroupChatManager, GraphFlowManager)
# Model contexts whose save_state is ChatCompletionContext's: ``ChatCompletionContextState(messages=self._messages)``.
CONTEXTS = (
    UnboundedChatCompletionContext,
    BufferedChatCompletionContext,
    HeadAndTailChatCompletionContext,
    TokenLimitedChatCompletionContext,
)


def dump_messages(messages: Sequence[Any]) -> list[Any]:
    """A thread's or a buffer's items as their owners save them (``BaseChatMessage.dump()``)."""
    return [message.dump() for message in messages]


def dump_llm_messages(messages: Sequence[Any]) -> list[Any]:
    """A model context's items as ``ChatCompletionContext.save_state`` saves them."""
    dumped: list[Any] = ChatCompletionContextState(messages=list(messages)).model_dump()["messages"]
    return dumped


class ListDumps:
    """The dumps of one growing list, kept in step with it: ``of(items)`` dumps only what is new."""

    def __init__(self, dump: Dump) -> None:
        self._dump = dump
        self._objects: list[Any] = []  # the items dumped, in order
        self._dumps: list[Any] = []
        self.dumped = 0  # items dumped so far (tests count them)
        self.checked = 0  # the first dumps found writable as they are (``StateSaver.clean_json``)

    def __len__(self) -> int:
        return len(self._dumps)

    def of(self, items: list[Any]) -> list[Any]:
        """The dumps of ``items`` (a new list; its items are shared with later calls)."""
        same = same_prefix(self._objects, items)
        del self._objects[same:], self._dumps[same:]
        self.checked = min(self.checked, same)
        if same < len(items):
            tail = items[same:]
            self._dumps.extend(self._dump(tail))
            self._objects.extend(tail)
            self.dumped += len(tail)
        return list(self._dumps)


def same_prefix(kept: list[Any], items: list[Any]) -> int:
    """How many of ``kept`` open ``items`` (the same objects, in order)."""
    if len(kept) <= len(items) and all(map(operator.is_, kept, items)):
        return len(kept)
    for n, (a, b) in enumerate(zip(kept, items, strict=False)):
        if a is not b:
            return n
    return min(len(kept), len(items))


@dataclass(slots=True)
class _Slot:
    """A growing list: ``getattr(owner, attr)``, saved at ``path`` in the team's state."""

    owner: Any
    attr: str
    path: tuple[str, ...]
    dumps: ListDumps


@dataclass(slots=True)
class StateSaver:
    """Saves ``team``'s state as ``team.save_state()`` does (see the module docstring)."""

    team: Team
    _slots: list[_Slot] | None = field(default=None)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The plan of the last save's pieces, for Store.finish (state_pieces.PiecesMemo).
    pieces: PiecesMemo = field(default_factory=PiecesMemo)
    # The last state saved (what ``clean_json`` can check in part).
    _last: State | None = field(default=None)

    @property
    def dumped(self) -> int:
        """Messages dumped by this saver so far."""
        return sum(slot.dumps.dumped for slot in self._slots or ())

    async def save(self) -> State:
        """What ``team.save_state()`` returns. Saves never overlap (a lock), and nothing else may change the team
        while it saves (AutoGen's rule too); if something did, the lists get what was added meanwhile and this
        save and the next ones are AutoGen's own."""
        async with self._lock:
            if self._slots is None:
                self._slots = await self._find_slots()
            self._last = None
            state = await self._save(self._slots)
            self._last = state
            return state

    def clean_json(self, state: State) -> tuple[State, bool]:
        """``text.clean_json`` of the state ``save`` just returned, as ``(state, clean)``, serialising only the
        kept dumps not yet found writable (``ListDumps.checked``: a check that passes moves it on; one that fails
        leaves it, and a state that needed repair is not kept with its team anyway)."""
        view = self._unchecked_part(state)
        if view is not None and _writable(view):
            for slot in self._slots or ():
                slot.dumps.checked = len(slot.dumps)
            return state, True
        value, text = clean_json(state)  # all of it: the repair walks the whole state anyway
        return value, text is not None

    def _unchecked_part(self, state: State) -> State | None:
        """``state`` with each kept list cut to its dumps not yet checked (copies along the way), or None when
        ``state`` is not the last save's with kept dumps (then all of it is checked)."""
        if state is not self._last or not self._slots:
            return None
        view: State = dict(state)
        for slot in self._slots:
            node = view
            for key in slot.path[:-1]:
                child = node.get(key)
                if not isinstance(child, dict):
                    return None
                node[key] = node = dict(child)
            items = node.get(slot.path[-1])
            if not isinstance(items, list) or len(items) != len(slot.dumps):
                return None
            node[slot.path[-1]] = items[slot.dumps.checked :]
        return view

    async def _find_slots(self) -> list[_Slot]:
        team = self.team
        if not (isinstance(team, BaseGroupChat) and _is_group_chat(team)):
            return []
        try:
            return await _slots(team, ())
        except Exception:  # AutoGen internals not as 0.7.5 has them: save the ordinary way
            log.warning("cannot find the growing lists of team %s; its state is saved by AutoGen", type(team))
            return []

    async def _save(self, slots: list[_Slot]) -> State:
        lists: list[list[Any]] = []
        for slot in slots:
            items = getattr(slot.owner, slot.attr, None)
            if not isinstance(
                items, list
            ):  # not as AutoGen 0.7.5 has it: save the ordinary way, keep nothing
                self._slots = []
                return dict(await self.team.save_state())
            lists.append(items)
        dumps = [slot.dumps.of(items) for slot, items in zip(slots, lists, strict=True)]
        stand_ins: list[list[Any]] = [[] for _ in slots]
        try:
            for slot, stand_in in zip(slots, stand_ins, strict=True):
                setattr(slot.owner, slot.attr, stand_in)
            state = dict(await self.team.save_state())
        finally:
            intact = _put_back(slots, lists, stand_ins)
        if not intact:
            self._slots = []
            return dict(await self.team.save_state())
        for slot, dumped in zip(slots, dumps, strict=True):
            parent = _at(state, slot.path[:-1])
            if parent is None or parent.get(slot.path[-1]) != []:
                # Not where AutoGen 0.7.5 puts it: save the ordinary way, and keep nothing.
                self._slots = []
                return dict(await self.team.save_state())
            parent[slot.path[-1]] = dumped
        return state


def _writable(value: Any) -> bool:
    """Whether orjson writes ``value`` as it is (no half UTF-16 pair, nothing JSON cannot carry)."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True


def _put_back(slots: list[_Slot], lists: list[list[Any]], stand_ins: list[list[Any]]) -> bool:
    """Put each list back in place of its empty stand-in. False when something touched a stand-in during the
    save (an agent's ``save_state`` that awaited while another task changed the team): what was added to a
    stand-in is added to the list, and a list replaced meanwhile stays replaced."""
    intact = True
    for slot, items, stand_in in zip(slots, lists, stand_ins, strict=True):
        current = getattr(slot.owner, slot.attr, None)
        if current is not stand_in:
            intact = False
            continue
        if stand_in:
            items.extend(stand_in)
            intact = False
        setattr(slot.owner, slot.attr, items)
    return intact


def _is_group_chat(team: object) -> bool:
    return isinstance(team, BaseGroupChat) and type(team).save_state is BaseGroupChat.save_state


async def _slots(team: BaseGroupChat, prefix: tuple[str, ...]) -> list[_Slot]:
    """The growing lists of a group chat (nested teams included) and where its state holds them."""
    if not team._initialized:
        await team._init(team._runtime)
    runtime, key = team._runtime, team._team_id
    slots: list[_Slot] = []
    names, topics = team._participant_names, team._participant_topic_types
    for name, topic in zip(names, topics, strict=True):
        container: Any = await runtime.try_get_underlying_agent_instance(AgentId(topic, key))
        if type(container) is not ChatAgentContainer:
            continue
        at = (*prefix, "agent_states", name)
        slots.append(_Slot(container, "_message_buffer", (*at, "message_buffer"), ListDumps(dump_messages)))
        agent = container._agent
        if _is_group_chat(agent):
            assert isinstance(agent, BaseGroupChat)
            slots.extend(await _slots(agent, (*at, "agent_state")))
        elif type(agent) is AssistantAgent:
            context = agent._model_context
            if type(context) in CONTEXTS and type(context).save_state is ChatCompletionContext.save_state:
                path = (*at, "agent_state", "llm_context", "messages")
                slots.append(_Slot(context, "_messages", path, ListDumps(dump_llm_messages)))
    manager: Any = await runtime.try_get_underlying_agent_instance(
        AgentId(team._group_chat_manager_topic_type, key)
    )
    if type(manager) in MANAGERS:
        path = (*prefix, "agent_states", team._group_chat_manager_name, "message_thread")
        slots.append(_Slot(manager, "_message_thread", path, ListDumps(dump_messages)))
    return slots


def _at(state: Any, path: Sequence[str]) -> dict[str, Any] | None:
    node = state
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None
