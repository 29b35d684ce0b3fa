"""schemathesis against /openapi.json of a real server process: no 5xx, every response matches the spec."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.server import start_server

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_schemathesis_finds_no_server_errors_and_no_spec_drift(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--workers", "2")
    try:
        st = Path(sys.executable).parent / "schemathesis"
        result = subprocess.run(
            [
                str(st),
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,"
                "response_schema_conformance",
                "--max-examples",
                "25",
                "--workers",
                "1",
                "--seed",
                "1",
                "--phases",
                "examples,coverage,fuzzing",
                "--max-time",
                "60",
                "--suppress-health-check",
                "all",
            ],
            capture_output=True,
            text=True,
            timeout=280,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        assert server.stop() == 0
    finally:
        server.kill()
