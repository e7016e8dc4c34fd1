"""Errors the registry raises to its callers, each mapping to one PROTOCOL.md error code."""

from __future__ import annotations

from typing import ClassVar, Final

__all__ = [
    "MAX_QUOTED",
    "DuplicateRun",
    "EventRefused",
    "InvalidField",
    "Overloaded",
    "RateLimited",
    "RegistryClosed",
    "RegistryError",
    "ResumeUnavailable",
    "RunNotFound",
    "TooManyConnections",
    "UnknownAgent",
    "quote",
]

#: The most characters of a client's input an error message quotes.
MAX_QUOTED: Final = 128


def quote(value: object) -> str:
    """``repr`` of a client's value for an error message, at most :data:`MAX_QUOTED` long."""
    text = repr(value[:MAX_QUOTED] if isinstance(value, str) else value)
    return text if len(text) <= MAX_QUOTED else text[: MAX_QUOTED - 3] + "..."


class EventRefused(Exception):
    """With ``strict``: an event broke a stream rule (a bug in the code that emitted it).

    Not a :class:`RegistryError`: a remote client cannot cause it.
    """


class DuplicateRun(Exception):
    """``open_execution_context`` for a (user, request_id) whose run already exists.

    Attributes:
        run: The run already registered for that request.
    """

    def __init__(self, run: object) -> None:
        super().__init__("a run already exists for this user and request_id")
        self.run = run


class RegistryError(Exception):
    """Base of the errors a remote client can cause; ``code`` is PROTOCOL.md's error code."""

    code: ClassVar[str] = "internal_error"


class InvalidField(RegistryError):
    """A field is missing, of the wrong type or out of range.

    Attributes:
        field: The field's dotted name as the client wrote it (``after_seq``, ``context.tools``).
    """

    code = "invalid_field"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class UnknownAgent(RegistryError):
    """No agent of that name is registered."""

    code = "unknown_agent"


class RunNotFound(RegistryError):
    """The run does not exist, is no longer retained, or belongs to another user."""

    code = "not_found"


class RateLimited(RegistryError):
    """The user already has ``max_active_runs_per_user`` runs in flight."""

    code = "rate_limited"


class Overloaded(RegistryError):
    """The registry is at ``max_active_runs``."""

    code = "overloaded"


class RegistryClosed(RegistryError):
    """The registry is shutting down or closed and takes no new runs."""

    code = "overloaded"


class TooManyConnections(RegistryError):
    """The user already has ``max_connections_per_user`` open connections."""

    code = "too_many_connections"


class ResumeUnavailable(RegistryError):
    """The run is retained but events after the requested seq were already trimmed."""

    code = "resume_unavailable"
