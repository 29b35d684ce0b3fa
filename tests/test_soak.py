"""A randomised soak test of issue 10's invariant, on a real server process (SQLite file) that is SIGKILLed and
SIGTERMed at random moments while several sessions chat.

Every session runs each kind of action at least once, in a seeded random order, plus random extra ones: plain
messages, ``[[ask]]`` then an answer once the question is asked (a plain answer, one with ``[[fail]]``, one with
``[[sleep:S]]``, or a cancel instead; every session answers ``[[fail]]`` at least once), ``[[fail]]`` (retried,
then a final run_failed), ``[[sleep:S]]``, and in sessions of the ``slow`` team a slow tool (short, or long and
cancelled once its call is in the log), with cancels at random moments. Clients send with a ``client_msg_id`` and retry on
connection errors until they get the 202 (that is the acknowledgement). At the end every session must settle
(``idle`` or ``failed``), take a final plain message that completes, and its log must show:
* every acknowledged input has exactly ONE terminal entry (run_completed, run_cancelled, run_failed with retrying
  false) with its ``input_seq``, and no run of it starts after that;
* except an answer: a message sent while the session waited for one and consumed by the run that asked is not a run
  of its own. Such an input must have no run_started and no terminal entry, a question before it, and the input it
  answered must have ended after it. (That it was really consumed, not stuck in the queue, follows from the final
  message completing: a session runs its inputs oldest first.)
* no run writes anything after the entry that ended it (its terminal entry, a retrying run_failed or
  run_interrupted; a retried input has one run id per attempt).

``SOAK_SIZE=N`` multiplies the sessions and restarts (default 1: 6 sessions x 8 actions, 3 restarts);
``SOAK_SEED=S`` replays a seed (every failure message names its seed; the default is a fresh random seed).

Two variants: ``default-team`` uses only the shipped team and no setting that is new with issue 10, so it shows the
faults of the code before it; ``all-teams`` adds the slow-tool team, which needs ``--stop-timeout-s``.

How these failed on the base (9a5a669, before the fix):
* test_soak[default-team]: sessions stuck in ``awaiting_input``: after an answer with ``[[fail]]`` attempt 2 asked
  again and waited for good, and so did the retry after a restart while an answer was worked on ("timed out ...
  waiting for input N (answered) to end; it is awaiting_input"); a later message of such a session was swallowed as
  the answer to the repeated question, so it never ran ("waiting for input N ('hello number 3') to end"); those
  sessions never settled.
* test_soak[all-teams]: the server refuses to start ("unrecognized arguments: --stop-timeout-s 1").
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from tests.test_never_stuck_process import (
    Server,
    describe,
    ends_run,
    in_open_run,
    is_terminal,
    launch,
    starts,
    terminals,
)

SIZE = int(os.environ.get("SOAK_SIZE", "1"))
SESSIONS = 6 * SIZE
ACTIONS = 8
RESTARTS = 3 * SIZE
WAIT_S = 30.0 * SIZE  # bound on one wait for the server (a hang guard, never a performance assertion)
RETRY_S = 60.0  # how long a client keeps retrying one request through restarts
POLL_S = 0.05

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180 * SIZE)]

Entry = dict[str, Any]
T = TypeVar("T")

COMMON = (
    "--workers", "4", "--max-attempts", "2", "--retry-base-delay-s", "0.05", "--retry-max-delay-s", "0.1",
    "--grace-s", "0.5", "--lease-s", "2", "--heartbeat-s", "0.5", "--poll-interval-s", "0.2",
)  # fmt: skip


@dataclass(frozen=True)
class Mode:
    name: str
    args: tuple[str, ...]
    slow_sessions: bool  # every third session uses the slow-tool team


MODES = [
    Mode("default-team", (), False),
    Mode("all-teams", ("--teams", "slow=tests.process_teams:slow_team", "--stop-timeout-s", "1"), True),
]


class Stuck(Exception):
    """A session's driver gave up waiting (the problem is recorded); the others go on."""


@dataclass
class Sent:
    seq: int
    client_msg_id: str
    content: str
    answers: int | None = None  # the input whose question this message was sent to answer


@dataclass
class Client:
    """HTTP through restarts: connection errors, timeouts and 503 are retried (POSTs carry a client_msg_id, so a
    retried send that was in fact committed answers the first 202 again)."""

    http: aiohttp.ClientSession
    server: Server

    async def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, retry: bool = True
    ) -> tuple[int, Any]:
        deadline = time.monotonic() + RETRY_S
        while True:
            try:
                async with self.http.request(
                    method, self.server.url + path, json=body, timeout=aiohttp.ClientTimeout(total=10)
                ) as response:
                    if response.status != 503:
                        return response.status, await response.json()
                    failure: BaseException = RuntimeError(f"503: {await response.text()}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                failure = exc
            if not retry or time.monotonic() > deadline:
                raise failure
            await asyncio.sleep(0.1)


@dataclass
class Driver:
    """One session's random actions, one after the other."""

    client: Client
    session_id: str
    team: str
    rng: random.Random
    problems: list[str]
    sent: list[Sent] = field(default_factory=list)
    final: int | None = None

    # --- the API ------------------------------------------------------------------------------------------------
    async def send(self, content: str, answers: int | None = None) -> int:
        client_msg_id = f"{self.session_id}-m{len(self.sent) + 1}"
        body = {"content": content, "client_msg_id": client_msg_id}
        status, answer = await self.client.request("POST", f"/sessions/{self.session_id}/messages", body)
        assert status == 202, answer
        seq: int = answer["seq"]
        self.sent.append(Sent(seq, client_msg_id, content, answers))
        return seq

    async def cancel(self) -> bool:
        """Cancel now, if the server is up now (a cancel is a moment, not a message: it is not retried)."""
        try:
            status, body = await self.client.request(
                "POST", f"/sessions/{self.session_id}/cancel", retry=False
            )
        except (aiohttp.ClientError, TimeoutError, RuntimeError):
            return False
        assert status == 202, body
        return bool(body["cancelled"])

    async def cancel_soon(self, probability: float) -> None:
        """Sometimes, cancel at a random moment within the next second."""
        if self.rng.random() < probability:
            await asyncio.sleep(self.rng.uniform(0.0, 1.0))  # a random moment, not a synchronisation
            await self.cancel()

    async def status(self) -> str:
        code, body = await self.client.request("GET", f"/sessions/{self.session_id}")
        assert code == 200, body
        value: str = body["status"]
        return value

    async def log(self) -> list[Entry]:
        entries: list[Entry] = []
        while True:
            path = f"/sessions/{self.session_id}/messages?after={len(entries)}&limit=1000"
            code, page = await self.client.request("GET", path)
            assert code == 200, page
            entries += page["messages"]
            if not page["has_more"]:
                return entries

    async def until(
        self, probe: Callable[[], Awaitable[T | None]], what: str, timeout_s: float = WAIT_S
    ) -> T:
        deadline = time.monotonic() + timeout_s
        while True:
            value = await probe()
            if value is not None:
                return value
            if time.monotonic() > deadline:
                log = await self.log()
                self.problems.append(
                    f"session {self.session_id} ({self.team}): timed out after {timeout_s:.0f} s waiting for "
                    f"{what}; it is {await self.status()}:\n{describe(log, 14)}"
                )
                raise Stuck()
            await asyncio.sleep(POLL_S)

    async def ended(self, seq: int, what: str) -> list[Entry]:
        async def probe() -> list[Entry] | None:
            log = await self.log()
            return log if terminals(log, seq) else None

        return await self.until(probe, what)

    # --- actions ------------------------------------------------------------------------------------------------
    async def run(self, actions: int, chaos_done: asyncio.Event) -> None:
        """``actions`` actions (each kind at least once, in a random order), and more random ones (up to twice as
        many) while the restarts are not all done."""
        kinds = ["plain", "ask", "ask_fail", "fail", "sleep"]
        if self.team == "slow":
            kinds += ["tool", "tool_cancelled"]
        plan = kinds + [self.rng.choice(kinds) for _ in range(actions - len(kinds))]
        self.rng.shuffle(plan)
        try:
            await self.create()
            for i in range(2 * actions):
                if i >= actions and chaos_done.is_set():
                    break
                kind = plan[i] if i < len(plan) else self.rng.choice(kinds)
                await getattr(self, "do_" + kind)(i)
        except Stuck:
            pass

    async def create(self) -> None:
        body = {"session_id": self.session_id, "team": self.team}
        status, answer = await self.client.request("POST", "/sessions", body)
        assert status in (201, 409), answer  # 409: a retried create that had worked

    async def simple(self, content: str) -> None:
        seq = await self.send(content)
        await self.cancel_soon(0.2)
        if self.rng.random() < 0.5:
            await self.ended(seq, f"input {seq} ({content!r}) to end")

    async def do_plain(self, i: int) -> None:
        await self.simple(f"hello number {i}")

    async def do_fail(self, i: int) -> None:
        await self.simple(f"[[fail]] oops {i}")

    async def do_sleep(self, i: int) -> None:
        await self.simple(f"[[sleep:{self.rng.uniform(0.1, 1.5):.2f}]] nap {i}")

    async def do_tool(self, i: int) -> None:
        await self.simple(f"[[tool:slow:{self.rng.uniform(0.1, 1.0):.2f}]] short tool {i}")

    async def cancel_until_ended(self, seq: int, kind: str, what: str) -> None:
        """Cancel every run of input ``seq`` once it wrote a ``kind`` entry, until the input ends (a restart may
        come between the cancel and its run_cancelled: the retry is cancelled again)."""
        cancelled: set[str] = set()

        async def probe() -> bool | None:
            log = await self.log()
            if terminals(log, seq):
                return True
            entry = in_open_run(log, seq, kind)
            if entry is not None and entry["run_id"] not in cancelled and await self.cancel():
                cancelled.add(entry["run_id"])
            return None

        await self.until(probe, what)

    async def do_tool_cancelled(self, i: int) -> None:
        """A tool that would run 30 s, cancelled once its call is in the log."""
        seq = await self.send(f"[[tool:slow:30]] long tool {i}")
        await self.cancel_until_ended(
            seq, "ToolCallRequestEvent", f"the long tool call {seq} to end after a cancel"
        )

    async def do_ask_fail(self, i: int) -> None:
        """An answer that makes the run fail: every retry must get the same answer (and fail again)."""
        await self.do_ask(i, "fail")

    async def do_ask(self, i: int, answer_kind: str | None = None) -> None:
        """Ask; once the question is in the log answer it (plain, ``[[fail]]`` or ``[[sleep:S]]``), or cancel."""
        seq = await self.send(f"[[ask]] question {i}")
        await self.cancel_soon(0.1)

        async def asked_or_ended() -> str | None:
            log = await self.log()
            if terminals(log, seq):
                return "ended"
            if in_open_run(log, seq, "UserInputRequestedEvent") is not None:
                return "asked" if await self.status() == "awaiting_input" else None
            return None

        if await self.until(asked_or_ended, f"the question of input {seq} (or its end)") == "ended":
            return
        if answer_kind is None:
            roll = self.rng.random()
            if roll < 0.15:  # no answer: cancel the waiting run instead
                what = f"input {seq} to end after a cancel while it waited for an answer"
                await self.cancel_until_ended(seq, "UserInputRequestedEvent", what)
                return
            answer_kind = "plain" if roll < 0.55 else "fail" if roll < 0.8 else "sleep"
        prefix = {"plain": "", "fail": "[[fail]] ", "sleep": f"[[sleep:{self.rng.uniform(0.1, 1.5):.2f}]] "}
        await self.send(f"{prefix[answer_kind]}my answer {i} is 42", answers=seq)
        await self.cancel_soon(0.15)
        if self.rng.random() < 0.5:
            await self.ended(seq, f"input {seq} (answered) to end")

    # --- the end ------------------------------------------------------------------------------------------------
    async def settle_and_finish(self) -> None:
        """Wait until the session is idle or failed, then a final plain message must complete."""

        async def settled() -> str | None:
            status = await self.status()
            return status if status in ("idle", "failed") else None

        try:
            await self.until(settled, "the session to settle (idle or failed)", timeout_s=2 * WAIT_S)
            self.final = await self.send("final check")
            log = await self.ended(self.final, "the final message to end")
        except Stuck:
            return
        kinds = [e["type"] for e in terminals(log, self.final)]
        if kinds != ["run_completed"]:
            self.problems.append(
                f"session {self.session_id}: the final message ended {kinds}:\n{describe(log)}"
            )
        elif (status := await self.status()) != "idle":
            self.problems.append(f"session {self.session_id}: {status} after the final message completed")


def check_log(session_id: str, sent: list[Sent], log: list[Entry]) -> list[str]:
    """The invariant, on one session's whole log (see the module docstring)."""
    problems: list[str] = []

    def problem(text: str) -> None:
        problems.append(f"session {session_id}: {text}")

    if [e["seq"] for e in log] != list(range(1, len(log) + 1)):
        problem("the log's seqs are not 1..N")
    users = {e["seq"]: e for e in log if e["source"] == "user" and e["type"] == "TextMessage"}
    acknowledged = {s.seq for s in sent}
    for seq in sorted(set(users) - acknowledged):
        problem(f"user entry {seq} was never acknowledged to this client")
    for s in sent:
        user = users.get(s.seq)
        if user is None or user["client_msg_id"] != s.client_msg_id:
            problem(f"acknowledged seq {s.seq} ({s.client_msg_id}) is not that message in the log")
            continue
        ends, runs = terminals(log, s.seq), starts(log, s.seq)
        if len(ends) == 1:
            if any(r["seq"] > ends[0]["seq"] for r in runs):
                problem(f"input {s.seq} ({s.content!r}) started again after its terminal entry")
        elif len(ends) > 1:
            problem(
                f"input {s.seq} ({s.content!r}) has {len(ends)} terminal entries: {[e['seq'] for e in ends]}"
            )
        elif runs:
            problem(f"input {s.seq} ({s.content!r}) started but never ended")
        elif s.answers is None:
            problem(f"acknowledged input {s.seq} ({s.content!r}) never ran and was not sent as an answer")
        else:  # consumed as the answer to the question of s.answers
            asked = [e for e in log if e["type"] == "UserInputRequestedEvent" and e["seq"] < s.seq]
            owner_ends = terminals(log, s.answers)
            if not asked:
                problem(f"answer {s.seq} has no question before it")
            if not owner_ends or owner_ends[0]["seq"] < s.seq:
                problem(
                    f"answer {s.seq} is no run of its own, but the input it answered ({s.answers}) did not end after it"
                )
    for e in log:  # every lifecycle entry names an acknowledged input
        if e["source"] == "system" and "input_seq" in e and e["input_seq"] not in acknowledged:
            problem(f"entry {e['seq']} ({e['type']}) names input {e['input_seq']}, which nobody sent")
    ended_at: dict[str, Entry] = {}
    for e in log:
        run_id = e.get("run_id")
        if run_id is None:
            continue
        if run_id in ended_at:
            before = ended_at[run_id]
            # The one entry allowed after a run's retrying end: the cancel of that input's pending retry
            # (README "Guarantees": a cancel reaches a pending retry, and is never undone by a requeue).
            if e["type"] == "run_cancelled" and before["type"] != "run_cancelled" and not is_terminal(before):
                ended_at[run_id] = e
                continue
            problem(f"run {run_id} wrote an entry after the one that ended it:\n{describe([before, e])}")
        elif ends_run(e):
            ended_at[run_id] = e
    return problems


async def chaos(
    server: Server, rng: random.Random, drivers_done: asyncio.Event, problems: list[str]
) -> list[str]:
    """A few SIGKILL and SIGTERM restarts at random moments while the drivers work; what was done, in order."""
    kinds = [rng.choice(["SIGKILL", "SIGTERM"]) for _ in range(RESTARTS)]
    kinds[:2] = ["SIGKILL", "SIGTERM"]
    rng.shuffle(kinds)
    done: list[str] = []
    for kind in kinds:
        try:  # a random moment (the chaos schedule, not a synchronisation); stop once the drivers are done
            await asyncio.wait_for(drivers_done.wait(), rng.uniform(0.5, 2.5))
            break
        except TimeoutError:
            pass
        done.append(kind)
        if kind == "SIGTERM":
            try:
                code = await asyncio.to_thread(server.stop, 20.0)
            except subprocess.TimeoutExpired:
                problems.append("SIGTERM: the server did not exit within 20 s:\n" + server.tail())
            else:
                if code != 0:
                    problems.append(f"SIGTERM: the server exited with code {code}:\n" + server.tail())
        await asyncio.to_thread(server.restart)  # SIGKILL (if it still runs), then start on the same port
    return done


@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
async def test_soak(mode: Mode, tmp_path: Path) -> None:
    seed = int(os.environ.get("SOAK_SEED") or random.SystemRandom().randrange(2**32))
    tag = f"SOAK_SEED={seed} SOAK_SIZE={SIZE} ({mode.name})"
    print(tag)
    server = launch(tmp_path, str(tmp_path / "service.db"), *COMMON, *mode.args)
    problems: list[str] = []
    try:
        async with aiohttp.ClientSession() as http:
            client = Client(http, server)
            drivers = [
                Driver(
                    client,
                    f"soak{i}",
                    "slow" if mode.slow_sessions and i % 3 == 2 else "default",
                    random.Random(f"{seed}/{i}"),
                    problems,
                )
                for i in range(SESSIONS)
            ]
            drivers_done = asyncio.Event()
            chaos_task = asyncio.create_task(
                chaos(server, random.Random(f"{seed}/chaos"), drivers_done, problems)
            )
            chaos_done = asyncio.Event()
            chaos_task.add_done_callback(lambda _: chaos_done.set())
            await asyncio.gather(*(d.run(ACTIONS, chaos_done) for d in drivers))
            drivers_done.set()
            restarts = await chaos_task
            if not server.alive:
                server.restart()
            await asyncio.gather(*(d.settle_and_finish() for d in drivers))
            for d in drivers:
                problems += check_log(d.session_id, d.sent, await d.log())
        print(f"{tag}: restarts {restarts}, {sum(len(d.sent) for d in drivers)} messages acknowledged")
        assert not problems, f"{tag}: {len(problems)} problem(s):\n" + "\n".join(problems[:12])
        assert server.stop() == 0, server.tail()
    finally:
        server.kill()
