"""Sessions, log and cursors in SQL: the synchronous bodies of the SQLite store's verbs (queue verbs are in
queue.py).

Each function runs on a cursor of the writer connection inside the writer's transaction, or of the reader
connection inside a read transaction; none of them commits. (A cursor rather than the connection: a
connection's ``execute`` creates a cursor per call, a measurable share of these small statements.) Because the
single writer holds SQLite's write lock for the whole batch, a SELECT followed by an UPDATE is atomic here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson

from service.errors import Conflict
from service.models import (
    LIFECYCLE_TYPES,
    Entry,
    Frames,
    NewEntry,
    Page,
    Session,
    SessionStatus,
    new_session_id,
    parse_iso,
)
from service.queue.sqlite.schema import stamp
from service.queue.state_pieces import MANIFEST, Manifest, StateSave, assemble

Db = sqlite3.Cursor
SESSION_COLS = "session_id, owner, team, title, status, last_seq, created_at, updated_at, multitask_strategy"
ENTRY_COLS = "seq, session_id, type, source, content, created_at, run_id, client_msg_id, metadata"

INSERT_SESSION = f"INSERT INTO sessions ({SESSION_COLS}) VALUES (?, ?, ?, ?, 'idle', 0, ?, ?, ?)"
INSERT_ENTRY = f"INSERT INTO entries ({ENTRY_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
# One statement moves everything a write changes on the session; NULL keeps the old status / team state.
# With :queued_first, the status becomes 'queued' when inputs of the session wait (a run just ended).
# Parameters: ?1 last_seq, ?2 updated_at, ?3 status, ?4 queued_first, ?5 session_id.
TOUCH = """UPDATE sessions SET last_seq = ?1, updated_at = ?2,
status = CASE WHEN ?3 IS NULL THEN status
              WHEN ?4 AND EXISTS (SELECT 1 FROM inputs WHERE session_id = ?5 AND status = 'queued')
              THEN 'queued' ELSE ?3 END
WHERE session_id = ?5"""
SAVE_STATE = """INSERT INTO team_states (session_id, state, updated_at) VALUES (?, ?, ?)
ON CONFLICT (session_id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at"""
INSERT_PIECE = "INSERT INTO state_pieces (session_id, path, idx, body) VALUES (?, ?, ?, ?)"


def to_session(row: sqlite3.Row | tuple[Any, ...]) -> Session:
    sid, owner, team, title, status, last_seq, created, updated, strategy = row
    return Session(
        sid,
        owner,
        team,
        title,
        SessionStatus(status),
        last_seq,
        parse_iso(created),
        parse_iso(updated),
        strategy,
    )


def to_entry(row: sqlite3.Row | tuple[Any, ...]) -> Entry:
    seq, sid, type_, source, content, created, run_id, client_msg_id, metadata = row
    return Entry(
        seq, sid, type_, source, orjson.loads(content), parse_iso(created), run_id, client_msg_id,
        orjson.loads(metadata),
    )  # fmt: skip


# --- sessions ---
def get_session(db: Db, session_id: str) -> Session | None:
    row = db.execute(f"SELECT {SESSION_COLS} FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
    return None if row is None else to_session(row)


def owned(db: Db, owner: str, session_id: str) -> Session | None:
    session = get_session(db, session_id)
    return session if session is not None and session.owner == owner else None


def create_session(
    db: Db,
    now: datetime,
    owner: str,
    session_id: str | None,
    team: str,
    title: str | None,
    multitask_strategy: str = "enqueue",
    webhook_url: str | None = None,
) -> Session:
    sid = session_id or new_session_id()
    if db.execute("SELECT 1 FROM sessions WHERE session_id = ?", (sid,)).fetchone() is not None:
        raise Conflict(f"session {sid!r} already exists")
    db.execute(INSERT_SESSION, (sid, owner, team, title, stamp(now), stamp(now), multitask_strategy))
    if webhook_url is not None:
        db.execute("UPDATE sessions SET webhook_url = ? WHERE session_id = ?", (webhook_url, sid))
    return Session(sid, owner, team, title, SessionStatus.IDLE, 0, now, now, multitask_strategy)


def list_sessions(db: Db, owner: str) -> list[Session]:
    rows = db.execute(f"SELECT {SESSION_COLS} FROM sessions WHERE owner = ? ORDER BY session_id", (owner,))
    sessions = [to_session(row) for row in rows]
    sessions.sort(key=lambda s: s.updated_at, reverse=True)  # stable: ties stay in session_id order
    return sessions


def delete_session(db: Db, owner: str, session_id: str) -> bool:
    # ON DELETE CASCADE (foreign_keys=ON) removes entries, inputs and cursors in the same statement; a run of
    # this session then finds no row under its token and gets LeaseLost.
    cur = db.execute("DELETE FROM sessions WHERE session_id = ? AND owner = ?", (session_id, owner))
    return cur.rowcount > 0


EXPIRABLE = """SELECT session_id, last_seq FROM sessions s
WHERE updated_at < ? AND status IN ('idle', 'failed')
  AND NOT EXISTS (SELECT 1 FROM inputs i WHERE i.session_id = s.session_id AND i.status IN ('queued', 'running'))
ORDER BY updated_at, session_id LIMIT ?"""


def expire_sessions(db: Db, cutoff: datetime, limit: int, max_entries: int) -> list[str]:
    """Delete up to ``limit`` idle sessions last written before ``cutoff``, stopping once about ``max_entries``
    log entries are taken (at least one session), so one call never holds the writer long."""
    ids: list[str] = []
    entries = 0
    for sid, last_seq in db.execute(EXPIRABLE, (stamp(cutoff), max(0, limit))).fetchall():
        if ids and entries + int(last_seq) > max_entries:
            break
        ids.append(sid)
        entries += int(last_seq)
    db.executemany("DELETE FROM sessions WHERE session_id = ?", [(sid,) for sid in ids])
    return ids


def set_status(db: Db, session_id: str, status: SessionStatus, now: datetime) -> None:
    db.execute(
        "UPDATE sessions SET status = ?, updated_at = ? WHERE session_id = ?",
        (status.value, stamp(now), session_id),
    )


# --- log and cursors ---
def append_entries(
    db: Db,
    now: datetime,
    session_id: str,
    news: Sequence[NewEntry],
    run_id: str | None,
    client_msg_id: str | None = None,
    *,
    last: int | None = None,
    status: SessionStatus | None = None,
    queued_first: bool = False,
    team_state: StateSave | None = None,
) -> list[Entry]:
    """Number the entries after the session's last seq (contiguous: the writer lock serialises appends) and
    update the session in the same statement. ``last`` saves a read when the caller already has last_seq."""
    if last is None:
        (last,) = db.execute("SELECT last_seq FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
    assert last is not None
    created = stamp(now)
    entries = []
    for seq, new in enumerate(news, start=last + 1):
        entry = Entry(
            seq, session_id, new.type, new.source, new.content, now, run_id, client_msg_id, dict(new.metadata)
        )
        db.execute(
            INSERT_ENTRY,
            (seq, session_id, entry.type, entry.source, orjson.dumps(entry.content).decode(), created, run_id,
             client_msg_id, orjson.dumps(entry.metadata).decode()),
        )  # fmt: skip
        entries.append(entry)
    db.execute(TOUCH, (last + len(entries), created, status and status.value, queued_first, session_id))
    if team_state is not None:
        save_team_state(db, session_id, team_state, created)
    return entries


def save_team_state(db: Db, session_id: str, save: StateSave, created: str) -> None:
    """Write a planned save (``state_pieces.plan_save``): the head, and only the pieces that changed."""
    if save.clear:
        db.execute("DELETE FROM state_pieces WHERE session_id = ?", (session_id,))
    for write in save.writes:
        if not save.clear:
            sql = "DELETE FROM state_pieces WHERE session_id = ? AND path = ? AND idx >= ?"
            db.execute(sql, (session_id, write.path, write.keep))
        db.executemany(
            INSERT_PIECE,
            [(session_id, write.path, write.keep + i, body) for i, body in enumerate(write.items)],
        )
    db.execute(SAVE_STATE, (session_id, save.head, created))


def read_log(db: Db, session_id: str, after: int | None, before: int | None, limit: int) -> Page:
    row = db.execute("SELECT last_seq FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
    last_seq = 0 if row is None else int(row[0])
    low, limit = max(0, after or 0), max(0, limit)  # a negative LIMIT means "no limit" to SQLite
    if before is None:
        sql = f"SELECT {ENTRY_COLS} FROM entries WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?"
        rows = db.execute(sql, (session_id, low, limit + 1)).fetchall()
        return Page(session_id, [to_entry(r) for r in rows[:limit]], last_seq, len(rows) > limit)
    sql = f"""SELECT {ENTRY_COLS} FROM entries WHERE session_id = ? AND seq > ? AND seq < ?
    ORDER BY seq DESC LIMIT ?"""
    rows = db.execute(sql, (session_id, low, before, limit + 1)).fetchall()
    page = [to_entry(r) for r in reversed(rows[:limit])]
    return Page(session_id, page, last_seq, len(rows) > limit)


_FRAME = (
    b'{"seq":%d,"session_id":%b,"type":%b,"source":%b,"content":%b,"created_at":"%bZ","run_id":%b,'
    b'"client_msg_id":%b,"metadata":%b}'
)


def read_frames(db: Db, session_id: str, after: int, limit: int) -> Frames:
    """``read_log(after=...)`` pre-serialised without parsing: content and metadata are stored as orjson's JSON
    text, so they are spliced in as they are; created_at's stored stamp (``...T10:00:00.123456+00:00``) cut
    to the API's milliseconds. Lifecycle entries (details also at the top level) take the generic way."""
    row = db.execute("SELECT last_seq FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
    last_seq = 0 if row is None else int(row[0])
    low, limit = max(0, after), max(0, limit)
    sql = f"""SELECT {ENTRY_COLS}, json_extract(metadata, '$.id') FROM entries
    WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?"""
    rows = db.execute(sql, (session_id, low, limit + 1)).fetchall()
    has_more = len(rows) > limit
    sid = orjson.dumps(session_id)
    dumps = orjson.dumps
    frames: list[bytes] = []
    seqs: list[int] = []
    ids: list[str | None] = []
    for r in rows[:limit]:
        seq, _, type_, source, content, created, run_id, client_msg_id, metadata, message_id = r
        if type_ in LIFECYCLE_TYPES:
            frames.append(dumps(to_entry(r[:9]).to_json()))
        else:
            frames.append(
                _FRAME
                % (
                    seq, sid, dumps(type_), dumps(source), content.encode(), created[:23].encode(),
                    dumps(run_id), dumps(client_msg_id), metadata.encode(),
                )
            )  # fmt: skip
        seqs.append(seq)
        ids.append(message_id if isinstance(message_id, str) else None)
    return Frames(session_id, frames, seqs, ids, last_seq, has_more)


def get_cursor(db: Db, session_id: str, client_id: str) -> int | None:
    sql = "SELECT seq FROM cursors WHERE session_id = ? AND client_id = ?"
    row = db.execute(sql, (session_id, client_id)).fetchone()
    return None if row is None else int(row[0])


def set_cursor(db: Db, session_id: str, client_id: str, seq: int) -> int:
    row = db.execute("SELECT last_seq FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
    if row is None:
        return 0  # an unknown session has an empty log: the cursor clamps to 0 and there is nothing to keep
    wanted = min(max(seq, 0), int(row[0]))
    db.execute(
        """INSERT INTO cursors (session_id, client_id, seq) VALUES (?, ?, ?)
        ON CONFLICT (session_id, client_id) DO UPDATE SET seq = max(seq, excluded.seq)""",
        (session_id, client_id, wanted),
    )
    stored = get_cursor(db, session_id, client_id)
    assert stored is not None
    return stored


def load_team_state(db: Db, session_id: str) -> tuple[dict[str, Any] | None, Manifest | None]:
    """The saved state reassembled from its head and pieces, and the manifest of what is stored."""
    row = db.execute("SELECT state FROM team_states WHERE session_id = ?", (session_id,)).fetchone()
    if row is None:
        return None, None
    head = orjson.loads(row[0])
    if not isinstance(head, dict) or MANIFEST not in head:
        return head, None  # saved whole, before migration 0006
    bodies: dict[str, list[str]] = {}
    sql = "SELECT path, body FROM state_pieces WHERE session_id = ? ORDER BY path, idx"
    for path, body in db.execute(sql, (session_id,)):
        bodies.setdefault(path, []).append(body)
    # One parse per list: the stored item texts joined into one JSON array.
    pieces = {path: orjson.loads("[" + ",".join(items) + "]") for path, items in bodies.items()}
    return assemble(head, pieces)
