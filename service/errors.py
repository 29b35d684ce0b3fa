"""The service's errors: one class per wire code, one JSON shape (`error_body`).

The HTTP status lives on the class; the docstring is the default message. Backends translate driver errors into
these (`raise StoreUnavailable(...) from exc`), so web and worker code never import a database driver.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ServiceError(Exception):
    """Internal error."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message()
        super().__init__(self.message)

    @classmethod
    def default_message(cls) -> str:
        return (cls.__doc__ or cls.code).strip()

    @property
    def public_message(self) -> str:
        """What a client may see (README "HTTP": never a path, SQL or driver detail): the message of a client
        error (4xx, written for the client); for a server-side failure (5xx) only the class's own text, while
        ``message`` (which may name files, hosts or SQL) goes to the server's log."""
        return self.message if self.status < 500 else self.default_message()


class BadRequest(ServiceError):
    """Bad request."""

    code = "bad_request"
    status = 400


class Unauthorized(ServiceError):
    """Missing or invalid token."""

    code = "unauthorized"
    status = 401


class NotFound(ServiceError):
    """Not found."""

    code = "not_found"
    status = 404


class Conflict(ServiceError):
    """Conflict."""

    code = "conflict"
    status = 409


class TooLarge(ServiceError):
    """Too large."""

    code = "too_large"
    status = 413


class QueueFull(ServiceError):
    """Too many queued inputs for this session; try again when some are done."""

    code = "queue_full"
    status = 429


class StoreUnavailable(ServiceError):
    """The database is unavailable; nothing was stored."""

    code = "unavailable"
    status = 503


class LeaseLost(ServiceError):
    """This run's lease was taken back (it expired and the input was re-queued); the run may not write."""

    code = "conflict"
    status = 409


class IncompatibleDatabase(ServiceError):
    """The database was written by a newer version of the service."""

    code = "unavailable"
    status = 503


def error_body(code: str, message: str) -> dict[str, Any]:
    """The canonical error JSON: ``{"error": {"code": ..., "message": ...}}``."""
    return {"error": {"code": code, "message": message}}
