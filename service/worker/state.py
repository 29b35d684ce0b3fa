"""Team state between runs: what a run starts from, decided here and only here (README "Guarantees").

AutoGen's state (``team.save_state()``) is plain JSON: ``{"type": "TeamState", "agent_states": {name: ...}}``
holding one ``ChatAgentContainerState`` per participant (its agent's own state in ``agent_state``, a nested
team's ``TeamState`` there for a nested team) and one state for the group chat manager (the only entry with a
``message_thread``; a GraphFlow's has no ``type``). The rules:

* **Team evolution.** The state to load is built on the FRESH team's own ``save_state()``: every participant
  that has a saved state of the same kind keeps it (its memory), a new or changed participant starts empty, a
  removed one is dropped. ``BaseGroupChat.load_state`` alone would refuse any difference for good.
* **Each run starts a fresh round of the team's limits.** The manager keeps its conversation thread (and a
  Swarm its current speaker); its turn counter, round-robin position and graph progress come from the fresh
  team. AutoGen resets these only when a run ends by its termination condition, so a cancelled run would leave
  them behind (``max_turns`` firing early). A manager of another kind (round-robin became selector) starts from
  its fresh state: a new thread, with the agents remembering the conversation.
* **No dangling tool calls.** A model context that holds an assistant's tool calls without their results (the
  run stopped while a tool ran) gets an error result for each, so OpenAI-compatible providers accept the
  conversation again (they refuse a tool call with no result, HTTP 400).
* **Swarm hand-offs to the user.** When the last hand-off in a Swarm's thread targets someone outside the team
  (the documented human-in-the-loop pattern), the next user message is a ``HandoffMessage`` back to the agent
  that handed off, as AutoGen requires (``resume_task``).

A team kept alive between runs (README "Configuration": ``live_teams``) must start its next run from exactly
the same state: ``next_round`` says what it lacks for that, with the same rules (``prepare_state`` itself), and
looks only at what the run added: the cost of a turn does not grow with the conversation.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from autogen_agentchat.messages import HandoffMessage

from service.models import Draft, iso, utcnow
from service.text import clean_json

CANCELLED_TOOL_RESULT = "The tool call was stopped before it finished; its result is unknown."
TEAM_STATE = "TeamState"
USER = "user"

State = dict[str, Any]


def prepare_state(
    saved: Mapping[str, Any] | None, fresh: Mapping[str, Any], *, checked: Mapping[str, Any] | None = None
) -> State:
    """The state to load into a freshly built team for a new run (see the module docstring).

    ``saved``: the state saved by the session's last finished run (None: nothing saved yet).
    ``fresh``: ``save_state()`` of the freshly built team, before anything is loaded into it.
    ``checked``: None, or a state known to be in order (clean text, no tool call without its result) whose model
    contexts ``saved``'s only append to (the state the team started its last run from): then only the messages
    after them are looked at, and ``saved``'s text is taken as clean. Text is otherwise repaired
    (``service.text``): a state saved before repair existed may hold halves of UTF-16 pairs that no provider
    accepts.
    Returns a new dict that shares ``saved``'s unchanged parts (its message lists are not copied, which would cost
    as much as the conversation): neither argument is changed, and changing the result would change ``saved``."""
    if saved is not None and checked is None:
        saved = clean_json(dict(saved))[0]
    return _merge_team(saved, copy.deepcopy(dict(fresh)), checked)


@dataclass(frozen=True, slots=True)
class NextRound:
    """What a team that saved a state at the end of a completed run lacks to be, for its next run, exactly what a
    freshly built team would load: ``start`` (``prepare_state(saved, fresh)``). ``manager`` names the one group
    chat manager whose state differs (its counters: turn, round-robin position, graph progress, not its thread),
    or None when nothing differs."""

    start: State
    manager: str | None


def next_round(
    saved: Mapping[str, Any], fresh: Mapping[str, Any], checked: Mapping[str, Any]
) -> NextRound | None:
    """For a team kept alive after a completed run: ``saved`` is what it saved (text known clean), ``fresh`` its
    fresh state, ``checked`` the state its run started from. None when the next run would start from more than a
    reloaded top manager (a tool call left without its result, a nested team's progress): build that team
    afresh. Looks at what the run added, not at the whole conversation."""
    start = prepare_state(saved, fresh, checked=checked)
    top = {k: v for k, v in start.items() if k != "agent_states"}
    if top != {k: v for k, v in saved.items() if k != "agent_states"}:
        return None
    before, after = _agents(saved), _agents(start)
    if before.keys() != after.keys():
        return None
    # The lists are shared with ``saved`` where nothing changed, so these comparisons stop at their identity.
    changed = [name for name, part in after.items() if part != before[name]]
    if not changed:
        return NextRound(start, None)
    if len(changed) == 1 and _is_manager(after[changed[0]]):
        return NextRound(start, changed[0])
    return None


def participant_names(state: Mapping[str, Any]) -> list[str]:
    """The participants of a team state (the manager left out)."""
    return [name for name, part in _agents(state).items() if not _is_manager(part)]


def resume_task(state: Mapping[str, Any], text: str) -> str | HandoffMessage:
    """The task of a run answering ``text``: the text itself, or, when the team is a Swarm whose last hand-off
    went to someone outside it (the user), a ``HandoffMessage`` from the user back to the agent that handed off
    (else AutoGen refuses the run: "existing handoff target user is not one of the participants")."""
    names = participant_names(state)
    manager = next((p for p in _agents(state).values() if _is_manager(p)), None)
    if manager is None or "current_speaker" not in manager:
        return text
    last = next(
        (m for m in reversed(manager.get("message_thread") or []) if m.get("type") == "HandoffMessage"), None
    )
    if last is None or last.get("target") in names:
        return text
    target = last.get("source") if last.get("source") in names else manager.get("current_speaker")
    if target not in names:
        target = names[0]
    return HandoffMessage(source=USER, target=str(target), content=text)


def repair_tool_calls(messages: list[Any], start: int = 0) -> list[Any]:
    """A model context's messages with an error result added for every assistant tool call that has none: the
    list itself when none lacks one. Only the messages from ``start`` on are looked at (those before are known
    complete)."""
    tail: list[Any] = []
    changed = False
    i = start
    while i < len(messages):
        message = messages[i]
        tail.append(message)
        i += 1
        calls = _tool_calls(message)
        if not calls:
            continue
        after = messages[i] if i < len(messages) and _is_results(messages[i]) else None
        results = list(after.get("content") or []) if after is not None else []
        answered = {r.get("call_id") for r in results if isinstance(r, dict)}
        missing = [
            {
                "content": CANCELLED_TOOL_RESULT,
                "name": c.get("name", ""),
                "call_id": c.get("id"),
                "is_error": True,
            }
            for c in calls
            if c.get("id") not in answered
        ]
        if not missing:
            continue
        changed = True
        if after is not None:
            i += 1  # replaced by the completed results below
        tail.append({**(after or {}), "type": "FunctionExecutionResultMessage", "content": results + missing})
    return messages[:start] + tail if changed else messages


def remember_partial(state: Mapping[str, Any], cut: Draft) -> State:
    """After a cancel mid-stream the agents remember what the user saw: the cut-off message joins the manager's
    thread, the speaking agent's model context (as its own reply) and the other participants' buffers."""
    message: dict[str, Any] = {
        "id": cut.message_id,
        "source": cut.source,
        "models_usage": None,
        "metadata": {},
        "created_at": iso(utcnow()),
        "content": cut.text,
        "type": "TextMessage",
    }
    agents = {}
    for name, part in _agents(state).items():
        part = copy.deepcopy(part)
        if _is_manager(part):
            part["message_thread"] = [*(part.get("message_thread") or []), message]
        elif name == cut.source:
            context = part.get("agent_state", {}).get("llm_context")
            if isinstance(context, dict) and isinstance(context.get("messages"), list):
                reply = {
                    "content": cut.text,
                    "thought": None,
                    "source": cut.source,
                    "type": "AssistantMessage",
                }
                context["messages"].append(reply)
        elif isinstance(part, dict) and isinstance(part.get("message_buffer"), list):
            part["message_buffer"].append(message)
        agents[name] = part
    return {**state, "agent_states": agents}


def drop_delivered_buffers(state: Mapping[str, Any]) -> State:
    """After a mid-turn cancel, the speaking agent's container still buffers the messages it had already added
    to its model context (the buffer is cleared only when a turn completes), so loading the state would deliver
    them twice. Drop such a buffer when its messages are the user messages at the end of the agent's context."""
    agents = dict(state.get("agent_states", {}))
    for name, container in agents.items():
        if not isinstance(container, dict) or not container.get("message_buffer"):
            continue
        context = container.get("agent_state", {}).get("llm_context", {}).get("messages", [])
        if _delivered(container["message_buffer"], context):
            agents[name] = {**container, "message_buffer": []}
    return {**state, "agent_states": agents}


# --- internals ----------------------------------------------------------------------------------------------
def _agents(state: Mapping[str, Any] | None) -> dict[str, Any]:
    agents = state.get("agent_states") if isinstance(state, Mapping) else None
    return dict(agents) if isinstance(agents, Mapping) else {}


def _is_manager(part: Any) -> bool:
    return isinstance(part, dict) and "message_thread" in part


def _merge_team(saved: Mapping[str, Any] | None, fresh: State, checked: Mapping[str, Any] | None) -> State:
    old_agents, checked_agents = _agents(saved), _agents(checked)
    names = participant_names(fresh)
    merged: dict[str, Any] = {}
    for name, part in _agents(fresh).items():
        old = old_agents.get(name)
        merged[name] = (
            _merge_manager(old, part, names)
            if _is_manager(part)
            else _merge_participant(old, part, checked_agents.get(name))
        )
    return {**fresh, "agent_states": merged}


def _merge_participant(old: Any, fresh: Any, checked: Any) -> Any:
    if not (isinstance(old, dict) and isinstance(fresh, dict)) or old.get("type") != fresh.get("type"):
        return fresh
    old_inner, fresh_inner = old.get("agent_state"), fresh.get("agent_state")
    if not (isinstance(old_inner, dict) and isinstance(fresh_inner, dict)):
        return fresh
    if old_inner.get("type") != fresh_inner.get("type"):
        return fresh  # another kind of agent under the same name: its old state cannot load
    checked_inner = checked.get("agent_state") if isinstance(checked, dict) else None
    checked_inner = checked_inner if isinstance(checked_inner, dict) else None
    if fresh_inner.get("type") == TEAM_STATE:
        inner = _merge_team(old_inner, fresh_inner, checked_inner)
    else:
        inner = _repair_contexts(old_inner, checked_inner)
        # An agent wrapping a team (SocietyOfMindAgent's inner_team_state).
        for key, value in fresh_inner.items():
            if isinstance(value, dict) and value.get("type") == TEAM_STATE:
                inner[key] = _merge_team(old_inner.get(key), value, (checked_inner or {}).get(key))
    return {**old, "agent_state": inner}


def _merge_manager(old: Any, fresh: State, names: Collection[str]) -> State:
    if not isinstance(old, dict) or old.get("type") != fresh.get("type"):
        return fresh
    merged = {**fresh, "message_thread": old.get("message_thread") or []}
    if "current_speaker" in fresh and old.get("current_speaker") in names:
        # A Swarm goes on with the agent that has the floor.
        merged["current_speaker"] = old["current_speaker"]
    return merged


def _repair_contexts(agent_state: State, checked: State | None) -> State:
    context = agent_state.get("llm_context")
    if not isinstance(context, dict) or not isinstance(context.get("messages"), list):
        return dict(agent_state)
    messages = context["messages"]
    known = _context_messages(checked)
    start = len(known) if known is not None and len(known) <= len(messages) else 0
    repaired = repair_tool_calls(messages, start)
    if repaired is messages:
        return dict(agent_state)
    return {**agent_state, "llm_context": {**context, "messages": repaired}}


def _context_messages(agent_state: State | None) -> list[Any] | None:
    context = agent_state.get("llm_context") if agent_state is not None else None
    messages = context.get("messages") if isinstance(context, dict) else None
    return messages if isinstance(messages, list) else None


def _tool_calls(message: Any) -> list[dict[str, Any]]:
    if not isinstance(message, dict) or message.get("type") != "AssistantMessage":
        return []
    content = message.get("content")
    return [c for c in content if isinstance(c, dict)] if isinstance(content, list) else []


def _is_results(message: Any) -> bool:
    return isinstance(message, dict) and message.get("type") == "FunctionExecutionResultMessage"


def _delivered(buffer: list[dict[str, Any]], context: list[dict[str, Any]]) -> bool:
    tail = list(context)
    while tail and tail[-1].get("type") != "UserMessage":
        tail.pop()  # what the agent produced in the cancelled turn (a tool call, its result)
    if len(tail) < len(buffer):
        return False
    added = tail[len(tail) - len(buffer) :]
    return all(
        isinstance(b.get("content"), str)
        and (b.get("source"), b.get("content")) == (c.get("source"), c.get("content"))
        for b, c in zip(buffer, added, strict=True)
    )
