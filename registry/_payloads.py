"""The payload of each run event of PROTOCOL.md: the one schema, as frozen attrs types.

Each type checks itself when it is built: a field of the wrong type raises
:class:`PayloadError` naming it. :func:`validate_payload` checks a JSON object by building
its type, so the wire, the stream, the notifier and the tests share this single schema.
Completions carry ``result`` when they succeeded and ``error`` otherwise; that rule is
:func:`outcome` and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final, final

import attrs

from registry._vocabulary import OK_STATUSES, EventType, RunStatus, ToolStatus

__all__ = [
    "AgentCompleted",
    "AgentStarted",
    "AgentThinking",
    "PartialResult",
    "Payload",
    "PayloadError",
    "ToolCompleted",
    "ToolExecuting",
    "outcome",
    "payload_from_dict",
    "payload_to_dict",
    "validate_payload",
]


class PayloadError(ValueError):
    """A payload lacks a field its event type requires, or has one of the wrong type."""


def outcome(ok: bool, result: Any = None, error: str | None = None,
            error_id: str | None = None) -> dict[str, Any]:
    """The outcome fields of a completion: ``result`` on success, else ``error`` (+ id)."""
    if ok:
        return {"result": result}
    fields: dict[str, Any] = {"error": error or ""}
    if error_id is not None:
        fields["error_id"] = error_id
    return fields


def _typed(kind: type, name: str) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, kind):
            raise PayloadError(f"{instance.event_type} payload needs {attribute.name!r} "
                               f"of type {name}")
    return check


_str = _typed(str, "str")
_dict = _typed(dict, "dict")


def _optional_str(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise PayloadError(f"{instance.event_type} payload needs {attribute.name!r} of type str")


def _not_a(kind: type[ToolStatus] | type[RunStatus], value: Any) -> PayloadError:
    allowed = sorted(str(s) for s in kind)
    return PayloadError(f"status {value!r} is not a {kind.__name__}: one of {allowed}")


def _tool_status(value: Any) -> ToolStatus:
    try:
        return ToolStatus(value)
    except ValueError:
        raise _not_a(ToolStatus, value) from None


def _run_status(value: Any) -> RunStatus:
    try:
        return RunStatus(value)
    except ValueError:
        raise _not_a(RunStatus, value) from None


@final
@attrs.frozen
class AgentStarted:
    event_type: ClassVar = EventType.AGENT_STARTED
    agent: str = attrs.field(validator=_str)

    def to_dict(self) -> dict[str, Any]:
        return {"agent": self.agent}


@final
@attrs.frozen
class AgentThinking:
    event_type: ClassVar = EventType.AGENT_THINKING
    thought: str = attrs.field(validator=_str)

    def to_dict(self) -> dict[str, Any]:
        return {"thought": self.thought}


@final
@attrs.frozen
class ToolExecuting:
    event_type: ClassVar = EventType.TOOL_EXECUTING
    tool: str = attrs.field(validator=_str)
    call_id: str = attrs.field(validator=_str)
    args: Mapping[str, Any] = attrs.field(factory=dict, validator=_dict)

    def to_dict(self) -> dict[str, Any]:
        return {"tool": self.tool, "call_id": self.call_id, "args": dict(self.args)}


@final
@attrs.frozen
class ToolCompleted:
    """``result`` goes with status ``ok``; ``error`` (and ``error_id``) with the others."""

    event_type: ClassVar = EventType.TOOL_COMPLETED
    tool: str = attrs.field(validator=_str)
    call_id: str = attrs.field(validator=_str)
    status: ToolStatus = attrs.field(converter=_tool_status)
    result: Any = None
    error: str | None = attrs.field(default=None, validator=_optional_str)
    error_id: str | None = attrs.field(default=None, validator=_optional_str)

    def to_dict(self) -> dict[str, Any]:
        base = {"tool": self.tool, "call_id": self.call_id, "status": str(self.status)}
        return base | outcome(self.status in OK_STATUSES, self.result, self.error, self.error_id)


@final
@attrs.frozen
class PartialResult:
    event_type: ClassVar = EventType.PARTIAL_RESULT
    text: str = attrs.field(validator=_str)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text}


@final
@attrs.frozen
class AgentCompleted:
    """``result`` goes with status ``succeeded``; ``error`` (and ``error_id``) otherwise."""

    event_type: ClassVar = EventType.AGENT_COMPLETED
    status: RunStatus = attrs.field(converter=_run_status)
    result: Any = None
    error: str | None = attrs.field(default=None, validator=_optional_str)
    error_id: str | None = attrs.field(default=None, validator=_optional_str)

    def to_dict(self) -> dict[str, Any]:
        ok = self.status in OK_STATUSES
        return {"status": str(self.status)} | outcome(ok, self.result, self.error, self.error_id)


Payload = (
    AgentStarted | AgentThinking | ToolExecuting | ToolCompleted | PartialResult | AgentCompleted
)

_TYPES: Final[dict[EventType, type[Any]]] = {
    cls.event_type: cls
    for cls in (AgentStarted, AgentThinking, ToolExecuting, ToolCompleted, PartialResult,
                AgentCompleted)
}
#: The fields an object must have, by event type (the outcome field depends on the status).
_REQUIRED: Final = {
    event_type: tuple(f.name for f in attrs.fields(cls)
                      if f.default is attrs.NOTHING and f.name != "args")
    + (("args",) if event_type is EventType.TOOL_EXECUTING else ())
    for event_type, cls in _TYPES.items()
}


def payload_to_dict(payload: Payload | Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object of a payload (a mapping is returned as a plain dict, unchanged).

    Raises:
        PayloadError: ``payload`` is neither a mapping nor one of the payload types.
    """
    if isinstance(payload, Mapping):
        return dict(payload)
    if type(payload) not in _TYPES.values():
        raise PayloadError(f"a payload is a JSON object, got {type(payload).__name__}")
    return payload.to_dict()


def payload_from_dict(event_type: EventType | str, data: Mapping[str, Any]) -> Payload:
    """The typed payload of ``event_type`` from its JSON object (extra fields are ignored).

    Raises:
        PayloadError: the object does not have the shape PROTOCOL.md gives the event type.
        ValueError: ``event_type`` is not an event type.
    """
    event_type = EventType(event_type)
    if not isinstance(data, Mapping):
        raise PayloadError(f"{event_type} payload must be an object")
    for name in _REQUIRED[event_type]:
        if name not in data:
            raise PayloadError(f"{event_type} payload needs {name!r}")
    cls = _TYPES[event_type]
    payload: Payload = cls(**{f.name: data[f.name] for f in attrs.fields(cls) if f.name in data})
    status = getattr(payload, "status", None)
    if status is not None:
        needed = "result" if status in OK_STATUSES else "error"
        if needed not in data:
            raise PayloadError(f"{event_type} with status {str(status)!r} needs {needed!r}")
    return payload


def validate_payload(event_type: EventType | str, payload: Mapping[str, Any]) -> None:
    """Checks that ``payload`` has the shape PROTOCOL.md gives ``event_type``.

    Raises:
        PayloadError: naming the missing or mistyped field.
    """
    payload_from_dict(event_type, payload)
