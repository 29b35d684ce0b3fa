"""Schema migrations: ``migrations/<dialect>/NNNN_name.sql``, applied in order and recorded in
``schema_migrations(version, name, applied_at)``. Each backend runs them with its own driver, each file in its
own transaction; this module holds the dialect-free part (finding files, deciding what to apply)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from service.errors import IncompatibleDatabase

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(dialect: str, root: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations of one dialect, in version order."""
    found = []
    for path in sorted((root / dialect).glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise ValueError(f"migration file name must look like 0001_name.sql: {path}")
        found.append(Migration(int(match.group(1)), match.group(2), path.read_text(encoding="utf-8")))
    return found


def pending(known: list[Migration], applied: set[int]) -> list[Migration]:
    """What to apply; refuses a database that recorded a migration this version does not know."""
    unknown = applied - {m.version for m in known}
    if unknown:
        raise IncompatibleDatabase(
            f"the database has migration(s) {sorted(unknown)} that this version of the service does not "
            "know: it was written by a newer version. Upgrade the service (or use another database); "
            "nothing was changed."
        )
    return [m for m in known if m.version not in applied]


def split_statements(sql: str) -> list[str]:
    """A migration script as single statements (drivers that run one statement per call need this). Uses
    SQLite's own tokenizer rule: a statement ends where ``sqlite3.complete_statement`` says so, so semicolons
    inside strings, comments and trigger bodies do not split."""
    import sqlite3

    statements: list[str] = []
    current = ""
    for line in sql.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if _has_code(current):
                statements.append(current.strip())
            current = ""
    if _has_code(current):
        raise ValueError(f"migration ends with an incomplete statement: {current.strip()[:80]!r}")
    return statements


def _has_code(text: str) -> bool:
    return any(line.strip() and not line.strip().startswith("--") for line in text.splitlines())
