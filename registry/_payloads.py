"""The payload of each run event of PROTOCOL.md as a frozen attrs type, with to/from dict.

On the wire and in :class:`~registry.Event` a payload is a JSON object; these types are the
typed view of it for Python code: ``ensure_event_delivery`` accepts either, and
:meth:`Event.typed_payload` gives the typed view of a received event.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final, final

import attrs

from registry._events import EventType, PayloadError, RunStatus, ToolStatus, validate_payload

__all__ = [
    "AgentCompleted",
    "AgentStarted",
    "AgentThinking",
    "PartialResult",
    "Payload",
    "ToolCompleted",
    "ToolExecuting",
    "payload_from_dict",
    "payload_to_dict",
]


def _outcome(ok: bool, result: Any, error: str | None) -> dict[str, Any]:
    return {"result": result} if ok else {"error": error or ""}


@final
@attrs.frozen
class AgentStarted:
    event_type: ClassVar = EventType.AGENT_STARTED
    agent: str

    def to_dict(self) -> dict[str, Any]:
        return {"agent": self.agent}


@final
@attrs.frozen
class AgentThinking:
    event_type: ClassVar = EventType.AGENT_THINKING
    thought: str

    def to_dict(self) -> dict[str, Any]:
        return {"thought": self.thought}


@final
@attrs.frozen
class ToolExecuting:
    event_type: ClassVar = EventType.TOOL_EXECUTING
    tool: str
    call_id: str
    args: Mapping[str, Any] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"tool": self.tool, "call_id": self.call_id, "args": dict(self.args)}


@final
@attrs.frozen
class ToolCompleted:
    """``result`` goes with status ``ok``; ``error`` with ``error`` and ``cancelled``."""

    event_type: ClassVar = EventType.TOOL_COMPLETED
    tool: str
    call_id: str
    status: ToolStatus = attrs.field(converter=ToolStatus)
    result: Any = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        base = {"tool": self.tool, "call_id": self.call_id, "status": str(self.status)}
        return base | _outcome(self.status is ToolStatus.OK, self.result, self.error)


@final
@attrs.frozen
class PartialResult:
    event_type: ClassVar = EventType.PARTIAL_RESULT
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text}


@final
@attrs.frozen
class AgentCompleted:
    """``result`` goes with status ``succeeded``; ``error`` with every other status."""

    event_type: ClassVar = EventType.AGENT_COMPLETED
    status: RunStatus = attrs.field(converter=RunStatus)
    result: Any = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        ok = self.status is RunStatus.SUCCEEDED
        return {"status": str(self.status)} | _outcome(ok, self.result, self.error)


Payload = (
    AgentStarted | AgentThinking | ToolExecuting | ToolCompleted | PartialResult | AgentCompleted
)

_TYPES: Final[dict[EventType, type[Any]]] = {
    cls.event_type: cls
    for cls in (AgentStarted, AgentThinking, ToolExecuting, ToolCompleted, PartialResult,
                AgentCompleted)
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
    """The typed payload of ``event_type`` from its JSON object.

    Raises:
        PayloadError: the object does not have the shape PROTOCOL.md gives the event type.
    """
    event_type = EventType(event_type)
    validate_payload(event_type, data)
    cls = _TYPES[event_type]
    fields = {f.name for f in attrs.fields(cls)}
    payload: Payload = cls(**{k: v for k, v in data.items() if k in fields})
    return payload
