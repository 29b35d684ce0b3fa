"""Text as providers and browsers really send it: UTF-16 surrogates, joined or replaced (README "Log entries").

A provider may split one emoji across two stream deltas, each half a lone UTF-16 surrogate once decoded
("\\ud83d" then "\\ude00"); a browser's ``JSON.stringify`` writes broken text as a lone surrogate escape. Python
keeps such halves as code points that no UTF-8 encoder (orjson, the database drivers) accepts. Every text that
enters a log entry or a frame goes through ``repair``: a valid pair becomes its character, a lone half U+FFFD.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

_SURROGATE = re.compile("[\ud800-\udfff]")


def repair(text: str) -> str:
    """``text`` with surrogate pairs joined and lone surrogates replaced by U+FFFD (unchanged when clean)."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def repair_json(value: Any) -> Any:
    """``repair`` applied to every string (keys too) of JSON-like data."""
    if isinstance(value, str):
        return repair(value)
    if isinstance(value, dict):
        return {repair_json(k): repair_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [repair_json(v) for v in value]
    return value


def clean_json(value: Any) -> tuple[Any, bytes | None]:
    """``(value, its orjson text)`` when no text in it needs ``repair`` (orjson refuses surrogates, so one C pass
    over it decides, without walking it in Python), else ``(repair_json(value), None)``. Also None for what orjson
    cannot write at all (the store would refuse it the same way)."""
    try:
        return value, orjson.dumps(value)
    except orjson.JSONEncodeError:
        return repair_json(value), None


def split_trailing_high_surrogate(text: str) -> tuple[str, str]:
    """``(ready, held)``: a chunk ending in the first half of a pair keeps that half back, to be put in front of
    the next chunk, so the two halves travel (and are repaired) together."""
    if text and "\ud800" <= text[-1] <= "\udbff":
        return text[:-1], text[-1]
    return text, ""
