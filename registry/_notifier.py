"""WebSocketNotifier: the migration plan's per-run sender, routed through the registry."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, final

from registry._events import EventType, RunStatus, ToolStatus

if TYPE_CHECKING:
    from registry._context import AgentExecutionContext
    from registry._registry import AgentExecutionRegistry

__all__ = ["WebSocketNotifier"]


@final
class WebSocketNotifier:
    """Sends the events of one run. Every method goes through ``ensure_event_delivery``.

    Each returns True when the event was recorded and every subscribed connection took it,
    False otherwise (never raises into the agent). ``send_tool_completed`` without a
    ``call_id`` closes the most recent open call of that tool.
    """

    def __init__(self, registry: AgentExecutionRegistry, context: AgentExecutionContext) -> None:
        self.registry = registry
        self.context = context
        self._open_calls: dict[str, list[str]] = {}

    async def _send(self, event_type: EventType, payload: Mapping[str, Any]) -> bool:
        return await self.registry.ensure_event_delivery(self.context, event_type, payload)

    async def send_agent_started(self) -> bool:
        return await self._send(EventType.AGENT_STARTED, {"agent": self.context.agent_type})

    async def send_agent_thinking(self, thought: str) -> bool:
        return await self._send(EventType.AGENT_THINKING, {"thought": thought})

    async def send_tool_executing(
        self, tool: str, args: Mapping[str, Any] | None = None, call_id: str | None = None
    ) -> bool:
        call_id = call_id or "call_" + secrets.token_hex(6)
        sent = await self._send(
            EventType.TOOL_EXECUTING, {"tool": tool, "call_id": call_id, "args": dict(args or {})}
        )
        if sent or call_id in self.context.stream.open_tools:
            self._open_calls.setdefault(tool, []).append(call_id)
        return sent

    async def send_tool_completed(
        self,
        tool: str,
        result: Any = None,
        *,
        call_id: str | None = None,
        error: str | None = None,
        status: str | None = None,
    ) -> bool:
        """Completes a tool call: ``ok`` with ``result``, or ``error`` when ``error`` is given."""
        calls = self._open_calls.get(tool, [])
        if call_id is None:
            call_id = calls[-1] if calls else "call_unknown"
        if call_id in calls:
            calls.remove(call_id)
        status = status or (ToolStatus.ERROR if error is not None else ToolStatus.OK)
        payload: dict[str, Any] = {"tool": tool, "call_id": call_id, "status": str(status)}
        payload.update({"result": result} if status == ToolStatus.OK else {"error": error or ""})
        return await self._send(EventType.TOOL_COMPLETED, payload)

    async def send_partial_result(self, text: str) -> bool:
        return await self._send(EventType.PARTIAL_RESULT, {"text": text})

    async def send_agent_completed(
        self, result: Any = None, *, error: str | None = None, status: str | None = None
    ) -> bool:
        """Ends the run: ``succeeded`` with ``result``, or ``failed`` when ``error`` is given."""
        status = status or (RunStatus.FAILED if error is not None else RunStatus.SUCCEEDED)
        payload: dict[str, Any] = {"status": str(status)}
        ok = status == RunStatus.SUCCEEDED
        payload.update({"result": result} if ok else {"error": error or ""})
        return await self._send(EventType.AGENT_COMPLETED, payload)
