"""The piece diff (service/queue/state_pieces.py, README "Team state") with a PiecesMemo gives exactly the plan it
gives without one, whatever changed between two saves, and serialises only what was added when the lists' first
items are the very objects it planned last time."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

import service.queue.state_pieces as state_pieces
from service.queue.state_pieces import Manifest, PiecesMemo, StateSave, plan_save


def team_state(thread: list[Any], messages: list[Any], turn: int = 0) -> dict[str, Any]:
    return {
        "type": "TeamState",
        "agent_states": {
            "manager": {"message_thread": thread, "current_turn": turn},
            "assistant": {"agent_state": {"llm_context": {"messages": messages}}},
        },
    }


def same(a: StateSave, b: StateSave) -> bool:
    return (a.head, a.writes, a.manifest, a.clear) == (b.head, b.writes, b.manifest, b.clear)


def saves(
    memo: PiecesMemo | None, states: list[dict[str, Any]], stored: list[Manifest | None]
) -> list[StateSave]:
    return [plan_save(state, manifest, memo) for state, manifest in zip(states, stored, strict=True)]


def message(n: int) -> dict[str, Any]:
    return {"source": "user" if n % 2 else "assistant", "content": f"message {n} \x00 \U0001f600", "n": n}


def test_a_memo_changes_nothing_in_the_plan() -> None:
    """A save after another: appended, nothing new, an item edited (a new object), a list shrunk, a list
    replaced by equal copies, a path gone and one new, and a stored manifest the memo did not plan (another
    writer): with a memo, each plan is the plan without one."""
    thread = [message(n) for n in range(3)]
    messages = [message(n) for n in range(2)]
    states = [team_state(thread, messages)]
    thread = [*thread, message(3), message(4)]
    states.append(team_state(thread, [*messages, message(9)], turn=1))  # appended
    states.append(team_state(list(thread), [*messages, message(9)], turn=2))  # nothing new
    thread = [thread[0], {**thread[1], "content": "edited"}, *thread[2:]]
    states.append(team_state(thread, messages))  # an item edited in the middle, one dropped
    states.append(team_state(copy.deepcopy(thread), messages))  # equal copies, other objects
    states.append({"agent_states": {"other": {"message_buffer": thread}}})  # paths gone, a new one
    states.append(team_state(thread, messages))
    # The manifest the store holds before each save: the previous plan's, but for one save another writer made.
    plans = saves(None, states, [None] * len(states))
    stored: list[Manifest | None] = [None, *(p.manifest for p in plans[:-1])]
    # Someone else saved in between, before a save whose lists hold the very objects the memo planned.
    stored[2] = plan_save(team_state(thread[:2], messages), None).manifest
    without = saves(None, states, stored)
    memo = PiecesMemo()
    with_memo = saves(memo, states, stored)
    for n, (a, b) in enumerate(zip(without, with_memo, strict=True)):
        assert same(a, b), n


def test_with_a_memo_a_save_serialises_what_was_added(monkeypatch: pytest.MonkeyPatch) -> None:
    written = [0]

    class Counting:
        def dumps(self, value: Any) -> bytes:
            text = orjson.dumps(value)
            written[0] += len(text)
            return text

        def __getattr__(self, name: str) -> Any:
            return getattr(orjson, name)

    monkeypatch.setattr(state_pieces, "orjson", Counting())
    per_save: dict[int, int] = {}
    for memo in (PiecesMemo(), None):
        thread: list[Any] = []
        stored: Manifest | None = None
        for n in range(300):
            thread = [*thread, message(n)]  # a new list each save, the same item objects
            before = written[0]
            stored = plan_save(team_state(thread, []), stored, memo).manifest
            if n in (20, 299):
                per_save[n if memo is not None else -n] = written[0] - before
    assert per_save[299] < per_save[20] * 1.2  # with a memo: what was added, plus the head
    assert per_save[-299] > per_save[-20] * 5  # without: the whole list every time (the counter sees it)
