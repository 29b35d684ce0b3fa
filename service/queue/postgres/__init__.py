"""The PostgreSQL dialect of the Store contract: ``store`` (the verbs), ``statements`` (SQL and row mapping),
``engine`` (the pool and the group-committing writer), ``errors`` (driver errors -> service errors), ``schema``
(migrations), ``notify`` and ``outbox`` (LISTEN/NOTIFY doorbells between instances)."""

from service.queue.postgres.store import PostgresStore

__all__ = ["PostgresStore"]
