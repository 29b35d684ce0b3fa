"""No session is ever stuck (issue 10), with real server processes that are SIGKILLed and SIGTERMed.

The invariant: every acknowledged input reaches exactly ONE terminal entry (``run_completed``, ``run_cancelled``,
or ``run_failed`` with ``retrying: false``) for its ``input_seq``, and the session then takes its next message.

How these failed on the base (9a5a669, before the fix):
* test_sigkill_while_an_answer_is_worked_on (sqlite and postgresql): after the restart the log shows
  ``run_interrupted``, attempt 2 asks the question again, and the session waits in ``awaiting_input`` for good (the
  answer's queue item was already done): "timed out ... waiting for the ask's terminal entry".
* test_cancel_and_sigterm_while_a_slow_tool_runs, test_poison_message_ends_after_max_interruptions and
  test_stalled_run_ends_with_a_final_failure: the server refuses to start ("unrecognized arguments:
  --stop-timeout-s / --max-interruptions / --stall-timeout-s"). Run without those flags, the base showed the faults
  themselves: the cancel during the tool answered {"cancelled": true} but no run_cancelled came (session stuck
  ``running``); SIGTERM while the tool ran did not exit within 20 s; the poison message killed every restarted
  server ("killed the server 4 times (cap 2)"); the stalled run was never stopped.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import aiohttp
import pytest

from tests.pg import pg_database
from tests.server import ROOT, ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

Entry = dict[str, Any]
T = TypeVar("T")

WAIT_S = 30.0  # bound on any single wait (a hang guard, never a performance assertion)
POLL_S = 0.05
FAST = ("--lease-s", "2", "--heartbeat-s", "0.5", "--poll-interval-s", "0.2")
SLOW_TEAM = "slow=tests.process_teams:slow_team"
KILLER_TEAM = "killer=tests.process_teams:killer_team"
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
# What a final run_failed must say (loosely: the wording is the service's).
INTERRUPTED_TOO_OFTEN = re.compile(r"interrupt|stopped|died|crash|killed", re.IGNORECASE)
NO_PROGRESS = re.compile(r"progress|stall|no output|inactiv|silent", re.IGNORECASE)
MAX_INTERRUPTIONS = 2


# --- a server process that fails fast ---------------------------------------------------------------------------
class ServerExited(RuntimeError):
    """The process ended before it listened (a refused flag, or it died while starting)."""


class Server(ServerProcess):
    """``tests.server.ServerProcess`` whose ``start`` returns as soon as the process ends instead of waiting out
    its timeout: on the base the new flags make the server exit at once, and a poison message may kill it while
    it starts."""

    def start(self, port: int = 0, timeout_s: float = 30.0) -> Server:
        cmd = [sys.executable, "-m", "service", "serve", "--port", str(port), *self.args]
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.proc = proc
        ended = threading.Event()  # listening, or the output ended (the process is gone)
        found: list[str] = []
        assert proc.stdout is not None
        threading.Thread(target=self._follow, args=(proc.stdout, ended, found), daemon=True).start()
        if not ended.wait(timeout_s):
            self.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-40:]))
        if not found:
            code = proc.wait(10)
            raise ServerExited(
                f"the server exited (code {code}) before listening:\n" + "".join(self.lines[-30:])
            )
        self.url = found[0]
        return self

    def _follow(self, stream: IO[str], ended: threading.Event, found: list[str]) -> None:
        try:
            with stream, self.log_path.open("a") as log:
                for line in stream:
                    self.lines.append(line)
                    log.write(line)
                    match = re.search(r"listening on (http://[^ ]+)", line)
                    if match and not found:
                        found.append(match.group(1))
                        ended.set()
        finally:
            ended.set()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def died(self, timeout_s: float = 10.0) -> bool:
        """Wait a moment for the process to end (it was SIGKILLed from inside); True when it did."""
        assert self.proc is not None
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def tail(self, lines: int = 25) -> str:
        return "".join(self.lines[-lines:])


def launch(tmp_path: Path, database: str, *args: str) -> Server:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SERVICE_CONFIG", None)
    return Server([*args, "--database", database], env, tmp_path / "server.log").start()


@contextmanager
def database(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield str(tmp_path / "service.db")
    else:
        with pg_database() as url:
            yield url


# --- the log ----------------------------------------------------------------------------------------------------
def is_terminal(entry: Entry) -> bool:
    kind = entry["type"]
    return kind in ("run_completed", "run_cancelled") or (kind == "run_failed" and not entry.get("retrying"))


def ends_run(entry: Entry) -> bool:
    """The last entry a run may write: its terminal entry, a retrying run_failed, or run_interrupted."""
    return entry["type"] in ("run_completed", "run_cancelled", "run_failed", "run_interrupted")


def terminals(log: list[Entry], input_seq: int) -> list[Entry]:
    return [e for e in log if is_terminal(e) and e.get("input_seq") == input_seq]


def starts(log: list[Entry], input_seq: int) -> list[Entry]:
    return [e for e in log if e["type"] == "run_started" and e.get("input_seq") == input_seq]


def open_runs(log: list[Entry], input_seq: int) -> list[str]:
    """Run ids of ``input_seq`` that have not ended yet."""
    ended = {e["run_id"] for e in log if ends_run(e)}
    return [e["run_id"] for e in starts(log, input_seq) if e["run_id"] not in ended]


def in_open_run(log: list[Entry], input_seq: int, kind: str) -> Entry | None:
    """The last ``kind`` entry written by a still open run of ``input_seq``."""
    runs = set(open_runs(log, input_seq))
    found = [e for e in log if e["type"] == kind and e["run_id"] in runs]
    return found[-1] if found else None


def replies(log: list[Entry], after: int = 0) -> list[Entry]:
    return [e for e in log if e["type"] == "TextMessage" and e["source"] == "assistant" and e["seq"] > after]


def describe(log: list[Entry], last: int = 20) -> str:
    def line(e: Entry) -> str:
        extra = " ".join(
            f"{k}={e[k]}" for k in ("input_seq", "attempt", "retrying", "error", "stop_reason") if k in e
        )
        content = e["content"] if isinstance(e["content"], str) else str(e["content"])
        return f"  {e['seq']:>4} {e['type']:<26} {e['source']:<9} {str(e.get('run_id'))[-6:]:>6} {extra} {content[:70]!r}"

    return "\n".join(line(e) for e in log[-last:])


# --- the API ----------------------------------------------------------------------------------------------------
class Api:
    def __init__(self, http: aiohttp.ClientSession, server: Server) -> None:
        self.http = http
        self.server = server

    async def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        async with self.http.request(
            method, self.server.url + path, json=body, timeout=aiohttp.ClientTimeout(total=15)
        ) as response:
            return response.status, await response.json()

    async def create(self, session_id: str, team: str) -> None:
        status, body = await self._json("POST", "/sessions", {"session_id": session_id, "team": team})
        assert status == 201, body

    async def send(self, session_id: str, content: str, client_msg_id: str) -> int:
        status, body = await self._json(
            "POST", f"/sessions/{session_id}/messages", {"content": content, "client_msg_id": client_msg_id}
        )
        assert status == 202, body
        seq: int = body["seq"]
        return seq

    async def cancel(self, session_id: str) -> bool:
        status, body = await self._json("POST", f"/sessions/{session_id}/cancel")
        assert status == 202, body
        cancelled: bool = body["cancelled"]
        return cancelled

    async def status(self, session_id: str) -> str:
        status, body = await self._json("GET", f"/sessions/{session_id}")
        assert status == 200, body
        value: str = body["status"]
        return value

    async def log(self, session_id: str) -> list[Entry]:
        entries: list[Entry] = []
        while True:
            path = f"/sessions/{session_id}/messages?after={len(entries)}&limit=1000"
            status, page = await self._json("GET", path)
            assert status == 200, page
            entries += page["messages"]
            if not page["has_more"]:
                return entries

    async def explain(self, session_id: str) -> str:
        try:
            status, log = await self.status(session_id), await self.log(session_id)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"(server unreachable: {exc!r})\nserver output:\n{self.server.tail()}"
        return (
            f"session {session_id} is {status}; log:\n{describe(log)}\nserver output:\n{self.server.tail(12)}"
        )

    async def until(
        self, session_id: str, probe: Callable[[], Awaitable[T | None]], what: str, timeout_s: float = WAIT_S
    ) -> T:
        """Poll ``probe`` until it answers something; fail with the session's status and log after the bound."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = await probe()
            if value is not None:
                return value
            if time.monotonic() > deadline:
                detail = await self.explain(session_id)
                raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{detail}")
            await asyncio.sleep(POLL_S)

    async def ended(
        self, session_id: str, input_seq: int, what: str, timeout_s: float = WAIT_S
    ) -> list[Entry]:
        """The log once ``input_seq`` has a terminal entry."""

        async def probe() -> list[Entry] | None:
            log = await self.log(session_id)
            return log if terminals(log, input_seq) else None

        return await self.until(session_id, probe, what, timeout_s)

    async def completes(self, session_id: str, content: str, client_msg_id: str) -> list[Entry]:
        """Send a plain message; it must end with exactly one terminal entry, run_completed."""
        seq = await self.send(session_id, content, client_msg_id)
        log = await self.ended(session_id, seq, f"the next message ({content!r}) to end")
        assert [e["type"] for e in terminals(log, seq)] == ["run_completed"], await self.explain(session_id)
        assert any(content in r["content"] for r in replies(log, seq)), await self.explain(session_id)
        return log

    async def wait_for_open(self, session_id: str, input_seq: int, kind: str, what: str) -> Entry:
        async def probe() -> Entry | None:
            return in_open_run(await self.log(session_id), input_seq, kind)

        return await self.until(session_id, probe, what)


def assert_one_terminal(log: list[Entry], input_seq: int, kind: str) -> Entry:
    found = terminals(log, input_seq)
    assert [e["type"] for e in found] == [kind], f"input {input_seq}:\n{describe(log, 60)}"
    return found[0]


def assert_runs_end_last(log: list[Entry]) -> None:
    """No run writes anything after the entry that ended it."""
    ended_at: dict[str, int] = {}
    for e in log:
        run_id = e.get("run_id")
        if run_id is None:
            continue
        assert run_id not in ended_at, (
            f"run {run_id} wrote seq {e['seq']} after it ended:\n{describe(log, 60)}"
        )
        if ends_run(e):
            ended_at[run_id] = e["seq"]


# --- a: SIGKILL while the team works on a human's answer ------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
async def test_sigkill_while_an_answer_is_worked_on(backend: str, tmp_path: Path) -> None:
    """The answer belongs to the run that asked: the retry after the crash asks again and gets the SAME answer
    without the user sending it again, and the input ends run_completed."""
    with database(backend, tmp_path) as db:
        server = launch(tmp_path, db, *FAST)
        try:
            async with aiohttp.ClientSession() as http:
                api, sid = Api(http, server), "a1"
                ask = await api.send(sid, "[[ask]] plan a trip", "ask")

                async def asked() -> bool | None:
                    log = await api.log(sid)
                    if in_open_run(log, ask, "UserInputRequestedEvent") is None:
                        return None
                    return True if await api.status(sid) == "awaiting_input" else None

                await api.until(sid, asked, "the team's question (awaiting_input)")
                answer = await api.send(sid, "[[sleep:5]] the answer is 42", "answer")

                async def working() -> list[Entry] | None:
                    # The answer was taken (the session left awaiting_input) and the model is still sleeping on it.
                    return await api.log(sid) if await api.status(sid) == "running" else None

                before_kill = await api.until(sid, working, "the run to take the answer (running)")
                server.kill()
                assert not replies(before_kill, answer), (
                    "the kill came too late: the answer was already answered"
                )

                server.restart()
                log = await api.ended(sid, ask, "the ask's terminal entry after the restart")
                assert "run_interrupted" in [e["type"] for e in log if e.get("input_seq") == ask]
                assert_one_terminal(log, ask, "run_completed")
                attempts = starts(log, ask)
                assert len(attempts) >= 2, describe(log, 60)
                first, retry = attempts[0], attempts[-1]
                # The first attempt died before it answered; the retry answered with the SAME answer, which the
                # user sent only once.
                first_replies = [r for r in replies(log) if r["run_id"] == first["run_id"]]
                assert not any("the answer is 42" in r["content"] for r in first_replies), describe(log, 60)
                assert any("the answer is 42" in r["content"] for r in replies(log, retry["seq"])), describe(
                    log, 60
                )
                users = [e for e in log if e["source"] == "user" and e["type"] == "TextMessage"]
                assert [u["client_msg_id"] for u in users] == ["ask", "answer"]
                assert not starts(log, answer)  # the answer is not a run of its own
                assert_runs_end_last(log)
                assert await api.status(sid) == "idle"

                await api.completes(sid, "what did we plan?", "next")
            assert server.stop() == 0
        finally:
            server.kill()


# --- b: cancel and SIGTERM while a slow tool executes -----------------------------------------------------------
async def test_cancel_and_sigterm_while_a_slow_tool_runs(tmp_path: Path) -> None:
    """AutoGen 0.7.5 never returns from run_stream when its token is cancelled during a tool call; the service
    waits ``stop_timeout_s`` for it, then abandons the team and writes the outcome itself."""
    db = str(tmp_path / "service.db")
    server = launch(tmp_path, db, *FAST, "--teams", SLOW_TEAM, "--grace-s", "1", "--stop-timeout-s", "1")
    try:
        async with aiohttp.ClientSession() as http:
            api = Api(http, server)

            # (1) Cancel while the tool runs: run_cancelled follows, and the next message completes.
            await api.create("c1", "slow")
            seq = await api.send("c1", "[[tool:slow:30]] part one", "c1-tool")
            await api.wait_for_open("c1", seq, "ToolCallRequestEvent", "the tool call")
            assert await api.cancel("c1") is True
            log = await api.ended("c1", seq, "run_cancelled after a cancel during the tool call")
            assert_one_terminal(log, seq, "run_cancelled")
            assert await api.status("c1") == "idle"
            await api.completes("c1", "still there?", "c1-next")

            # (2) SIGTERM while the tool runs in another session: the process exits, the run was put back.
            await api.create("c2", "slow")
            seq2 = await api.send("c2", "[[tool:slow:30]] part two", "c2-tool")
            await api.wait_for_open("c2", seq2, "ToolCallRequestEvent", "the tool call")
            try:
                code = await asyncio.to_thread(server.stop, 20.0)
            except subprocess.TimeoutExpired:
                pytest.fail(
                    "SIGTERM while a tool runs: the process did not exit within 20 s\n" + server.tail()
                )
            assert code == 0, server.tail()

            server.restart()
            log = await api.log("c2")
            assert [e["type"] for e in log if e.get("input_seq") == seq2 and ends_run(e)] == [
                "run_interrupted"
            ]
            assert not terminals(log, seq2)
            # The retry runs the slow tool again; cancel it there too.
            await api.wait_for_open("c2", seq2, "ToolCallRequestEvent", "the retry's tool call")
            assert await api.cancel("c2") is True
            log = await api.ended("c2", seq2, "run_cancelled of the retry")
            assert_one_terminal(log, seq2, "run_cancelled")
            assert [s["attempt"] for s in starts(log, seq2)][-1] >= 2
            await api.completes("c2", "and now?", "c2-next")
            for sid in ("c1", "c2"):
                assert_runs_end_last(await api.log(sid))
        assert server.stop() == 0
    finally:
        server.kill()


# --- c: a poison message that kills the process on every attempt ------------------------------------------------
async def _ended_or_died(api: Api, session_id: str, input_seq: int) -> bool:
    """True once ``input_seq`` has a terminal entry; False when the server died first."""
    deadline = time.monotonic() + WAIT_S
    while api.server.alive:
        try:
            log = await api.log(session_id)
        except aiohttp.ClientError:
            if await asyncio.to_thread(api.server.died):
                return False
            raise
        if terminals(log, input_seq):
            return True
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the server neither died nor ended input {input_seq}\n{await api.explain(session_id)}"
            )
        await asyncio.sleep(POLL_S)
    return False


@pytest.mark.parametrize("backend", BACKENDS)
async def test_poison_message_ends_after_max_interruptions(backend: str, tmp_path: Path) -> None:
    """A message whose tool SIGKILLs the server is not re-queued forever: after ``max_interruptions`` deaths it
    ends with one final run_failed saying why, and the session takes its next message."""
    with database(backend, tmp_path) as db:
        server = launch(
            tmp_path, db, *FAST, "--teams", KILLER_TEAM, "--max-interruptions", str(MAX_INTERRUPTIONS)
        )
        try:
            async with aiohttp.ClientSession() as http:
                api, sid = Api(http, server), "p1"
                await api.create(sid, "killer")
                await api.completes(sid, "hello", "hello")  # the team works for ordinary messages

                poison: int | None = None
                deaths = 0
                while True:
                    if not server.alive:
                        deaths += 1
                        assert deaths <= MAX_INTERRUPTIONS + 1, (
                            f"the poison message killed the server {deaths} times (cap {MAX_INTERRUPTIONS})\n"
                            + server.tail()
                        )
                        try:
                            server.start()  # a new port each time: it may die again while it starts
                        except ServerExited:
                            continue
                    try:
                        if poison is None:  # the process may die before its 202 arrives: send it again
                            poison = await api.send(sid, "[[tool:die:x]] poison", "poison")
                        if await _ended_or_died(api, sid, poison):
                            break
                    except aiohttp.ClientError:
                        assert await asyncio.to_thread(server.died), server.tail()
                assert deaths >= 1

                log = await api.log(sid)
                final = assert_one_terminal(log, poison, "run_failed")
                assert INTERRUPTED_TOO_OFTEN.search(final["error"]), final
                assert len([e for e in log if e["type"] == "run_interrupted"]) <= MAX_INTERRUPTIONS
                assert_runs_end_last(log)
                assert await api.status(sid) == "failed"
                await api.completes(sid, "are you ok?", "after")
                assert await api.status(sid) == "idle"
            assert server.stop() == 0
        finally:
            server.kill()


# --- d: a run that makes no progress ----------------------------------------------------------------------------
async def test_stalled_run_ends_with_a_final_failure(tmp_path: Path) -> None:
    """A run with no output for ``stall_timeout_s`` (a tool that hangs) is stopped (and abandoned after
    ``stop_timeout_s``) with one final run_failed that says it made no progress; the session moves on."""
    server = launch(
        tmp_path,
        str(tmp_path / "service.db"),
        *FAST,
        "--teams",
        SLOW_TEAM,
        "--stall-timeout-s",
        "2",
        "--stop-timeout-s",
        "1",
        "--retry-base-delay-s",
        "0.1",
    )
    try:
        async with aiohttp.ClientSession() as http:
            api, sid = Api(http, server), "d1"
            await api.create(sid, "slow")
            seq = await api.send(sid, "[[tool:slow:60]] hang", "hang")
            log = await api.ended(sid, seq, "the stalled run's final run_failed", timeout_s=45)
            final = assert_one_terminal(log, seq, "run_failed")
            assert NO_PROGRESS.search(final["error"]), final
            assert "ToolCallRequestEvent" in [e["type"] for e in log]
            assert_runs_end_last(log)
            assert await api.status(sid) == "failed"
            await api.completes(sid, "hello again", "next")
            assert await api.status(sid) == "idle"
        assert server.stop() == 0
    finally:
        server.kill()
