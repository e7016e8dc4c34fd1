"""WebSocketNotifier: the migration plan's sender of run events.

Two ways to have one, the plan's AFTER and BEFORE:

* from ``create_execution_context``: bound to its run, each method records one event through
  the registry (numbered, retained, delivered to every socket following the run, with the
  run's guarantees) and returns True when it was recorded and delivered;
* ``WebSocketNotifier(websocket_manager)``, as legacy glue code builds it: each method takes
  the run as ``context=`` and writes the event straight to the user's open sockets, with no
  retention and no retries (the path ``delivery_mode = direct`` rolls back to).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, final

from registry._manager import WebSocketManager
from registry._payloads import (
    AgentCompleted,
    AgentStarted,
    AgentThinking,
    PartialResult,
    Payload,
    ToolCompleted,
    ToolExecuting,
)
from registry._run import Run
from registry._stream import StreamError
from registry._vocabulary import EventType, RunStatus, RunStatusName, ToolStatus, ToolStatusName

__all__ = ["WebSocketNotifier"]

Emit = Callable[[EventType, Payload], Awaitable[bool]]


@final
class WebSocketNotifier:
    """Sends the events of a run (see the module docstring for the two ways to make one).

    ``send_tool_completed`` without a ``call_id`` closes the most recent open call of that
    tool.

    Args:
        target: The run (bound, from ``create_execution_context``) or a
            :class:`~registry.WebSocketManager` (legacy).
        emit: For a bound notifier, how its run records an event.
        duplicate: Whether the run already existed for this (user, request_id).
    """

    def __init__(
        self, target: Run | WebSocketManager, emit: Emit | None = None, *,
        duplicate: bool = False,
    ) -> None:
        self.run = target if isinstance(target, Run) else None
        self.manager = target if isinstance(target, WebSocketManager) else None
        if (self.run is None) != (emit is None):
            raise TypeError("a notifier is bound to a run with its emit, or to a manager")
        self._emit = emit
        self.duplicate = duplicate
        self._open_calls: dict[tuple[str, str], list[str]] = {}

    async def _send(self, payload: Payload, context: Run | None) -> bool:
        if self._emit is not None and self.run is not None:
            if context is not None and context is not self.run:
                raise ValueError("this notifier is bound to another run")
            return await self._emit(payload.event_type, payload)
        if context is None:
            raise TypeError("a notifier made from a WebSocketManager needs context=")
        return await self._send_direct(payload, context)

    async def _send_direct(self, payload: Payload, run: Run) -> bool:
        """The legacy path: numbered by the run's stream, written to the user's sockets."""
        assert self.manager is not None
        try:
            events = run.stream.emit(payload.event_type, payload.to_dict(), time.time())
        except (ValueError, StreamError):
            return False
        sent = [await self.manager.send_message(run.user_id, e.to_dict()) for e in events]
        return all(sent)

    def _context(self, context: Run | None) -> Run:
        run = context or self.run
        if run is None:
            raise TypeError("a notifier made from a WebSocketManager needs context=")
        return run

    async def send_agent_started(self, *, context: Run | None = None) -> bool:
        return await self._send(AgentStarted(self._context(context).agent), context)

    async def send_agent_thinking(self, thought: str, *, context: Run | None = None) -> bool:
        return await self._send(AgentThinking(thought), context)

    async def send_tool_executing(
        self, tool: str, args: Mapping[str, Any] | None = None, call_id: str | None = None,
        *, context: Run | None = None,
    ) -> bool:
        run = self._context(context)
        call_id = call_id or "call_" + secrets.token_hex(6)
        sent = await self._send(ToolExecuting(tool, call_id, dict(args or {})), context)
        if sent or call_id in run.stream.open_tools:
            self._open_calls.setdefault((run.run_id, tool), []).append(call_id)
        return sent

    async def send_tool_completed(
        self, tool: str, result: Any = None, *, call_id: str | None = None,
        error: str | None = None, status: ToolStatus | ToolStatusName | None = None,
        context: Run | None = None,
    ) -> bool:
        """Completes a tool call: ``ok`` with ``result``, or ``error`` when ``error`` is given."""
        calls = self._open_calls.get((self._context(context).run_id, tool), [])
        if call_id is None:
            call_id = calls[-1] if calls else "call_unknown"
        if call_id in calls:
            calls.remove(call_id)
        status = status or (ToolStatus.ERROR if error is not None else ToolStatus.OK)
        return await self._send(ToolCompleted(tool, call_id, status, result, error), context)

    async def send_partial_result(self, text: str, *, context: Run | None = None) -> bool:
        return await self._send(PartialResult(text), context)

    async def send_agent_completed(
        self, result: Any = None, *, error: str | None = None,
        status: RunStatus | RunStatusName | None = None, context: Run | None = None,
    ) -> bool:
        """Ends the run: ``succeeded`` with ``result``, or ``failed`` when ``error`` is given."""
        status = status or (RunStatus.FAILED if error is not None else RunStatus.SUCCEEDED)
        return await self._send(AgentCompleted(status, result, error), context)
