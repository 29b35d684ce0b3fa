"""The SQLite dialect of the Store contract."""

from service.queue.sqlite.store import SqliteStore

__all__ = ["SqliteStore"]
