"""A real service process for acceptance tests: ``python -m service serve`` on a free port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
_LISTENING = re.compile(r"listening on (http://[^ ]+)")


class ServerProcess:
    """Start with ``start_server``; ``kill()`` is SIGKILL, ``stop()`` SIGTERM and wait, ``restart()`` same port."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.url = ""
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._seen_listening = threading.Event()

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws/chat/queue"

    def start(self, port: int = 0, timeout_s: float = 30.0) -> ServerProcess:
        self._seen_listening.clear()
        cmd = [sys.executable, "-m", "service", "serve", "--port", str(port), *self.args]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        assert self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        if not self._seen_listening.wait(timeout_s):
            self.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-40:]))
        return self

    def _read(self, stream: IO[str]) -> None:
        with stream, self.log_path.open("a") as log:
            for line in stream:
                self.lines.append(line)
                log.write(line)
                match = _LISTENING.search(line)
                if match:
                    self.url = match.group(1)
                    self._seen_listening.set()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def restart(self) -> ServerProcess:
        self.kill()
        deadline = time.monotonic() + 10
        while True:  # the port may linger a moment after the kill
            try:
                return self.start(self.port)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise

    def output(self) -> str:
        return "".join(self.lines)


def start_server(tmp_path: Path, *extra_args: str, env: dict[str, str] | None = None) -> ServerProcess:
    """A server on a fresh SQLite file in tmp_path (unless extra_args name another --database)."""
    args = list(extra_args)
    if "--database" not in args:
        args += ["--database", str(tmp_path / "service.db")]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("SERVICE_CONFIG", None)
    return ServerProcess(args, full_env, tmp_path / "server.log").start()
