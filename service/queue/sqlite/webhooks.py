"""The webhook outbox in SQLite (README "Webhooks"): the synchronous bodies of the outbox verbs. The rows
themselves are written by the ``entries_webhook`` trigger (migration 0010) in the transaction of their entry.
Times: ``next_at`` and ``lease_expires_at`` are unix seconds, as for inputs."""

from __future__ import annotations

import sqlite3
from datetime import datetime

from service.models import WebhookEvent, new_lease_token, parse_iso

Db = sqlite3.Cursor

DUE = """SELECT id FROM webhook_outbox
WHERE status = 'pending' AND next_at <= ?1 AND (lease_expires_at IS NULL OR lease_expires_at <= ?1)
ORDER BY id LIMIT ?2"""
CLAIM = """UPDATE webhook_outbox SET attempts = attempts + 1, lease_token = ?, lease_expires_at = ?
WHERE id = ?
RETURNING webhook_id, url, session_id, run_id, input_seq, type, seq, created_at, attempts"""


def set_default(db: Db, url: str | None) -> None:
    """The server default URL for sessions without their own (this process's constructor argument)."""
    db.execute(
        "INSERT INTO webhook_default (id, url) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET url = excluded.url",
        (url,),
    )


def release_all(db: Db) -> None:
    """At the start of the file's only process: no other process can be delivering, so every lease is stale."""
    db.execute(
        "UPDATE webhook_outbox SET lease_token = NULL, lease_expires_at = NULL WHERE lease_token IS NOT NULL"
    )


def claim(db: Db, now: datetime, lease_s: float, limit: int) -> list[WebhookEvent]:
    at = now.timestamp()
    ids = [row[0] for row in db.execute(DUE, (at, max(0, limit))).fetchall()]
    events = []
    for row_id in ids:
        token = new_lease_token()
        row = db.execute(CLAIM, (token, at + lease_s, row_id)).fetchone()
        events.append(
            WebhookEvent(
                row[0], row[1], row[2], row[3], row[4], row[5], row[6], parse_iso(row[7]), row[8], token
            )
        )
    return events


def delivered(db: Db, event: WebhookEvent) -> bool:
    cur = db.execute(
        "DELETE FROM webhook_outbox WHERE webhook_id = ? AND lease_token = ? AND status = 'pending'",
        (event.webhook_id, event.lease_token),
    )
    return cur.rowcount == 1


def failed(db: Db, now: datetime, event: WebhookEvent, delay_s: float | None) -> bool:
    status, next_at = ("failed", 0.0) if delay_s is None else ("pending", now.timestamp() + delay_s)
    cur = db.execute(
        """UPDATE webhook_outbox SET status = ?, next_at = ?, lease_token = NULL, lease_expires_at = NULL
        WHERE webhook_id = ? AND lease_token = ? AND status = 'pending'""",
        (status, next_at, event.webhook_id, event.lease_token),
    )
    return cur.rowcount == 1
