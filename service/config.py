"""Configuration: ONE settings table feeds the command line, the environment, config.toml and the docs.

Precedence: command line > ``SERVICE_<NAME>`` environment variables > ``config.toml`` > defaults.
A test checks that every setting is documented in the README and in config.toml.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from service.errors import ServiceError
from service.models import DEFAULT_MAX_INTERRUPTIONS


class ConfigError(ServiceError):
    """Invalid configuration."""


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    cli: bool = True

    @property
    def env(self) -> str:
        return "SERVICE_" + self.name.upper()

    @property
    def kind(self) -> type:
        return type(self.default)


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "127.0.0.1", "address to listen on (auth 'none' requires a loopback address)"),
    Setting("port", 8080, "TCP port to listen on"),
    Setting(
        "database",
        "data/service.db",
        "a SQLite file path, sqlite:///path, memory:// (not durable) or postgresql://...",
    ),
    Setting("workers", 4, "concurrent runs (worker slots) in this process"),
    Setting(
        "auth",
        "none",
        "none (loopback only, user 'local') or jwt (HS256, secret in SERVICE_JWT_SECRET)",
        choices=("none", "jwt"),
    ),
    Setting(
        "sqlite_synchronous",
        "FULL",
        "SQLite synchronous pragma: FULL (survives power loss) or NORMAL",
        choices=("FULL", "NORMAL"),
    ),
    Setting(
        "sqlite_wal_limit_mb",
        64,
        "SQLite: size the write-ahead log is brought back under (checkpoint, then truncate) once no reader holds"
        " it, checked every few seconds",
    ),
    Setting(
        "pg_writers",
        1,
        "PostgreSQL: connections that group-commit writes at once; more than 1 only pays when the database"
        " server has idle cores (each writer's batches are smaller, so a write costs it more CPU)",
    ),
    Setting(
        "lease_s",
        30.0,
        "seconds a claimed input stays leased without a heartbeat before another worker may recover it",
    ),
    Setting(
        "heartbeat_s",
        5.0,
        "seconds between lease heartbeats (and checks for cancel requests from other processes)",
    ),
    Setting("poll_interval_s", 1.0, "seconds between queue polls when no in-process wake-up arrives"),
    Setting(
        "grace_s",
        10.0,
        "seconds running runs get to finish on shutdown before they are put back in the queue",
    ),
    Setting("max_attempts", 3, "attempts of a failing run before run_failed with retrying false"),
    Setting("retry_base_delay_s", 1.0, "backoff before the 2nd attempt; doubles each attempt"),
    Setting("retry_max_delay_s", 60.0, "backoff cap"),
    Setting(
        "stop_timeout_s",
        10.0,
        "seconds a team gets to end after it was asked to stop (cancel, shutdown, stall); then it is abandoned"
        " and the service writes the outcome itself",
    ),
    Setting(
        "stall_timeout_s",
        900.0,
        "seconds a run may go without any output (not counting waits for a human) before it is stopped with a"
        " final run_failed; 0 turns it off",
    ),
    Setting(
        "draft_interval_s",
        0.25,
        "seconds between saves of a streaming message's text so far (readers on other instances resume from it;"
        " after a crash it becomes a partial entry); 0: not saved",
    ),
    Setting(
        "live_teams",
        32,
        "sessions whose team object this process keeps after a completed run (least recently used out), so their"
        " next run here skips building the team and loading its state; used only when nothing else changed that"
        " state; 0: build every run",
    ),
    Setting(
        "max_interruptions",
        DEFAULT_MAX_INTERRUPTIONS,
        "times the process may die while running one message before it ends with a final run_failed; 0: no cap",
    ),
    Setting(
        "session_ttl_days",
        0.0,
        "delete sessions without a new log entry for this many days (nothing queued or running); 0: keep forever",
    ),
    Setting("sweep_interval_s", 600.0, "seconds between retention sweeps (when session_ttl_days is set)"),
    Setting("max_body_bytes", 1_048_576, "largest HTTP request body (413 too_large beyond)"),
    Setting("max_frame_bytes", 262_144, "largest WebSocket frame (error frame too_large beyond)"),
    Setting("max_message_chars", 100_000, "longest user message content (too_large beyond)"),
    Setting("max_queued_per_session", 100, "queued inputs per session before 429 queue_full"),
    Setting("max_page", 1000, "largest page of log entries (larger limits are clamped)"),
    Setting("send_buffer", 1000, "live items buffered per connection before it is switched back to replay"),
    Setting(
        "teams",
        "",
        "extra teams as name=path.json or name=module:function, comma separated (config.toml: [teams] table)",
    ),
    Setting(
        "webhook_url",
        "",
        "server default webhook URL (http or https) for sessions created without their own; needs"
        " SERVICE_WEBHOOK_SECRET; empty: none",
    ),
    Setting(
        "webhook_allow_private",
        False,
        "allow webhook URLs on loopback, private and link-local addresses (off: refused)",
    ),
    Setting("webhook_max_attempts", 10, "delivery attempts of a webhook event before it is given up"),
    Setting("webhook_base_delay_s", 1.0, "backoff after a failed webhook delivery; doubles each attempt"),
    Setting("webhook_max_delay_s", 300.0, "webhook backoff cap"),
    Setting("webhook_timeout_s", 10.0, "seconds one webhook POST may take (shorter than lease_s)"),
    Setting(
        "log_level", "INFO", "DEBUG, INFO, WARNING or ERROR", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    ),
)


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    database: str = "data/service.db"
    workers: int = 4
    auth: str = "none"
    sqlite_synchronous: str = "FULL"
    sqlite_wal_limit_mb: int = 64
    pg_writers: int = 1
    lease_s: float = 30.0
    heartbeat_s: float = 5.0
    poll_interval_s: float = 1.0
    grace_s: float = 10.0
    max_attempts: int = 3
    retry_base_delay_s: float = 1.0
    retry_max_delay_s: float = 60.0
    stop_timeout_s: float = 10.0
    stall_timeout_s: float = 900.0
    draft_interval_s: float = 0.25
    live_teams: int = 32
    max_interruptions: int = DEFAULT_MAX_INTERRUPTIONS
    session_ttl_days: float = 0.0
    sweep_interval_s: float = 600.0
    max_body_bytes: int = 1_048_576
    max_frame_bytes: int = 262_144
    max_message_chars: int = 100_000
    max_queued_per_session: int = 100
    max_page: int = 1000
    send_buffer: int = 1000
    teams: Mapping[str, str] = field(default_factory=dict)
    webhook_url: str = ""
    webhook_allow_private: bool = False
    webhook_max_attempts: int = 10
    webhook_base_delay_s: float = 1.0
    webhook_max_delay_s: float = 300.0
    webhook_timeout_s: float = 10.0
    log_level: str = "INFO"
    jwt_secret: str | None = field(default=None, repr=False)  # only from the environment (SERVICE_JWT_SECRET)
    # only from the environment (SERVICE_WEBHOOK_SECRET)
    webhook_secret: str | None = field(default=None, repr=False)

    def with_(self, **changes: Any) -> Config:
        return replace(self, **changes)

    def validate(self) -> Config:
        if self.auth == "none" and not is_loopback(self.host):
            raise ConfigError(
                f"refusing to serve on {self.host} with --auth none: anyone could read every chat. "
                "Use --auth jwt (and SERVICE_JWT_SECRET) or a loopback host such as 127.0.0.1."
            )
        if self.auth == "jwt" and not self.jwt_secret:
            raise ConfigError("--auth jwt needs the secret in the environment variable SERVICE_JWT_SECRET")
        for name in (
            "workers",
            "max_attempts",
            "max_body_bytes",
            "max_frame_bytes",
            "max_message_chars",
            "max_queued_per_session",
            "max_page",
            "send_buffer",
            "sqlite_wal_limit_mb",
            "pg_writers",
            "webhook_max_attempts",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0-65535 (0: any free port), got {self.port}")
        for name in (
            "lease_s",
            "heartbeat_s",
            "poll_interval_s",
            "sweep_interval_s",
            "webhook_base_delay_s",
            "webhook_max_delay_s",
            "webhook_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        for setting in SETTINGS:
            value = getattr(self, setting.name, None)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{setting.name} must be a finite number, got {value}")
        if self.stop_timeout_s <= 0:
            raise ConfigError("stop_timeout_s must be positive")
        for name in (
            "stall_timeout_s",
            "max_interruptions",
            "draft_interval_s",
            "session_ttl_days",
            "live_teams",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 (off) or positive")
        if self.heartbeat_s >= self.lease_s:
            raise ConfigError("heartbeat_s must be shorter than lease_s, or leases expire between heartbeats")
        self._validate_webhooks()
        return self

    def _validate_webhooks(self) -> None:
        from service.webhooks import check_url, signer

        if self.webhook_secret:
            try:
                signer(self.webhook_secret)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if not self.webhook_url:
            return
        if not self.webhook_secret:
            raise ConfigError(
                "webhook_url needs the signing secret in the environment variable SERVICE_WEBHOOK_SECRET"
            )
        try:
            check_url(self.webhook_url, self.webhook_allow_private)
        except ServiceError as exc:
            raise ConfigError(
                exc.message.replace("webhook_url", f"webhook_url {self.webhook_url!r}", 1)
            ) from None
        if self.webhook_timeout_s >= self.lease_s:
            raise ConfigError("webhook_timeout_s must be shorter than lease_s, or a slow POST is sent twice")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _coerce(setting: Setting, value: Any, origin: str) -> Any:
    if setting.name == "teams":
        return _parse_teams(value, origin)
    try:
        if setting.kind is bool:
            out: Any = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
        else:
            out = setting.kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{setting.name} from {origin}: expected {setting.kind.__name__}, got {value!r}"
        ) from exc
    if setting.choices and str(out) not in setting.choices:
        choices = ", ".join(setting.choices)
        raise ConfigError(f"{setting.name} from {origin}: {out!r} is not one of {choices}")
    return out


def _parse_teams(value: Any, origin: str) -> dict[str, str]:
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    teams: dict[str, str] = {}
    for part in str(value).split(","):
        if not part.strip():
            continue
        name, sep, target = part.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise ConfigError(
                f"teams from {origin}: expected name=path.json or name=module:function, got {part!r}"
            )
        teams[name.strip()] = target.strip()
    return teams


FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def names_a_factory(spec: str) -> bool:
    """A team spec is ``module:function`` (a factory) or else a JSON file path: the one rule, for the config
    and the team registry."""
    return not spec.endswith(".json") and FACTORY_SPEC.match(spec) is not None


def _beside(config_file: Path, teams: Mapping[str, str]) -> dict[str, str]:
    """Team files named in a config file are found beside it (README "Configuration"), wherever the service
    is started from: a relative file path is taken relative to the config file's folder."""
    folder = config_file.resolve().parent
    return {
        name: spec if names_a_factory(spec) or Path(spec).is_absolute() else str(folder / spec)
        for name, spec in teams.items()
    }


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    known = {s.name for s in SETTINGS}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return data


def load_config(
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Config:
    """Merge defaults < config.toml < environment < command line, and validate."""
    env = os.environ if env is None else env
    cli = cli or {}
    path = config_file or (Path(env["SERVICE_CONFIG"]) if env.get("SERVICE_CONFIG") else None)
    if path is None and Path("config.toml").is_file():
        path = Path("config.toml")
    from_file = read_toml(path) if path is not None else {}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if cli.get(setting.name) is not None:
            values[setting.name] = _coerce(setting, cli[setting.name], "the command line")
        elif setting.env in env:
            values[setting.name] = _coerce(setting, env[setting.env], setting.env)
        elif setting.name in from_file:
            values[setting.name] = _coerce(setting, from_file[setting.name], str(path))
            if setting.name == "teams" and path is not None:
                values["teams"] = _beside(path, values["teams"])
    values["jwt_secret"] = env.get("SERVICE_JWT_SECRET") or None
    values["webhook_secret"] = env.get("SERVICE_WEBHOOK_SECRET") or None
    return Config(**values).validate()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (default: ./config.toml when present)")
    for setting in SETTINGS:
        if not setting.cli:
            continue
        flag = "--" + setting.name.replace("_", "-")
        default_text = setting.default if setting.default != "" else "none"
        parser.add_argument(
            flag,
            dest=setting.name,
            default=None,
            choices=setting.choices,
            help=f"{setting.help} [env {setting.env}; default {default_text}]",
        )


def setting_names() -> Sequence[str]:
    return [s.name for s in SETTINGS]


assert {f.name for f in fields(Config)} == {s.name for s in SETTINGS} | {"jwt_secret", "webhook_secret"}, (
    "settings table drift"
)
