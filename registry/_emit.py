"""Recording a run's events: the agents' one way in, paced, checked and delivered.

A mixin of :class:`~registry.AgentExecutionRegistry` over the driver's steps declared below.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.lowlevel

from registry._agents import AgentContext, ToolDispatcher
from registry._errors import EventRefused
from registry._health import failure
from registry._lifecycle import Trigger
from registry._payloads import Payload, payload_to_dict, validate_payload
from registry._stream import StreamError
from registry._timers import Pacer
from registry._util import Checkpoint
from registry._vocabulary import EventType, EventTypeName

if TYPE_CHECKING:
    from registry._agents import Supervisor
    from registry._config import Config
    from registry._delivery import Delivery
    from registry._events import Event
    from registry._retention import Retention
    from registry._run import Run

__all__ = ["EmitAPI"]

log = logging.getLogger("registry")

#: An agent emitting without pause yields to other tasks at least this often.
_EMITS_PER_YIELD: Final = 8


class EmitAPI(abc.ABC):
    """``ensure_event_delivery`` and the handle agents emit through."""

    config: Config
    supervisor: Supervisor
    _delivery: Delivery
    _retention: Retention
    _refused: int
    pacer: Pacer
    #: The backend's checkpoints (see ``registry._util.checkpoints``), set by the driver.
    _checkpoint_if_cancelled: Checkpoint
    _schedule_point: Checkpoint

    @abc.abstractmethod
    def _end(self, run: Run, trigger: Trigger, payload: Mapping[str, Any] | None = None, *,
             from_inside: bool = False) -> bool: ...

    @abc.abstractmethod
    async def _complete(self, run: Run) -> None: ...

    @abc.abstractmethod
    def _replicate(self, run: Run, events: list[Event]) -> int: ...

    @abc.abstractmethod
    async def _confirm(self, number: int) -> None: ...

    def agent_context(self, run: Run, tools: ToolDispatcher | None = None) -> AgentContext:
        """The handle an agent gets for ``run``: its emit, its tools, its failure texts."""
        async def emit(kind: EventType | EventTypeName, payload: Payload | Mapping[str, Any]
                       ) -> bool:
            return await self.ensure_event_delivery(run, kind, payload)

        def describe(exc: BaseException, what: str) -> dict[str, str]:
            return self.describe_failure(run, exc, what)

        return AgentContext(run, emit, tools or self.supervisor.tool_dispatcher, describe,
                            self.pacer.sleep)

    def describe_failure(self, run: Run, exc: BaseException, what: str) -> dict[str, str]:
        """The ``error`` and ``error_id`` a failed agent or tool shows (see ``failure``)."""
        return failure(run, exc, what, expose=self.config.expose_errors)

    # ============================================================== events
    async def ensure_event_delivery(
        self, context: Run, event_type: EventType | EventTypeName,
        payload: Mapping[str, Any] | Payload,
    ) -> bool:
        """Records one event of a run and delivers it to every connection following the run.

        A socket takes it at once; another subscriber gets ``delivery_retries`` attempts,
        ``retry_delay_s`` apart, and is unsubscribed (it can resume) if all fail.
        ``agent_completed`` ends the run (see ``complete_execution``). A cancellation point,
        and a schedule point every ``_EMITS_PER_YIELD`` events of a run.

        Returns:
            True when the event was recorded and every subscriber took it; False when some
            subscriber failed every attempt, or (unless ``strict``) the event was refused.

        Raises:
            EventRefused: with ``strict``, the event broke a stream rule (ended run, unknown
                type, bad payload, a second ``agent_started``, an unpaired tool call).
        """
        await self._pace(context)
        try:
            event_type = EventType(event_type)
            checked = getattr(payload, "event_type", None) is event_type  # typed: valid
            payload = payload_to_dict(payload)
            if event_type is EventType.AGENT_COMPLETED:
                return await self._complete_with(context, payload)
            if not context.is_active:
                raise StreamError(f"run {context.run_id} has ended")
            events = context.stream.emit(event_type, payload, time.time(), checked=checked)
        except (ValueError, StreamError) as exc:
            return self._refuse(context, exc)
        return await self._deliver(context, events)

    async def _pace(self, run: Run) -> None:
        await self._checkpoint_if_cancelled()
        run._emits_since_yield += 1
        if run._emits_since_yield >= _EMITS_PER_YIELD:
            run._emits_since_yield = 0
            await self._schedule_point()

    def _refuse(self, run: Run, exc: Exception) -> bool:
        self._refused += 1
        if self.config.strict:
            text = str(exc) if run.run_id in str(exc) else f"run {run.run_id}: {exc}"
            raise EventRefused(text) from exc
        log.warning("event refused run_id=%s user_id=%s: %s", run.run_id, run.user_id, exc)
        return False

    async def _deliver(self, run: Run, events: list[Event], *, confirm: bool = False) -> bool:
        """Replicates (in a service) and delivers new events; ``confirm`` first waits until
        the shared state has them (a run's end: its slot is free before its client hears)."""
        written = self._replicate(run, events)
        if confirm:
            await self._confirm(written)
        ok = await self._delivery.deliver(run, events)
        if self._retention.over_budget():
            self._retention.within_budget(run)
            self._delivery.release(run)
        return ok

    async def _complete_with(self, run: Run, payload: Mapping[str, Any]) -> bool:
        """Ends ``run`` as an ``agent_completed`` payload says, and waits until it has ended.

        From a run's own agent, the end cancels the agent (its scope) and the wait ends
        with it; from a caller's block (``open_execution_context``) the block goes on.
        """
        validate_payload(EventType.AGENT_COMPLETED, payload)
        decided = self._end(run, _TRIGGERS[payload["status"]], dict(payload), from_inside=True)
        if run._in_block:
            with anyio.move_on_after(self.config.shutdown_grace_s, shield=True):
                await self._complete(run)
        await run.done.wait()
        return decided



_TRIGGERS: Final = {"succeeded": Trigger.SUCCEED, "failed": Trigger.FAIL,
                    "cancelled": Trigger.CANCEL, "timed_out": Trigger.TIMEOUT}
