"""A real ``python -m service serve`` process for benchmarks (bench does not import tests).

``async with served(folder, "--database", url) as server:`` starts it on a free loopback port, waits for its
"listening on" line and always stops it: SIGTERM, then SIGKILL after a grace period, even when the bench fails.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_LISTENING = re.compile(r"listening on (http://\S+)")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


class Server:
    """One service process; its output goes to a log file (no pipe to drain, none to fill up)."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.url = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ws_url(self) -> str:
        return self.url + "/ws/chat/queue"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.output())
            if match:
                self.url = match.group(1)
                return
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)  # polling a log file: the process offers no other signal
        raise RuntimeError("the service did not start:\n" + self.output()[-4000:])

    def rss_kib(self) -> int:
        """Resident set size of the process (VmRSS in /proc/<pid>/status), in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    def cpu_s(self) -> float:
        """User + system CPU seconds the process has used (utime and stime in /proc/<pid>/stat)."""
        # The command name (field 2) may hold spaces; the numeric fields follow its closing parenthesis.
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def stop(self) -> int:
        """SIGTERM and wait; SIGKILL when it does not exit in time. The exit code."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()


@asynccontextmanager
async def served(folder: Path, *args: str, name: str = "server") -> AsyncIterator[Server]:
    """A running service with ``args`` (e.g. ``--database``, ``--workers``); its log is ``folder/name.log``."""
    log_path = folder / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # The bench sets everything on the command line; no config file or SERVICE_* variable may change it.
    for key in [k for k in env if k.startswith("SERVICE_")]:
        del env[key]
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", "0", *args],
            cwd=folder,
            env={**env, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    server = Server(proc, log_path)
    try:
        await server.wait_listening()
        yield server
    finally:
        code = await server.stop()
        if code != 0:  # a graceful SIGTERM shutdown exits 0; anything else deserves a look at the log
            print(f"{name} exited with {code}, see {log_path}:\n{server.output()[-2000:]}", file=sys.stderr)
