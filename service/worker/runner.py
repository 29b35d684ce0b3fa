"""One claim = one run: build a fresh team, load its state, stream the run into the log, finish, save state.

The claim already committed the run's ``run_started`` entry and brought the saved state along, so the team
starts without another round trip to the store. Every durable entry is appended (committed) before it is
published to the hub; streaming chunks go out live only. The run stops through its CancellationToken only
(AUTOGEN.md 5: nothing else stops model spending), for one of three reasons: the user cancelled, the pool is
shutting down (the input goes back to the queue), or the lease was lost (another worker owns the input now:
write nothing more).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from autogen_agentchat.agents import UserProxyAgent
from autogen_agentchat.base import TaskResult, Team
from autogen_agentchat.messages import (
    BaseChatMessage,
    ModelClientStreamingChunkEvent,
    UserInputRequestedEvent,
)
from autogen_core import CancellationToken
from autogen_core.models import ChatCompletionClient

from service.errors import LeaseLost
from service.hub import Hub
from service.models import (
    RUN_CANCELLED,
    RUN_COMPLETED,
    RUN_FAILED,
    Claim,
    Entry,
    NewEntry,
    interrupted,
    lifecycle,
)
from service.queue.retry import RetryPolicy
from service.queue.store import Clock, Store
from service.worker.logs import error_line
from service.worker.messages import chunk_frame, to_entry
from service.worker.teams import TeamConfigError, TeamRegistry

log = logging.getLogger(__name__)

# A waiting input_func re-checks for an answer at most this often when wake-ups come in fast (other sessions'
# work also wakes ``wait_for_work``).
MIN_ANSWER_RECHECK_S = 0.05


class StopReason(enum.Enum):
    CANCEL = "cancel"  # the user asked: run_cancelled
    INTERRUPT = "interrupt"  # shutdown: run_interrupted, the input is queued again
    LEASE_LOST = "lease_lost"  # fenced: write nothing


class Outcome(enum.StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    RETRIED = "retried"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    LEASE_LOST = "lease_lost"


@dataclass(frozen=True, slots=True)
class RunDeps:
    store: Store
    hub: Hub
    teams: TeamRegistry
    retry: RetryPolicy
    clock: Clock
    poll_interval_s: float


def prepare_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Every run answers a new user input, so a round-robin team starts it with its first participant.
    (AutoGen would continue the rotation, which after a normal turn hands the new input to the user proxy.)"""
    agents = {
        name: {**agent, "next_speaker_index": 0}
        if isinstance(agent, dict) and "next_speaker_index" in agent
        else agent
        for name, agent in dict(state.get("agent_states", {})).items()
    }
    return {**state, "agent_states": agents}


def participants(team: Team) -> list[Any]:
    """The team's agents, nested teams included."""
    found: list[Any] = []
    for participant in getattr(team, "_participants", []):
        found.extend(participants(participant) if isinstance(participant, Team) else [participant])
    return found


async def close_model_clients(team: Team) -> None:
    for owner in [team, *participants(team)]:
        client = getattr(owner, "_model_client", None)
        if isinstance(client, ChatCompletionClient):
            try:
                await client.close()
            except Exception as exc:
                log.warning("could not close a model client: %s", error_line(exc))


def user_proxies(team: Team) -> list[UserProxyAgent]:
    """The team's UserProxyAgents, nested teams included."""
    return [p for p in participants(team) if isinstance(p, UserProxyAgent)]


class Run:
    """One claimed input, run once. ``execute()`` never raises for run errors; only store failures escape."""

    def __init__(self, claim: Claim, deps: RunDeps, on_change: Callable[[], None] = lambda: None) -> None:
        self.claim = claim
        self.deps = deps
        self.token = CancellationToken()
        self.stop_reason: StopReason | None = None
        self.waiting_for_input = False
        self.input_generation = 0  # +1 every time the input_func finds no answer and waits
        self.done = False
        self._poke = asyncio.Event()
        self._on_change = on_change
        self._proxy_names: frozenset[str] = frozenset()
        # Request ids of the UserInputRequestedEvents already in the log: an answer is taken only after its
        # question is durable (else the log would show the answer first, and the session stay awaiting_input).
        self._asked: set[str] = set()
        self._asked_changed = asyncio.Event()

    def stop(self, reason: StopReason) -> None:
        """Stop the run (idempotent; the first reason wins)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.token.cancel()

    def poke(self) -> None:
        """Make a waiting input_func look for an answer now (deterministic tests, shutdown)."""
        self._poke.set()

    def describe(self) -> str:
        c = self.claim
        return f"run {c.run_id} (session {c.session_id}, input {c.input_seq}, attempt {c.attempt})"

    async def execute(self) -> Outcome:
        try:
            return await self._execute()
        except LeaseLost:
            self.stop(StopReason.LEASE_LOST)
            log.warning("%s: lease lost, stopped without writing", self.describe())
            return Outcome.LEASE_LOST
        finally:
            self.done = True
            self.waiting_for_input = False
            self._on_change()

    async def _execute(self) -> Outcome:
        if self.claim.started is not None:  # committed by the claim itself
            self._publish([self.claim.started])
        try:
            team = self.deps.teams.build(self.claim.team)
        except Exception as exc:
            return await self._failed(exc, final=isinstance(exc, TeamConfigError))
        try:
            return await self._execute_team(team)
        finally:
            # A fresh team per run means fresh model clients: close them, or every run leaks its connections.
            await close_model_clients(team)

    async def _execute_team(self, team: Team) -> Outcome:
        try:
            await self._prepare(team)
        except LeaseLost:
            raise
        except Exception as exc:
            return await self._failed(exc, final=False)
        try:
            result = await self._stream(team)
        except LeaseLost:
            raise
        except (asyncio.CancelledError, Exception) as exc:
            if self.stop_reason is None:
                if isinstance(exc, asyncio.CancelledError):
                    raise  # our own task was cancelled, not the run: let the caller see it
                return await self._failed(exc, final=False)
            return await self._stopped(team)
        if self.stop_reason is not None:  # cancelled at the very end (autogen#7100): honour the stop
            return await self._stopped(team)
        state = dict(await team.save_state())
        reason = result.stop_reason or "finished"
        entry = lifecycle(RUN_COMPLETED, f"Run completed: {reason}", stop_reason=reason, **self._details())
        self._publish([await self.deps.store.finish(self.claim, entry, state)])
        return Outcome.COMPLETED

    async def _prepare(self, team: Team) -> None:
        state = self.claim.team_state  # read by the claim's own transaction
        if state is not None:
            await team.load_state(prepare_state(state))
        proxies = user_proxies(team)
        for proxy in proxies:
            # Not serialised in configs (a loaded proxy reads stdin); ours takes the session's next message.
            proxy.input_func = self._input_func
            proxy._is_async = True
        self._proxy_names = frozenset(p.name for p in proxies)

    async def _stream(self, team: Team) -> TaskResult:
        """Consume the run in an inner task: if OUR task is cancelled (a crash in tests, a hard stop), the
        cancellation must reach AutoGen as a token cancel, or the stream's cleanup waits for the chat (and any
        pending input) forever (AUTOGEN.md 4 D)."""
        inner = asyncio.ensure_future(self._consume(team))
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            if not inner.done():
                self.token.cancel()
                await asyncio.gather(inner, return_exceptions=True)
            raise

    async def _consume(self, team: Team) -> TaskResult:
        result: TaskResult | None = None
        stream = team.run_stream(
            task=self.claim.content, cancellation_token=self.token, output_task_messages=False
        )
        try:
            async for item in stream:
                if isinstance(item, TaskResult):
                    result = item
                elif isinstance(item, ModelClientStreamingChunkEvent):
                    if self.deps.hub.has_subscribers(self.claim.session_id):  # nobody watching: skip the dump
                        self.deps.hub.publish_ephemeral(
                            self.claim.session_id, chunk_frame(self.claim.session_id, self.claim.run_id, item)
                        )
                elif isinstance(item, BaseChatMessage) and item.source in self._proxy_names:
                    continue  # the human's answer: already in the log as the user's own message
                else:
                    await self._append([to_entry(item)])
                    if isinstance(item, UserInputRequestedEvent):
                        self._asked.add(item.request_id)
                        self._asked_changed.set()
        except BaseException:
            # Stop model spending before the generator is closed: closing alone waits for the chat to end.
            self.token.cancel()
            raise
        if result is None:
            raise RuntimeError("the team's run ended without a result")
        return result

    async def _input_func(self, prompt: str, cancellation_token: CancellationToken | None) -> str:
        request_id = UserProxyAgent.InputRequestContext.request_id()
        waiter = asyncio.ensure_future(self._wait_for_answer(request_id))
        # REQUIRED (AUTOGEN.md 4): a waiting input_func that ignores the token makes cancel hang forever.
        self.token.link_future(waiter)
        if cancellation_token is not None and cancellation_token is not self.token:
            cancellation_token.link_future(waiter)
        return await waiter

    async def _wait_for_answer(self, request_id: str) -> str:
        while request_id not in self._asked:
            self._asked_changed.clear()
            await self._asked_changed.wait()
        # The answer's enqueue publishes the user's entry to the hub: a doorbell for this session only, so the
        # answer is taken at once rather than at the next poll (other sessions' work does not ring it).
        try:
            with self.deps.hub.subscribe(self.claim.session_id) as doorbell:
                while True:
                    doorbell.signal.clear()
                    answer = await self.deps.store.take_answer(self.claim)
                    if answer is not None:
                        return answer.content
                    await self._idle_until_woken(doorbell.signal)
        except LeaseLost:
            self.stop(StopReason.LEASE_LOST)
            raise
        finally:
            self.waiting_for_input = False

    async def _idle_until_woken(self, doorbell: asyncio.Event) -> None:
        self.waiting_for_input = True
        self.input_generation += 1
        self._poke.clear()
        self._on_change()
        loop = asyncio.get_running_loop()
        started = loop.time()
        woken = _first(
            self.deps.store.wait_for_work(self.deps.poll_interval_s), doorbell.wait(), self._poke.wait()
        )
        if await woken:
            return
        rest = MIN_ANSWER_RECHECK_S - (loop.time() - started)
        if rest > 0:
            await _first(asyncio.sleep(rest), self._poke.wait())

    async def _stopped(self, team: Team) -> Outcome:
        store, claim = self.deps.store, self.claim
        if self.stop_reason is StopReason.LEASE_LOST:
            log.warning("%s: lease lost, stopped without writing", self.describe())
            return Outcome.LEASE_LOST
        if self.stop_reason is StopReason.INTERRUPT:
            self._publish([await store.release(claim, interrupted(claim.input_seq, claim.attempt))])
            return Outcome.INTERRUPTED
        # A fresh team loaded with this state works after a mid-turn cancel (AUTOGEN.md 5): keep what was said
        state = await _saved_state(team)
        entry = lifecycle(RUN_CANCELLED, "Run cancelled.", **self._details())
        self._publish([await store.finish(claim, entry, state)])
        return Outcome.CANCELLED

    async def _failed(self, exc: BaseException, *, final: bool) -> Outcome:
        error = error_line(exc)
        # Failures, not attempts: interruptions (shutdowns, crashes) do not use up the retries of a failing run.
        failure = self.claim.failures + 1
        not_before = None if final else self.deps.retry.next_attempt_at(failure, self.deps.clock())
        retrying = not_before is not None
        text = f"Run failed: {error}" + (" (it will be retried)" if retrying else "")
        entry = lifecycle(RUN_FAILED, text, error=error, retrying=retrying, **self._details())
        log.warning("%s failed%s: %s", self.describe(), ", retrying" if retrying else "", error)
        if not_before is not None:
            self._publish([await self.deps.store.retry(self.claim, entry, not_before)])
            return Outcome.RETRIED
        self._publish([await self.deps.store.finish(self.claim, entry, None)])
        return Outcome.FAILED

    async def _append(self, entries: Sequence[NewEntry]) -> None:
        try:
            written = await self.deps.store.append(self.claim, entries)
        except LeaseLost:
            self.stop(StopReason.LEASE_LOST)
            raise
        self._publish(written)

    def _publish(self, entries: Sequence[Entry]) -> None:
        self.deps.hub.publish(self.claim.session_id, entries)

    def _details(self) -> dict[str, Any]:
        return {"input_seq": self.claim.input_seq, "attempt": self.claim.attempt}


def drop_delivered_buffers(state: Mapping[str, Any]) -> dict[str, Any]:
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


async def _saved_state(team: Team) -> dict[str, Any] | None:
    try:
        return drop_delivered_buffers(await team.save_state())
    except Exception as exc:  # the cancel still counts; the next run starts from the previous state
        log.warning("could not save the team state after a cancel: %s", error_line(exc))
        return None


async def _first(*aws: Any) -> bool:
    """Wait for the first of ``aws`` to finish, cancel the others; True when it was not the first one given
    (the first is the plain poll; the others are direct wake-ups)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return tasks[0] not in done
