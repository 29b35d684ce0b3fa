"""Quiet logs: AutoGen's runtime tracebacks are demoted; error texts are one line and secret-free."""

from __future__ import annotations

import asyncio
import logging
import os
import re

MAX_ERROR_CHARS = 300
_SECRET_NAME = re.compile(r"(API_KEY|SECRET|TOKEN|PASSWORD)$", re.IGNORECASE)
_RUNTIME_LOGGERS = ("autogen_core",)


class DemoteRuntimeTracebacks(logging.Filter):
    """The AutoGen runtime logs an ERROR with a traceback ("Error processing publish message ...") whenever
    an agent handler raises, which includes every cancellation. The runner logs what happened in one line, so
    these become DEBUG records (there for whoever turns debug logging on); cancellations are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.getMessage().startswith("Error processing publish"):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, asyncio.CancelledError):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_FILTER = DemoteRuntimeTracebacks()


def install_log_filters() -> None:
    """Idempotent: add the filter to AutoGen's runtime logger(s). Unless configured otherwise, AutoGen's loggers
    are set to WARNING: at INFO they log every message payload (user content, tracebacks) several times."""
    for name in _RUNTIME_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for name in ("autogen_core", "autogen_core.events", "autogen_agentchat"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


def secrets_in_env() -> list[str]:
    return [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 8]


def redact(text: str) -> str:
    for secret in secrets_in_env():
        text = text.replace(secret, "[redacted]")
    return text


def error_line(exc: BaseException) -> str:
    """One line for users and logs: ``Type: message``. AutoGen re-raises agent errors as a RuntimeError whose
    text is ``Type: message`` followed by ``Traceback:`` and the whole traceback; keep the first line."""
    text = str(exc)
    if isinstance(exc, RuntimeError) and "\nTraceback:" in text:
        line = text.split("\nTraceback:", 1)[0].strip().splitlines()[0]
    else:
        first = text.strip().splitlines()[0] if text.strip() else ""
        line = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    line = redact(line)
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


def public_error_line(exc: BaseException) -> str:
    """``error_line`` as a log entry may show it: a store failure says only what happened, never the file, host
    or SQL behind it (those are in the server's log)."""
    from service.errors import ServiceError

    if isinstance(exc, ServiceError) and exc.status >= 500:
        return f"{type(exc).__name__}: {exc.public_message}"
    return error_line(exc)
