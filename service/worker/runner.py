"""One claim = one run: build a fresh team and load its state (or take the session's live team, which already
holds it: ``live_teams``), stream the run into the log, finish, save state.

The claim already committed the run's ``run_started`` entry and brought the saved state along, so the team
starts without another round trip to the store. Every durable entry is appended (committed) before it is
published to the hub; streaming chunks go out live only. The run stops through its CancellationToken (nothing
else stops model spending), for one of four reasons: the user cancelled, the pool is shutting down (the input
goes back to the queue), the lease was lost (another worker owns the input now: write nothing more), or the run
made no progress for ``stall_timeout_s``.

Every run ends in bounded time (README "Guarantees"): after the token is cancelled AutoGen gets
``stop_timeout_s`` to end the run; a team that does not (autogen-agentchat 0.7.5 never ends a run cancelled
while a tool executes: microsoft/autogen#7956) is abandoned and the runner writes the outcome itself.
Errors are permanent or transient: a team that cannot be built or cannot load the session's state fails at once
(retrying cannot help); an error during the run is retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from autogen_agentchat.agents import UserProxyAgent
from autogen_agentchat.base import TaskResult, Team
from autogen_agentchat.messages import (
    BaseChatMessage,
    HandoffMessage,
    ModelClientStreamingChunkEvent,
    UserInputRequestedEvent,
)
from autogen_core import CancellationToken
from autogen_core.models import ChatCompletionClient

from service import tracing
from service.errors import LeaseLost, ServiceError
from service.hub import Hub
from service.models import (
    RUN_CANCELLED,
    RUN_COMPLETED,
    RUN_FAILED,
    Claim,
    Draft,
    Entry,
    NewEntry,
    PartialReason,
    interrupted,
    lifecycle,
    partial,
)
from service.queue.retry import RetryPolicy
from service.queue.store import Clock, Store
from service.text import clean_json
from service.worker.live_teams import LiveTeam, LiveTeams, release_proxies, start_next_round
from service.worker.logs import error_line, public_error_line
from service.worker.messages import to_entry
from service.worker.state import (
    State,
    drop_delivered_buffers,
    next_round,
    prepare_state,
    remember_partial,
    resume_task,
)
from service.worker.state_saver import StateSaver
from service.worker.streaming import Streamer
from service.worker.teams import TeamRegistry

log = logging.getLogger(__name__)

# A waiting input_func re-checks for an answer at most this often when wake-ups come in fast (other sessions'
# work also wakes ``wait_for_work``).
MIN_ANSWER_RECHECK_S = 0.05
# Bound on the small awaits into an abandoned (or any) team after its run: save_state, closing model clients.
AFTER_RUN_TIMEOUT_S = 5.0
# Runs AutoGen did not end when asked: kept referenced (never awaited) until they end by themselves.
ABANDONED: set[asyncio.Future[Any]] = set()
# Teams abandoned in this process so far: a synchronous tool of one may still hold a thread that nothing can stop.
abandoned_total = 0


class StopReason(enum.Enum):
    CANCEL = "cancel"  # the user asked: run_cancelled
    INTERRUPT = "interrupt"  # shutdown: run_interrupted, the input is queued again
    LEASE_LOST = "lease_lost"  # fenced: write nothing
    STALLED = "stalled"  # no output for stall_timeout_s: a final run_failed


class StopTimedOut(Exception):
    """AutoGen did not end the run within ``stop_timeout_s`` of its cancellation: the team was abandoned."""


class PermanentError(Exception):
    """The run ends without a retry: retrying cannot help (the team cannot be built, or cannot load this
    session's state) or must not happen (the run stalled)."""


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
    stop_timeout_s: float = 10.0
    stall_timeout_s: float = 900.0  # 0: no stall detection
    draft_interval_s: float = 0.25  # 0: streamed text is not saved as a draft
    live_teams: LiveTeams = field(default_factory=lambda: LiveTeams(0))  # teams kept between runs (none)


def participants(team: Team) -> list[Any]:
    """The team's agents, nested teams (and the team inside an agent, such as a SocietyOfMindAgent) included."""
    found: list[Any] = []
    for participant in getattr(team, "_participants", []):
        if isinstance(participant, Team):
            found.extend(participants(participant))
            continue
        found.append(participant)
        inner = getattr(participant, "_team", None)
        if isinstance(inner, Team):
            found.extend(participants(inner))
    return found


async def close_model_clients(team: Team) -> None:
    for owner in [team, *participants(team)]:
        client = getattr(owner, "_model_client", None)
        if isinstance(client, ChatCompletionClient):
            try:
                await asyncio.wait_for(client.close(), AFTER_RUN_TIMEOUT_S)
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
        self.abandoned = False  # AutoGen did not end the run when asked: the team object was given up
        self.prepared = False  # the session's state is loaded into the team (before that, its state is empty)
        self.waiting_for_input = False
        self.answers_taken = 0  # answers this attempt got (the store gives earlier attempts' answers again)
        self.last_progress = asyncio.get_running_loop().time()  # of the last item the team yielded
        self._stop_asked = asyncio.Event()
        self.streamer = Streamer(claim, deps.store, deps.hub, deps.draft_interval_s)
        self.input_generation = 0  # +1 every time the input_func finds no answer and waits
        self.done = False
        self._poke = asyncio.Event()
        self._on_change = on_change
        self._proxy_names: frozenset[str] = frozenset()
        # Request ids of the UserInputRequestedEvents already in the log: an answer is taken only after its
        # question is durable (else the log would show the answer first, and the session stay awaiting_input).
        self._asked: set[str] = set()
        self._asked_changed = asyncio.Event()
        # The team: a live one taken from ``deps.live_teams`` (None: built for this run), its fresh state and the
        # state this run started from (what keeping it after the run is checked against), and whether it was kept.
        self._live: LiveTeam | None = None
        self._fresh: State | None = None
        self._start: State | None = None
        self._proxies: list[UserProxyAgent] = []
        self._kept = False

    def stop(self, reason: StopReason) -> None:
        """Stop the run (idempotent; the first reason wins)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.token.cancel()
        self._stop_asked.set()

    def poke(self) -> None:
        """Make a waiting input_func look for an answer now (deterministic tests, shutdown)."""
        self._poke.set()

    def describe(self) -> str:
        c = self.claim
        return f"run {c.run_id} (session {c.session_id}, input {c.input_seq}, attempt {c.attempt})"

    async def execute(self) -> Outcome:
        """The run, inside its trace span (README "Tracing"): a child of the request that enqueued the input."""
        c = self.claim
        attributes: dict[str, str | int] = {
            "session_id": c.session_id,
            "run_id": c.run_id,
            "input_seq": c.input_seq,
            "attempt": c.attempt,
            "team": c.team,
        }
        with tracing.tracer().start_as_current_span(
            "run", context=tracing.context_of(c.trace_context), attributes=attributes
        ) as span:
            outcome = await self._execute_guarded()
            span.set_attribute("outcome", outcome.value)
            return outcome

    async def _execute_guarded(self) -> Outcome:
        try:
            return await self._execute()
        except LeaseLost:
            self.stop(StopReason.LEASE_LOST)
            return await self._lease_lost()
        finally:
            self.done = True
            self.waiting_for_input = False
            self._on_change()

    async def _execute(self) -> Outcome:
        if self.claim.started is not None:  # committed by the claim itself
            self._publish([self.claim.started])
        self._live = await self._take_live_team()
        if self._live is not None:
            team = self._live.team
        else:
            try:
                team = self.deps.teams.build(self.claim.team)
            except Exception as exc:
                log.error(
                    "%s: team %r cannot be built: %s", self.describe(), self.claim.team, error_line(exc)
                )
                return await self._failed(
                    PermanentError(
                        f"team {self.claim.team!r} cannot be built (the server log says why); check the team's"
                        " configuration: messages sent once it is fixed run normally"
                    )
                )
        try:
            return await self._execute_team(team)
        finally:
            if not self._kept:
                # A team not kept for the next run: close its model clients, or every run leaks its connections.
                await close_model_clients(team)

    async def _take_live_team(self) -> LiveTeam | None:
        """The session's live team when it fits this claim (module ``live_teams``); a stale one is closed."""
        live = self.deps.live_teams.take(self.claim.session_id)
        if live is None:
            return None
        if live.fits(self.claim.team, self.deps.teams.builder(self.claim.team), self.claim.team_state):
            self.deps.live_teams.reused += 1
            return live
        self.deps.live_teams.dropped += 1
        await close_model_clients(live.team)
        return None

    async def _execute_team(self, team: Team) -> Outcome:
        try:
            result = await self._stream(team)
        except LeaseLost:
            raise
        except (asyncio.CancelledError, Exception) as exc:
            if self.stop_reason is None:
                if isinstance(exc, asyncio.CancelledError):
                    raise  # our own task was cancelled, not the run: let the caller see it
                return await self._failed(exc)
            return await self._stopped(team)
        if self.stop_reason is not None:  # cancelled at the very end (autogen#7100): honour the stop
            return await self._stopped(team)
        # Provider text may hold halves of UTF-16 pairs: repaired (and then the team is not kept: it still holds them).
        # The saver is the live team's (its dumps of the conversation kept from its last save) or a new one.
        saver = self._live.saver if self._live is not None else StateSaver(team)
        state, clean = saver.clean_json(await saver.save())
        reason = result.stop_reason or "finished"
        entry = lifecycle(RUN_COMPLETED, f"Run completed: {reason}", stop_reason=reason, **self._details())
        keep = await self._to_keep(team, saver, state, clean)
        written = await self.deps.store.finish(self.claim, entry, state, saver.pieces)
        pushed_out: list[LiveTeam] = []
        if keep is not None:  # committed: the next claim of the session brings exactly this state
            pushed_out = self.deps.live_teams.put(self.claim.session_id, keep)
            self._kept = all(out.team is not team for out in pushed_out)
        self._publish([written])
        for out in pushed_out:
            if out.team is not team:
                await close_model_clients(out.team)
        return Outcome.COMPLETED

    async def _to_keep(self, team: Team, saver: StateSaver, state: State, clean: bool) -> LiveTeam | None:
        """The team as a live team for the session's next run, brought to what a fresh team would load for it
        (``state.next_round``); None when it is not to be kept (then it is used for nothing more)."""
        if self.deps.live_teams.size == 0 or not clean or self._fresh is None or self._start is None:
            return None
        round_ = next_round(state, self._fresh, self._start)
        if round_ is None:
            return None
        try:
            if not await start_next_round(team, round_):
                return None
        except Exception as exc:
            log.warning("%s: the team is not kept for the next run: %s", self.describe(), error_line(exc))
            return None
        release_proxies(team, self._proxies)
        builder = self.deps.teams.builder(self.claim.team)
        return LiveTeam(team, self.claim.team, builder, state, self._fresh, saver)

    async def _run_team(self, team: Team) -> TaskResult:
        """Prepare the team, then run it; a team that cannot take the session's state fails for good."""
        try:
            task = await self._prepare(team)
        except LeaseLost:
            raise
        except Exception as exc:
            raise PermanentError(
                f"team {self.claim.team!r} cannot load this session's saved state ({error_line(exc)}). "
                f"Reset the agents' memory with POST /sessions/{self.claim.session_id}/reset "
                "(the conversation log is kept), or start a new session."
            ) from exc
        return await self._consume(team, task)

    async def _prepare(self, team: Team) -> str | HandoffMessage:
        """Load the state this run starts from (``state.prepare_state``) and wire the human input; the task.
        A live team already holds that state: the claim's saved state is what it saved (``LiveTeam.fits``) and it
        was brought to the start of a new round when it was kept."""
        saved = self.claim.team_state  # the saved state came with the claim
        if self._live is not None:
            fresh = self._live.fresh
            state = prepare_state(saved, fresh, checked=saved)
        else:
            fresh = dict(await team.save_state())
            state = prepare_state(saved, fresh)
            await team.load_state(state)
        self._fresh, self._start = fresh, state
        self.prepared = True
        self._proxies = user_proxies(team)
        for proxy in self._proxies:
            # Not serialised in configs (a loaded proxy reads stdin); ours takes the session's next message.
            proxy.input_func = self._input_func
            proxy._is_async = True
        self._proxy_names = frozenset(p.name for p in self._proxies)
        return resume_task(state, self.claim.content)

    async def _stream(self, team: Team) -> TaskResult:
        """Prepare and consume the run in an inner task, watched: a stop (cancel, shutdown, lease lost) or a
        stall cancels the token and gives AutoGen ``stop_timeout_s`` to end; then the team is abandoned
        (StopTimedOut). If OUR task is cancelled (a hard stop), the cancellation reaches AutoGen the same way."""
        inner = asyncio.ensure_future(self._run_team(team))
        try:
            await self._watch(inner)
        except asyncio.CancelledError:
            self.token.cancel()
            with contextlib.suppress(StopTimedOut):
                await self._settle(team, inner)
            raise
        if not inner.done():
            await self._settle(team, inner)
        return inner.result()

    async def _watch(self, inner: asyncio.Future[TaskResult]) -> None:
        """Until the run ends or is asked to stop; a run without output for ``stall_timeout_s`` (not counting
        waits for a human) is stopped as stalled."""
        loop = asyncio.get_running_loop()
        stall_s = self.deps.stall_timeout_s
        stop_asked: asyncio.Future[Any] = asyncio.ensure_future(self._stop_asked.wait())
        watched: set[asyncio.Future[Any]] = {inner, stop_asked}
        try:
            while not inner.done() and not self._stop_asked.is_set():
                if self.waiting_for_input:
                    self.last_progress = loop.time()
                timeout = None if stall_s <= 0 else max(0.0, self.last_progress + stall_s - loop.time())
                await asyncio.wait(watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                idle = loop.time() - self.last_progress
                if stall_s > 0 and not inner.done() and not self.waiting_for_input and idle >= stall_s:
                    log.warning("%s: no progress for %.0fs, stopping it", self.describe(), idle)
                    self.stop(StopReason.STALLED)
        finally:
            stop_asked.cancel()

    async def _settle(self, team: Team, inner: asyncio.Future[TaskResult]) -> None:
        """The token is cancelled: wait up to ``stop_timeout_s`` for AutoGen to end the run, else abandon the team
        (StopTimedOut): its runtime's tasks are cancelled, which ends a run stuck in a tool; a run that still
        does not end is kept referenced, never awaited. Either way it writes nothing more (see _consume)."""
        done, _ = await asyncio.wait({inner}, timeout=self.deps.stop_timeout_s)
        if done:
            return
        self.abandoned = True
        global abandoned_total
        abandoned_total += 1
        log.warning(
            "%s: the team did not stop within %.1fs of its cancellation; abandoning it",
            self.describe(),
            self.deps.stop_timeout_s,
        )
        for task in _runtime_tasks(team):
            task.cancel()
        done, _ = await asyncio.wait({inner}, timeout=AFTER_RUN_TIMEOUT_S)
        if not done:
            ABANDONED.add(inner)
            inner.add_done_callback(_forget_abandoned)
        raise StopTimedOut()

    async def _consume(self, team: Team, task: str | HandoffMessage) -> TaskResult:
        result: TaskResult | None = None
        loop = asyncio.get_running_loop()
        stream = team.run_stream(task=task, cancellation_token=self.token, output_task_messages=False)
        try:
            async for item in stream:
                if self.abandoned:
                    continue  # the outcome is written; whatever AutoGen still yields is not part of this run
                self.last_progress = loop.time()
                if isinstance(item, TaskResult):
                    result = item
                elif isinstance(item, ModelClientStreamingChunkEvent):
                    self.streamer.add(item)
                    if self.streamer.lease_lost:
                        self.stop(StopReason.LEASE_LOST)
                elif isinstance(item, BaseChatMessage) and item.source in self._proxy_names:
                    continue  # the human's answer: already in the log as the user's own message
                else:
                    await self.streamer.committed()
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
        # REQUIRED: an input_func that ignores the token makes a cancel hang forever (AutoGen waits for it).
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
                    answer = await self.deps.store.take_answer(self.claim, self.answers_taken)
                    if answer is not None:
                        self.answers_taken += 1
                        return answer.content
                    await self._idle_until_woken(doorbell.signal)
        except LeaseLost:
            self.stop(StopReason.LEASE_LOST)
            raise
        finally:
            self.waiting_for_input = False
            self.last_progress = asyncio.get_running_loop().time()  # a stall is counted from the answer on

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

    async def _lease_lost(self) -> Outcome:
        """The run stopped without writing: its lease is gone. A session deleted under its run is an ordinary end
        (logged as such); any other lost lease (it expired and recovery took the input) is a fault worth a
        warning."""
        claim = self.claim
        try:
            deleted = (
                await asyncio.wait_for(
                    self.deps.store.get_session(claim.owner, claim.session_id), AFTER_RUN_TIMEOUT_S
                )
                is None
            )
        except (ServiceError, TimeoutError):
            deleted = False  # unknown: say what happened to the lease
        if deleted:
            log.info("%s: the session was deleted; the run stopped without writing", self.describe())
        else:
            log.warning("%s: lease lost, stopped without writing", self.describe())
        return Outcome.LEASE_LOST

    async def _stopped(self, team: Team) -> Outcome:
        store, claim = self.deps.store, self.claim
        if self.stop_reason is StopReason.LEASE_LOST:
            return await self._lease_lost()
        if self.stop_reason is StopReason.INTERRUPT and not await store.cancel_requested(claim):
            await self._write_partial(PartialReason.INTERRUPTED)
            self._publish(await store.release(claim, interrupted(claim.input_seq, claim.attempt)))
            return Outcome.INTERRUPTED
        # (A shutdown that finds the run asked to stop ends it as cancelled: never queued again.)
        if self.stop_reason is StopReason.STALLED:
            idle = self.deps.stall_timeout_s
            return await self._failed(
                PermanentError(f"the run made no progress for {idle:g}s (stall_timeout_s) and was stopped"),
                PartialReason.STALLED,
            )
        # A fresh team loaded with this state works after a mid-turn cancel: keep what was said, including the
        # text the user saw of a message cut off. Loading it repairs what the stop left unfinished.
        cut = await self._write_partial(PartialReason.CANCELLED)
        if await store.rollback_requested(claim):
            # README "Double-texting": a rollback message waits; the agents forget this run (the state stays
            # as the previous run left it), its entries stay in the log, marked by this one.
            text = "Run cancelled and rolled back: the agents do not remember it."
            entry = lifecycle(RUN_CANCELLED, text, rolled_back=True, **self._details())
            self._publish([await store.finish(claim, entry, None)])
            return Outcome.CANCELLED
        state = await _saved_state(team) if self.prepared else None  # unprepared: keep the previous state
        if state is not None and cut is not None:
            state = remember_partial(state, cut)
        entry = lifecycle(RUN_CANCELLED, "Run cancelled.", **self._details())
        self._publish([await store.finish(claim, entry, state)])
        return Outcome.CANCELLED

    async def _write_partial(self, reason: PartialReason) -> Draft | None:
        """A message cut off mid-stream becomes a durable partial entry, before the run's lifecycle entry, so
        every ``full_message_id`` a reader saw in chunks is followed by an entry with that id."""
        cut = await self.streamer.cut()
        if cut is not None:
            await self._append([partial(cut, reason)])
        return cut

    async def _failed(self, exc: BaseException, reason: PartialReason = PartialReason.FAILED) -> Outcome:
        """Write the failure: a transient error is retried with backoff until ``max_attempts`` failures, a
        PermanentError ends the run at once. Either way the text names the error in one line."""
        await self._write_partial(reason)
        error = public_error_line(exc)
        # A run the user asked to stop is not retried (a cancel is never undone): its failure is final.
        final = isinstance(exc, PermanentError) or await self.deps.store.cancel_requested(self.claim)
        # Failures, not attempts: interruptions (shutdowns, crashes) do not use up the retries of a failing run.
        failure = self.claim.failures + 1
        not_before = None if final else self.deps.retry.next_attempt_at(failure, self.deps.clock())
        retrying = not_before is not None
        text = f"Run failed: {error}" + (" (it will be retried)" if retrying else "")
        entry = lifecycle(RUN_FAILED, text, error=error, retrying=retrying, **self._details())
        log.warning("%s failed%s: %s", self.describe(), ", retrying" if retrying else "", error_line(exc))
        if not_before is not None:
            self._publish(await self.deps.store.retry(self.claim, entry, not_before))
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


async def _saved_state(team: Team) -> dict[str, Any] | None:
    """The team's state after a stop (bounded: the team may be abandoned), or None to keep the previous one."""
    try:
        state = await asyncio.wait_for(team.save_state(), AFTER_RUN_TIMEOUT_S)
        return drop_delivered_buffers(clean_json(dict(state))[0])
    except Exception as exc:  # the cancel still counts; the next run starts from the previous state
        log.warning("could not save the team state after a cancel: %s", error_line(exc))
        return None


def _runtime_tasks(team: Team) -> list[asyncio.Task[Any]]:
    """The tasks of a team's embedded runtime (autogen-core 0.7.5 internals: its background tasks and its run
    loop). A run cancelled while a tool executes never ends by itself (microsoft/autogen#7956, fixed upstream
    but not released); cancelling these tasks ends it."""
    runtime = getattr(team, "_runtime", None)
    tasks = list(getattr(runtime, "_background_tasks", None) or ())
    run_task = getattr(getattr(runtime, "_run_context", None), "_run_task", None)
    tasks.append(run_task)
    return [t for t in tasks if isinstance(t, asyncio.Task) and not t.done()]


def _forget_abandoned(task: asyncio.Future[Any]) -> None:
    ABANDONED.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.debug("an abandoned run ended with %s", error_line(task.exception()))  # type: ignore[arg-type]


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
