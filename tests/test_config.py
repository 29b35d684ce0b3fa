"""Settings: one table, precedence CLI > env > config.toml > defaults, every setting documented."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import SETTINGS, ConfigError, add_arguments, load_config
from service.worker.teams import DEFAULT_TEAM_FILE, TeamRegistry

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_without_any_source(tmp_path: Path) -> None:
    """With no source at all, every setting has the default of the settings table (what --help, the README
    and config.toml document), not merely whatever the Config dataclass says."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    config = load_config(cli={}, env={}, config_file=empty)
    for setting in SETTINGS:
        expected = {} if setting.name == "teams" else setting.default
        assert getattr(config, setting.name) == expected, setting.name
    assert config.jwt_secret is None
    # A few defaults the README promises in so many words.
    assert (config.host, config.port, config.database) == ("127.0.0.1", 8080, "data/service.db")
    assert (config.auth, config.sqlite_synchronous, config.max_page) == ("none", "FULL", 1000)


def test_precedence_cli_over_env_over_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('port = 9001\nworkers = 7\ndatabase = "from-file.db"\n[teams]\nx = "x.json"\n')
    env = {"SERVICE_PORT": "9002", "SERVICE_WORKERS": "8"}
    config = load_config(cli={"port": "9003"}, env=env, config_file=path)
    assert (config.port, config.workers, config.database) == (9003, 8, "from-file.db")
    assert config.teams == {"x": str(tmp_path / "x.json")}  # beside the config file


def test_team_files_named_in_a_config_file_are_found_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started from another folder (a service manager's working directory), the team files a config file
    names still load; paths given in the environment stay relative to the working directory."""
    folder = tmp_path / "deploy"
    (folder / "teams").mkdir(parents=True)
    (folder / "teams" / "support.json").write_bytes(DEFAULT_TEAM_FILE.read_bytes())
    (folder / "teams" / "sales").write_bytes(DEFAULT_TEAM_FILE.read_bytes())  # a file name without .json
    path = folder / "config.toml"
    path.write_text(
        '[teams]\nsupport = "teams/support.json"\nsales = "teams/sales"\n'
        'factory = "tests.teams_for_tests:four_turns_team"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(cli={}, env={}, config_file=path)
    assert config.teams["factory"] == "tests.teams_for_tests:four_turns_team"  # not a path: unchanged
    assert {"support", "sales", "factory"} <= set(TeamRegistry.from_config(config.teams).names())
    from_env = load_config(cli={}, env={"SERVICE_TEAMS": "support=teams/support.json"}, config_file=path)
    assert from_env.teams == {"support": "teams/support.json"}


def test_bad_values_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="port from SERVICE_PORT: expected int"):
        load_config(env={"SERVICE_PORT": "eighty"}, config_file=_empty(tmp_path))
    with pytest.raises(ConfigError, match="unknown setting"):
        bad = tmp_path / "bad.toml"
        bad.write_text("prot = 1\n")
        load_config(env={}, config_file=bad)
    with pytest.raises(ConfigError, match="not one of"):
        load_config(cli={"auth": "basic"}, env={}, config_file=_empty(tmp_path))


def test_auth_none_refuses_a_public_address(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"refusing to serve on 0\.0\.0\.0"):
        load_config(cli={"host": "0.0.0.0"}, env={}, config_file=_empty(tmp_path))
    ok = load_config(
        cli={"host": "0.0.0.0", "auth": "jwt"}, env={"SERVICE_JWT_SECRET": "s"}, config_file=_empty(tmp_path)
    )
    assert ok.auth == "jwt"
    with pytest.raises(ConfigError, match="SERVICE_JWT_SECRET"):
        load_config(cli={"auth": "jwt"}, env={}, config_file=_empty(tmp_path))


def test_every_setting_is_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    toml = (ROOT / "config.toml").read_text()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    help_text = parser.format_help()
    for setting in SETTINGS:
        assert f"`{setting.name}`" in readme, f"README does not document {setting.name}"
        assert setting.env in readme, f"README does not name {setting.env}"
        assert setting.name in toml, f"config.toml does not show {setting.name}"
        assert "--" + setting.name.replace("_", "-") in help_text


def test_cli_help_and_refusal_exit_codes() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert "--database" in out.stdout and "SERVICE_WORKERS" in out.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert refused.returncode == 2
    assert "refusing to serve on 0.0.0.0" in refused.stderr


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.toml"
    path.write_text("")
    return path


def test_bad_port_and_busy_port_are_clear_refusals() -> None:
    out_of_range = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--port", "99999", "--database", "memory://"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out_of_range.returncode == 2 and "port must be 0-65535" in out_of_range.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = subprocess.run(
            [sys.executable, "-m", "service", "serve", "--port", str(port), "--database", "memory://"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
    assert taken.returncode == 2 and f"cannot listen on 127.0.0.1 port {port}" in taken.stderr
    assert "Traceback" not in taken.stderr
