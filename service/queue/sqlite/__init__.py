"""The SQLite dialect of the Store contract, laid out as the PostgreSQL one (service/queue/postgres/): ``store``
(the verbs), ``statements`` (SQL and row mapping), ``functions`` (each verb's body, run in the writer's
transaction or on the reader: the twin of PostgreSQL's ``svc_`` functions), ``engine`` (the group-committing
writer thread, the reader thread and the file lock), ``errors`` (driver errors -> service errors), ``schema``
(pragmas and migrations). No ``notify``/``outbox``: those are PostgreSQL's NOTIFY doorbells between instances,
and a SQLite file has one process. The webhook outbox is statements and functions like any other verb, as on
PostgreSQL."""

from service.queue.sqlite.store import SqliteStore

__all__ = ["SqliteStore"]
