"""The StateSaver (service/worker/state_saver.py, README "Architecture": "A live team's turn costs what the turn
adds") gives what AutoGen's ``team.save_state()`` gives even when a save is not alone: two saves at once, an agent
whose ``save_state`` awaits while another task changes the team, an agent whose ``save_state`` fails, a team whose
internals it cannot read. (Every team shape, run after run: tests/test_live_teams.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import pytest
from autogen_agentchat.agents import AssistantAgent, BaseChatAgent
from autogen_agentchat.base import Response
from autogen_agentchat.messages import BaseChatMessage, TextMessage
from autogen_agentchat.teams import RoundRobinGroupChat
from autogen_core import CancellationToken
from autogen_core.models import UserMessage

import service.worker.state_saver as state_saver
from service.worker.demo_model import DemoChatCompletionClient
from service.worker.state_saver import StateSaver


class SlowToSave(BaseChatAgent):
    """An agent whose save_state awaits (as one doing I/O would) and can be made to fail."""

    def __init__(self) -> None:
        super().__init__("slow", "saves slowly")
        self.saving = asyncio.Event()
        self.go_on = asyncio.Event()
        self.go_on.set()
        self.fail = False

    @property
    def produced_message_types(self) -> Sequence[type[BaseChatMessage]]:
        return (TextMessage,)

    async def on_messages(self, messages: Sequence[BaseChatMessage], token: CancellationToken) -> Response:
        return Response(chat_message=TextMessage(content="ok", source=self.name))

    async def on_reset(self, token: CancellationToken) -> None:
        pass

    async def save_state(self) -> Mapping[str, Any]:
        self.saving.set()
        await self.go_on.wait()
        if self.fail:
            raise RuntimeError("could not save")
        return {"saved": True}


async def a_team() -> tuple[RoundRobinGroupChat, AssistantAgent, SlowToSave]:
    assistant = AssistantAgent(
        "assistant", model_client=DemoChatCompletionClient(chunk_size=1, chunk_delay_s=0.0)
    )
    slow = SlowToSave()
    team = RoundRobinGroupChat([assistant, slow], max_turns=2)
    await team.run(task="hello")
    return team, assistant, slow


def context_of(agent: AssistantAgent) -> list[Any]:
    messages: list[Any] = agent._model_context._messages
    return messages


async def test_two_saves_at_once_give_the_state_and_keep_the_conversation() -> None:
    team, assistant, slow = await a_team()
    saver = StateSaver(team)
    before = len(context_of(assistant))
    slow.go_on.clear()
    saves = asyncio.gather(saver.save(), saver.save())
    await asyncio.wait_for(slow.saving.wait(), 10)  # the first save is suspended with the lists swapped out
    slow.go_on.set()
    first, second = await asyncio.wait_for(saves, 10)
    expected = await team.save_state()
    assert first == expected and second == expected
    assert len(context_of(assistant)) == before > 0


async def test_a_message_added_while_the_team_saves_is_kept_and_saved_next_time() -> None:
    team, assistant, slow = await a_team()
    saver = StateSaver(team)
    await saver.save()
    slow.go_on.clear()
    slow.saving.clear()
    saving = asyncio.create_task(saver.save())
    await asyncio.wait_for(slow.saving.wait(), 10)  # the lists are swapped out now
    await assistant._model_context.add_message(UserMessage(content="added meanwhile", source="user"))
    slow.go_on.set()
    await asyncio.wait_for(saving, 10)
    assert [m.content for m in context_of(assistant)][-1] == "added meanwhile"  # not lost
    assert await saver.save() == await team.save_state()  # and saved from then on


async def test_a_failing_save_puts_every_list_back() -> None:
    team, assistant, slow = await a_team()
    saver = StateSaver(team)
    before = list(context_of(assistant))
    slow.fail = True
    with pytest.raises(RuntimeError, match="could not save"):
        await saver.save()
    slow.fail = False
    assert context_of(assistant) == before
    assert await saver.save() == await team.save_state()


async def test_a_team_it_cannot_read_is_saved_by_autogen(monkeypatch: pytest.MonkeyPatch) -> None:
    team, _, _ = await a_team()

    async def unreadable(*args: Any) -> Any:
        raise AttributeError("no such internal")

    monkeypatch.setattr(state_saver, "_slots", unreadable)
    saver = StateSaver(team)
    assert await saver.save() == await team.save_state()
    assert saver.dumped == 0  # nothing kept: AutoGen's own save


async def test_a_message_that_needs_repair_is_found_though_only_new_messages_are_checked() -> None:
    """``clean_json`` checks only what the save dumped anew: a half UTF-16 pair in a new message is still found
    (the state is repaired and reported unclean), and the messages checked before are not serialised again."""
    team, assistant, _ = await a_team()
    saver = StateSaver(team)
    state, clean = saver.clean_json(await saver.save())
    assert clean and state == await team.save_state()
    await assistant._model_context.add_message(UserMessage(content="half a pair: \ud800", source="user"))
    saved = await saver.save()
    view = saver._unchecked_part(saved)
    assert view is not None
    new = view["agent_states"]["assistant"]["agent_state"]["llm_context"]["messages"]
    assert [m["content"] for m in new] == ["half a pair: \ud800"]
    repaired, clean = saver.clean_json(saved)
    assert not clean
    assert orjson.dumps(repaired)  # writable now: the half pair became U+FFFD
    assert "half a pair: \ufffd" in orjson.dumps(repaired).decode()


async def test_messages_of_a_save_that_failed_are_checked_by_the_next() -> None:
    """A save that raised had dumped its new messages already: the next save's check still serialises them (only
    a check that passed marks dumps as checked), so a half pair among them is found."""
    team, assistant, slow = await a_team()
    saver = StateSaver(team)
    saver.clean_json(await saver.save())
    await assistant._model_context.add_message(UserMessage(content="half a pair: \ud800", source="user"))
    slow.fail = True
    with pytest.raises(RuntimeError, match="could not save"):
        await saver.save()
    slow.fail = False
    _, clean = saver.clean_json(await saver.save())
    assert not clean
