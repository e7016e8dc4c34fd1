"""The words of the protocol: event types and statuses, as enums and as ``Literal`` types.

Either form is accepted wherever an event type or a status is taken, so mypy catches a
misspelt ``"agent_thinkin"`` in code that passes plain strings.
"""

from __future__ import annotations

import enum
from typing import Final, Literal

__all__ = [
    "OK_STATUSES",
    "EventType",
    "EventTypeName",
    "RunStatus",
    "RunStatusName",
    "ToolStatus",
    "ToolStatusName",
]


class EventType(enum.StrEnum):
    """The run events of PROTOCOL.md, in the order a run usually emits them."""

    AGENT_STARTED = "agent_started"
    AGENT_THINKING = "agent_thinking"
    TOOL_EXECUTING = "tool_executing"
    TOOL_COMPLETED = "tool_completed"
    PARTIAL_RESULT = "partial_result"
    AGENT_COMPLETED = "agent_completed"


class RunStatus(enum.StrEnum):
    """How a run ended: the ``status`` of ``agent_completed``."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


class ToolStatus(enum.StrEnum):
    """How a tool call ended: the ``status`` of ``tool_completed``."""

    OK = "ok"
    ERROR = "error"
    CANCELLED = "cancelled"


EventTypeName = Literal[
    "agent_started", "agent_thinking", "tool_executing", "tool_completed", "partial_result",
    "agent_completed",
]
RunStatusName = Literal["succeeded", "failed", "cancelled", "timed_out"]
ToolStatusName = Literal["ok", "error", "cancelled"]

#: The statuses whose completion carries ``result``; every other one carries ``error``.
OK_STATUSES: Final = frozenset({ToolStatus.OK, RunStatus.SUCCEEDED})
