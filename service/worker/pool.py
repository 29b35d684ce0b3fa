"""WorkerPool: up to ``workers`` runs at once, a claim loop, heartbeat and lease-recovery side tasks,
graceful stop, and ``run_until_idle()`` for deterministic tests (arq's burst mode).

Side tasks: the claim loop wakes on ``store.wait_for_work``; the heartbeat extends every running lease and
polls ``store.cancel_requested`` (so a cancel asked in another process arrives); recovery re-queues inputs whose
lease expired (a dead process) at start and every lease period. A side task that dies unexpectedly marks the pool
failed (``pool.failed``, for readiness) and stops it claiming; it is logged loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from service.errors import StoreUnavailable
from service.hub import Hub
from service.models import Claim, utcnow
from service.queue import rules
from service.queue.retry import RetryPolicy
from service.queue.store import Clock, Store
from service.worker.live_teams import LiveTeams
from service.worker.logs import error_line, install_log_filters
from service.worker.runner import Run, RunDeps, StopReason, close_model_clients
from service.worker.teams import TeamRegistry

log = logging.getLogger(__name__)
DEFAULT_RETRY = RetryPolicy()
DEFAULT_LIVE_TEAMS = 32
CANCEL_CHECK_MIN_S = 0.1


class PoolMetrics(Protocol):
    """What the pool reports; the web layer backs it with prometheus-client."""

    def run_started(self, team: str) -> None: ...

    def run_ended(self, team: str, outcome: str, duration_s: float) -> None: ...


@dataclass
class PoolStats:
    """Counters since the pool was made (also handy in tests)."""

    runs_started: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    cancelled: int = 0
    interrupted: int = 0
    lease_lost: int = 0
    crashed: int = 0  # the run raised (a store error): its lease expires and recovery re-queues it

    def count(self, outcome: str) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)


class WorkerPool:
    def __init__(
        self,
        store: Store,
        hub: Hub,
        teams: TeamRegistry,
        *,
        workers: int = 4,
        lease_s: float = 30.0,
        heartbeat_s: float = 5.0,
        poll_interval_s: float = 1.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        grace_s: float = 10.0,
        stop_timeout_s: float = 10.0,
        stall_timeout_s: float = 900.0,
        draft_interval_s: float = 0.25,
        live_teams: int = DEFAULT_LIVE_TEAMS,
        worker_id: str | None = None,
        clock: Clock = utcnow,
        metrics: PoolMetrics | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.store, self.hub, self.teams = store, hub, teams
        self.workers, self.lease_s, self.heartbeat_s, self.grace_s = workers, lease_s, heartbeat_s, grace_s
        self.worker_id = worker_id or f"w_{uuid.uuid4().hex[:12]}"
        self.metrics = metrics
        self.stats = PoolStats()
        # Teams kept between runs of a session (README "Configuration": live_teams).
        self.live_teams = LiveTeams(live_teams)
        self.failed: BaseException | None = None
        self._deps = RunDeps(
            store,
            hub,
            teams,
            retry,
            clock,
            poll_interval_s,
            stop_timeout_s=stop_timeout_s,
            stall_timeout_s=stall_timeout_s,
            draft_interval_s=draft_interval_s,
            live_teams=self.live_teams,
        )
        self._poll_interval_s = poll_interval_s
        # By run id: a fenced run of a session may still be winding down while its retry already runs.
        self._runs: dict[str, tuple[Run, asyncio.Task[None]]] = {}
        self._side_tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._changes = 0
        self._changed = asyncio.Event()
        install_log_filters()

    # --- public ---------------------------------------------------------------------------------------------
    def running_count(self) -> int:
        """Runs in this process, including those waiting for human input."""
        return len(self._runs)

    def cancel(self, session_id: str, input_seq: int | None = None) -> bool:
        """Cancel the session's run in this process now (only the run of ``input_seq`` when given). False when
        none runs here."""
        runs = [
            run
            for run, _ in self._runs.values()
            if run.claim.session_id == session_id
            and not run.done
            and rules.targets(input_seq, run.claim.input_seq)
        ]
        for run in runs:
            run.stop(StopReason.CANCEL)
        return bool(runs)

    async def start(self) -> None:
        """Recover expired leases, then claim and run in the background until ``stop()``."""
        await self._recover()
        loops = [
            ("claim", self._claim_loop),
            ("heartbeat", self._heartbeat_loop),
            ("recovery", self._recovery_loop),
        ]
        if self.store.dialect == "postgresql":  # several processes: cancels may be asked elsewhere
            loops.append(("cancel-watch", self._cancel_watch_loop))
        for name, coro in loops:
            self._side_tasks.append(asyncio.create_task(self._guard(name, coro), name=f"pool-{name}"))
        log.info("worker pool %s started: %d workers", self.worker_id, self.workers)

    async def stop(self) -> None:
        """Stop claiming, let working runs finish for ``grace_s``, then interrupt the rest (back to the queue).
        A run waiting for a human would wait out the whole grace period: it is interrupted at once. Heartbeats
        go on meanwhile, so no other instance recovers a run that is still finishing."""
        self._stopping = True
        if self.grace_s > 0:
            # TimeoutError: the grace period is over; any other error (a failed pool) also ends the wait.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._wait_until(self._only_waiting_runs_left), self.grace_s)
        for task in self._side_tasks:
            task.cancel()
        await asyncio.gather(*self._side_tasks, return_exceptions=True)
        self._side_tasks.clear()
        left = list(self._runs.values())
        for run, _ in left:
            run.stop(StopReason.INTERRUPT)
        if left:
            log.info("worker pool %s: interrupting %d unfinished run(s)", self.worker_id, len(left))
            await asyncio.gather(*(task for _, task in left), return_exceptions=True)
        for live in self.live_teams.drain():
            await close_model_clients(live.team)
        log.info("worker pool %s stopped", self.worker_id)

    async def run_until_idle(self) -> None:
        """Claim and run until nothing is claimable and every run left (if any) waits for human input."""
        while True:
            self._raise_if_failed()
            if await self._fill_slots():
                continue
            runs = [run for run, _ in self._runs.values()]
            if not runs:
                return
            if all(run.waiting_for_input for run in runs):
                # Make every waiting run look for its answer once more; idle only if none found one.
                generations = {id(run): run.input_generation for run in runs}
                for run in runs:
                    run.poke()
                await self._wait_until(partial(_rechecked, runs, generations))
                if all(not r.done and r.waiting_for_input for r in runs) and not await self._fill_slots():
                    return
            else:
                await self._wait_until(partial(self._changed_since, self._changes))

    # --- runs -----------------------------------------------------------------------------------------------
    async def _claim(self) -> Claim | None:
        # A session whose live team saved the state the store holds gets that state back as it is (no reading
        # it back, no comparing it in full: README "Benchmarks", bench/long.py).
        return await self.store.claim(self.worker_id, self.lease_s, held=self.live_teams.saved_states)

    async def _fill_slots(self) -> int:
        """Claim while slots are free; the number of runs started. The claims for all free slots go out at
        once, so the store commits them together (one after the other, each would wait for its own commit)."""
        started = 0
        while not self._stopping and (free := self.workers - self._busy()) > 0:
            claims = await asyncio.gather(*(self._claim() for _ in range(free)), return_exceptions=True)
            got = [claim for claim in claims if isinstance(claim, Claim)]
            for claim in got:  # start what was claimed even if a sibling claim failed: its lease is ours
                run = Run(claim, self._deps, self._notify)
                self._runs[claim.run_id] = (
                    run,
                    asyncio.create_task(self._run(run), name=f"run-{claim.run_id}"),
                )
            started += len(got)
            error = next((c for c in claims if isinstance(c, BaseException)), None)
            if error is not None:
                raise error
            if len(got) < free:
                break
        return started

    async def _run(self, run: Run) -> None:
        team, began = run.claim.team, time.monotonic()
        self.stats.runs_started += 1
        if self.metrics is not None:
            self.metrics.run_started(team)
        outcome = "crashed"
        try:
            outcome = (await run.execute()).value
            log.info("%s: %s in %.2fs", run.describe(), outcome, time.monotonic() - began)
        except Exception as exc:
            log.error(
                "%s crashed (its lease will expire and it will be retried): %s",
                run.describe(),
                error_line(exc),
            )
        finally:
            self._runs.pop(run.claim.run_id, None)
            duration_s = time.monotonic() - began
            self.stats.count(outcome)
            if self.metrics is not None:
                self.metrics.run_ended(team, outcome, duration_s)
            self._notify()

    def _busy(self) -> int:
        """Runs holding a worker slot. A run waiting for a human holds none (it costs no CPU, only memory), so
        a few unanswered questions cannot starve every other session."""
        return sum(1 for run, _ in self._runs.values() if not run.waiting_for_input)

    def _only_waiting_runs_left(self) -> bool:
        return all(run.done or run.waiting_for_input for run, _ in self._runs.values())

    def _changed_since(self, changes: int) -> bool:
        return self._changes > changes

    def _notify(self) -> None:
        self._changes += 1
        self._changed.set()

    async def _wait_until(self, condition: Callable[[], bool]) -> None:
        while True:
            self._changed.clear()
            if condition():
                return
            await self._changed.wait()
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.failed is not None:
            raise RuntimeError(f"the worker pool failed: {error_line(self.failed)}") from self.failed

    # --- side tasks -----------------------------------------------------------------------------------------
    async def _guard(self, name: str, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await loop()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.failed = exc
            self._stopping = True
            log.critical(
                "worker pool %s: the %s task died, the pool stops claiming: %s",
                self.worker_id,
                name,
                error_line(exc),
                exc_info=exc,
            )
            self._notify()

    async def _claim_loop(self) -> None:
        while not self._stopping:
            try:
                started = await self._fill_slots()
            except StoreUnavailable as exc:
                log.warning("claim failed, retrying in %.1fs: %s", self._poll_interval_s, exc.message)
                await asyncio.sleep(self._poll_interval_s)
                continue
            if started:
                continue
            if self._busy() >= self.workers:
                # Every slot is busy: wait for a run to end.
                await self._wait_until(partial(self._changed_since, self._changes))
            else:
                await self.store.wait_for_work(self._poll_interval_s)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            runs = [run for run, _ in self._runs.values() if not run.done]
            results = await asyncio.gather(*(self._beat(run) for run in runs), return_exceptions=True)
            for run, result in zip(runs, results, strict=True):
                if isinstance(result, StoreUnavailable):
                    log.warning("%s: heartbeat failed: %s", run.describe(), result.message)
                elif isinstance(result, BaseException):
                    raise result

    async def _beat(self, run: Run) -> None:
        if not await self.store.heartbeat(run.claim, self.lease_s):
            run.stop(StopReason.LEASE_LOST)
        elif await self.store.cancel_requested(run.claim):
            run.stop(StopReason.CANCEL)

    async def _cancel_watch_loop(self) -> None:
        """A cancel asked in another process arrives as a work notification: check this process's runs then,
        rather than only at the next heartbeat. The next wait starts (and takes its wake-up event) before this
        check, so a cancel notified during the check or the pause after it is not missed."""
        waiting = asyncio.ensure_future(self.store.wait_for_work(self.heartbeat_s))
        try:
            while True:
                await waiting
                waiting = asyncio.ensure_future(self.store.wait_for_work(self.heartbeat_s))
                await asyncio.sleep(0)  # let it take its event now
                for run in [
                    run for run, _ in self._runs.values() if not run.done and run.stop_reason is None
                ]:
                    try:
                        if await self.store.cancel_requested(run.claim):
                            run.stop(StopReason.CANCEL)
                    except StoreUnavailable as exc:
                        log.warning("%s: cancel check failed: %s", run.describe(), exc.message)
                # Every enqueue anywhere also wakes this loop: check at most this often.
                await asyncio.sleep(CANCEL_CHECK_MIN_S)
        finally:
            waiting.cancel()

    async def _recovery_loop(self) -> None:
        """Looks for expired leases every half lease: a dead instance's run is taken over between ``lease_s``
        and 1.5 x ``lease_s`` after its last heartbeat (README "Deploying on PostgreSQL")."""
        while True:
            await asyncio.sleep(self.lease_s / 2)
            try:
                await self._recover()
            except StoreUnavailable as exc:
                log.warning("lease recovery failed: %s", exc.message)

    async def _recover(self) -> None:
        entries = await self.store.recover_expired()
        for entry in entries:
            self.hub.publish(entry.session_id, [entry])
        if entries:
            log.info("re-queued %d input(s) whose lease had expired", len(entries))


def _rechecked(runs: list[Run], generations: dict[int, int]) -> bool:
    """Every run ended, or looked for its answer again since ``generations`` was taken."""
    return all(r.done or r.input_generation > generations[id(r)] for r in runs)
