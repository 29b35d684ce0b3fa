"""SQLite driver errors and their translation into the service's one error vocabulary (service/errors.py),
the same words the PostgreSQL dialect uses (postgres/errors.py; tests/test_store_contract.py checks both).

Called where the verbs meet the driver: connecting (schema.connect), migrating (schema.prepare),
each read (engine.Reader) and each job or commit of the writer (engine.Writer)."""

from __future__ import annotations

import sqlite3

from service.errors import Conflict, ServiceError, StoreUnavailable


def translate(exc: sqlite3.Error, path: str) -> ServiceError:
    """A driver error as the service's own error, with a message an operator can act on."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if isinstance(exc, sqlite3.IntegrityError):
        return Conflict(f"conflict: {text}")
    if name == "SQLITE_NOTADB" or "not a database" in text:
        return StoreUnavailable(f"{path} is not a SQLite database ({text})")
    if name.startswith("SQLITE_READONLY") or "readonly" in text or "read-only" in text:
        return StoreUnavailable(f"{path} is read-only; the service needs to write to it ({text})")
    if name == "SQLITE_FULL" or "disk is full" in text:
        return StoreUnavailable(f"the disk holding {path} is full ({text})")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return StoreUnavailable(f"{path} is locked by another connection ({text})")
    if name.startswith("SQLITE_CANTOPEN") or "unable to open" in text:
        return StoreUnavailable(f"cannot open {path} ({text})")
    return StoreUnavailable(f"SQLite error on {path}: {text}")
