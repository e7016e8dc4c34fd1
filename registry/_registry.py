"""The registry's driver: the task group every run lives in, its services and its clock.

The bookkeeping is pure and lives elsewhere: :class:`~registry._table.RunTable` (which runs
exist, dedup, capacity), :class:`~registry.RunStream` (each run's events),
:class:`~registry.RunLifecycle` (each run's state). This module owns what is not pure:
tasks, cancel scopes and time. The migration plan's API is :mod:`registry._compat`.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final, final

import anyio
import anyio.abc
import anyio.lowlevel

from registry import _current
from registry._agents import AgentContext, AgentRegistry, Supervisor, ToolDispatcher, run_agent
from registry._compat import MigrationPlanAPI
from registry._config import Config
from registry._delivery import Delivery
from registry._errors import EventRefused, InvalidField, ResumeUnavailable, RunNotFound
from registry._events import Event
from registry._health import DeliveryWindow, Health, RegistryStatistics
from registry._lifecycle import Trigger
from registry._manager import Connection, WebSocketManager
from registry._outbound import OutboundQueue
from registry._payloads import Payload, outcome, payload_to_dict, validate_payload
from registry._run import Run
from registry._stream import HeldBytes, RunStream, SeqOutOfRange, StreamError
from registry._table import RunTable
from registry._timers import DeadlineQueue
from registry._util import unwrapping_groups
from registry._vocabulary import EventType, EventTypeName

__all__ = ["AgentExecutionRegistry", "open_registry"]

log = logging.getLogger("registry")

Body = Callable[[], Awaitable[Any]]

#: An agent emitting without pause yields to other tasks at least this often.
_EMITS_PER_YIELD: Final = 8
_REASONS: Final = {
    Trigger.CANCEL: "cancelled by the client",
    Trigger.DETACH: "no connection subscribed for detached_run_timeout_s",
    Trigger.SHUTDOWN: "the server is shutting down",
    Trigger.STALE: "stale context swept",
}


@asynccontextmanager
async def open_registry(
    config: Config | None = None,
    *,
    agents: AgentRegistry | None = None,
    tools: ToolDispatcher | None = None,
) -> AsyncIterator[AgentExecutionRegistry]:
    """Opens a registry whose runs and services live in a task group of this block.

    On exit (normal, exception or cancellation) every active run is cancelled with its
    terminal event delivered (bounded by ``shutdown_grace_s``); the block returns once
    every run has ended and been unregistered.

    Args:
        config: Timeouts and limits; ``Config()`` when omitted.
        agents: The agents runs may use; an empty :class:`AgentRegistry` when omitted.
        tools: The tools agents may call; an empty :class:`ToolDispatcher` when omitted.
    """
    config = config or Config()
    async with unwrapping_groups(), anyio.create_task_group() as tg:
        reg = AgentExecutionRegistry(config, tg, Supervisor(agents, tools))
        await reg.start_services()
        _current.OPEN.append(reg)
        try:
            yield reg
        finally:
            _current.OPEN.remove(reg)
            with anyio.move_on_after(config.shutdown_grace_s, shield=True):
                await reg.aclose_runs()
            tg.cancel_scope.cancel()


@final
class AgentExecutionRegistry(MigrationPlanAPI):
    """The single source of truth for agent runs. Open it with :func:`open_registry`.

    Every run executes in its own cancel scope, so a cancel, an agent exception, a timeout,
    a detached run or the registry's exit always ends it with exactly one terminal event
    and unregisters it.
    """

    def __init__(self, config: Config, tg: anyio.abc.TaskGroup, supervisor: Supervisor) -> None:
        self.config = config
        self.manager = WebSocketManager(config.max_connections_per_user)
        self.supervisor = supervisor
        self.agents = supervisor.agent_registry
        self._tg = tg
        self._table = RunTable(
            max_active_runs=config.max_active_runs,
            max_active_runs_per_user=config.max_active_runs_per_user,
            max_retained_runs_per_user=config.max_retained_runs_per_user)
        self._held = HeldBytes()
        self._held_limit = int(config.max_retained_mib * 1024 * 1024)
        self._delivery = Delivery(config, self.manager, self._maybe_detached, self.disconnect)
        self._retention = DeadlineQueue(config.retention_s, self._drop)
        self._detached = DeadlineQueue(config.detached_run_timeout_s, self._detach_due)
        self._idle = anyio.Event()
        self._idle.set()
        self._refused = 0
        self._window = DeliveryWindow(anyio.current_time())

    async def start_services(self) -> None:
        """Starts retention expiry, the detached-run timer and the stale sweep."""
        for service in (self._retention.serve, self._detached.serve, self._sweep_service):
            await self._tg.start(service)

    # ================================================================ runs
    def start_run(
        self, *, user_id: str, request_id: str, agent: str, message: str,
        thread_id: str | None = None, context: Mapping[str, Any] | None = None,
        subscriber: Connection | None = None,
    ) -> tuple[Run, bool]:
        """Starts a run of a registered agent, or finds the one already started for the request.

        Does not block. A new run is subscribed to ``subscriber``; a duplicate (same user
        and request_id, still retained) subscribes nothing new, whatever it names.

        Raises:
            UnknownAgent, InvalidField: the agent or its ``context`` options are refused.
            RateLimited, Overloaded, RegistryClosed: no room for a new run.
            RunNotFound: ``subscriber`` belongs to another user.
        """
        if subscriber is not None and subscriber.user_id != user_id:
            raise RunNotFound("a connection can only follow runs of its own user")
        existing = self._table.find(user_id, request_id)
        if existing is not None:
            return existing, True
        self.agents.get(agent).validate(dict(context or {}))
        run = self._admit(user_id, request_id, agent, message, thread_id, context)
        self._launch(run, self._agent_body(run), [subscriber] if subscriber else [])
        return run, False

    def cancel(self, run_id: str, user_id: str) -> bool:
        """Cancels a run of ``user_id``; False (a no-op) when it has already ended.

        Raises:
            RunNotFound: no such retained run of this user.
        """
        return self._end(self._table.get(run_id, user_id), Trigger.CANCEL)

    def get_run(self, run_id: str, user_id: str) -> Run:
        """The retained run ``run_id`` of ``user_id`` (RunNotFound otherwise)."""
        return self._table.get(run_id, user_id)

    def active_runs(self) -> tuple[Run, ...]:
        return tuple(self._table.active())

    def agent_context(self, run: Run, tools: ToolDispatcher | None = None) -> AgentContext:
        """The handle an agent gets for ``run``: its emit, its tools, its failure texts."""
        async def emit(kind: EventType | EventTypeName, payload: Payload | Mapping[str, Any]
                       ) -> bool:
            return await self.ensure_event_delivery(run, kind, payload)

        def describe(exc: BaseException, what: str) -> dict[str, str]:
            return self.describe_failure(run, exc, what)

        return AgentContext(run, emit, tools or self.supervisor.tool_dispatcher, describe)

    # ========================================================= connections
    def connect(self, connection: Connection) -> None:
        """Registers an open connection (TooManyConnections at the per-user limit)."""
        self.manager.connect(connection)

    def disconnect(self, connection: Connection) -> None:
        """Forgets a connection and unsubscribes it from every run."""
        for run_id in self.manager.disconnect(connection):
            if isinstance(connection, OutboundQueue):
                connection.unsubscribe(run_id)
            run = self._table.lookup(run_id)
            if run is not None:
                self._delivery.release(run)
                self._maybe_detached(run)

    def resume(self, run_id: str, user_id: str, after_seq: int, connection: Connection) -> None:
        """Subscribes ``connection`` to a run: every retained event after ``after_seq``, then live.

        On a connection already subscribed it restarts that connection's copy of the stream.

        Raises:
            RunNotFound: no such retained run of this user.
            InvalidField: ``after_seq`` is beyond the last event (field ``after_seq``).
            ResumeUnavailable: events after ``after_seq`` were trimmed (or, with
                ``delivery_mode`` direct, never kept).
        """
        run = self._table.get(run_id, user_id)
        if self.config.delivery_mode == "direct":
            raise ResumeUnavailable("delivery_mode is direct: runs are not retained for resume")
        try:
            run.stream.check_resume(after_seq)
        except SeqOutOfRange as exc:
            raise InvalidField("after_seq", str(exc)) from None
        self._subscribe(run, connection, after_seq)

    def ack(self, run_id: str, user_id: str, seq: int) -> None:
        """Records a cumulative ack; trims what every connection following the run has taken.

        Raises:
            RunNotFound: no such retained run of this user.
            InvalidField: ``seq`` is beyond the last event (field ``seq``).
        """
        run = self._table.get(run_id, user_id)
        try:
            run.stream.ack(seq)
        except SeqOutOfRange as exc:
            raise InvalidField("seq", str(exc)) from None
        floor = min((_sent_through(c, run_id) for c in self.manager.subscribers(run_id)),
                    default=run.stream.acked_seq)
        run.stream.trim_through(min(floor, run.stream.acked_seq))
        self._delivery.release(run)

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
            payload = payload_to_dict(payload)
            event_type = EventType(event_type)
            if event_type is EventType.AGENT_COMPLETED:
                return await self._complete_with(context, payload)
            if not context.is_active:
                raise StreamError(f"run {context.run_id} has ended")
            events = context.stream.emit(event_type, payload, time.time())
        except (ValueError, StreamError) as exc:
            return self._refuse(context, exc)
        return await self._deliver(context, events)

    async def _pace(self, run: Run) -> None:
        await anyio.lowlevel.checkpoint_if_cancelled()
        run._emits_since_yield += 1
        if run._emits_since_yield >= _EMITS_PER_YIELD:
            run._emits_since_yield = 0
            await anyio.lowlevel.cancel_shielded_checkpoint()

    def _refuse(self, run: Run, exc: Exception) -> bool:
        self._refused += 1
        if self.config.strict:
            raise EventRefused(f"run {run.run_id}: {exc}") from exc
        log.warning("event refused run_id=%s user_id=%s: %s", run.run_id, run.user_id, exc)
        return False

    async def _deliver(self, run: Run, events: list[Event]) -> bool:
        ok = await self._delivery.deliver(run, events)
        if self._held.bytes > self._held_limit:
            self._drop_oldest_until_within_budget()
        return ok

    async def _complete_with(self, run: Run, payload: Mapping[str, Any]) -> bool:
        """Ends ``run`` as an ``agent_completed`` payload says, and waits until it has ended."""
        validate_payload(EventType.AGENT_COMPLETED, payload)
        decided = self._end(run, _TRIGGERS[payload["status"]], dict(payload))
        await run.done.wait()
        return decided

    def describe_failure(self, run: Run, exc: BaseException, what: str) -> dict[str, str]:
        """The ``error`` and ``error_id`` a failed agent or tool shows its client.

        The exception is logged in full with the ``error_id``; the client gets a short
        generic text, or (with ``expose_errors``, for development) the exception's text.
        """
        error_id = secrets.token_hex(8)
        log.warning("%s failed error_id=%s run_id=%s user_id=%s", what, error_id, run.run_id,
                    run.user_id, exc_info=exc)
        text = _describe(exc) if self.config.expose_errors else f"the {what} failed"
        return {"error": text, "error_id": error_id}

    # ============================================================ lifecycle
    def _admit(
        self, user_id: str, request_id: str, agent: str, message: str, thread_id: str | None,
        options: Mapping[str, Any] | None,
    ) -> Run:
        """Creates and registers a run (after its capacity check)."""
        self._table.check_room(user_id)
        run_id, now = secrets.token_hex(16), anyio.current_time()
        thread_id = thread_id if thread_id is not None else "thread_" + secrets.token_hex(8)
        run = Run(
            run_id=run_id, user_id=user_id, request_id=request_id, thread_id=thread_id,
            agent=agent, message=message, options=dict(options or {}), created_at=now,
            stream=RunStream(run_id, thread_id, agent, self.config.max_retained_events_per_run,
                             self._held),
            scope=anyio.CancelScope(deadline=now + self.config.agent_timeout_s))
        run.lifecycle.fire(Trigger.START)
        self._table.add(run)
        if self._idle.is_set():
            self._idle = anyio.Event()
        return run

    def _launch(self, run: Run, body: Body, connections: Iterable[Connection]) -> None:
        for connection in connections:
            self._subscribe(run, connection, 0)
        self._maybe_detached(run)
        self._tg.start_soon(self._drive, run, body, name=f"run {run.run_id}")

    def _agent_body(self, run: Run) -> Body:
        ctx = self.agent_context(run)
        return lambda: run_agent(self.agents.get(run.agent), ctx)

    def _subscribe(self, run: Run, connection: Connection, after_seq: int) -> None:
        """Starts ``connection``'s copy of the run after ``after_seq`` (checked to be held)."""
        if connection.user_id != run.user_id:
            raise RunNotFound(f"no run {run.run_id!r}")
        self.manager.subscribe(connection, run.run_id, run.stream.last_seq + 1)
        run._detach_generation += 1
        if isinstance(connection, OutboundQueue):
            connection.subscribe(run.run_id, run.stream, after_seq)
        else:
            connection.attach(run.run_id, after_seq, list(run.stream.events_after(after_seq)))

    async def _drive(self, run: Run, body: Body) -> None:
        """The run's task: its body in its scope; then, whatever happened, its completion."""
        try:
            await self._execute(run, body)
        finally:
            self._end(run, Trigger.SHUTDOWN)  # a no-op unless cancelled from outside
            with anyio.move_on_after(self.config.shutdown_grace_s, shield=True):
                await self._complete(run)

    async def _execute(self, run: Run, body: Body) -> None:
        assert run._scope is not None
        with run._scope:
            if not run.is_active:
                return
            try:
                result = await body()
            except Exception as exc:
                self._end(run, Trigger.FAIL, _failed(self.describe_failure(run, exc, "agent")))
                return
            self._end(run, Trigger.SUCCEED, {"status": "succeeded", **outcome(True, result)})
        if run._scope.cancelled_caught:
            self._end(run, Trigger.TIMEOUT, {
                "status": "timed_out",
                "error": f"agent exceeded agent_timeout_s ({self.config.agent_timeout_s} s)"})

    def _end(self, run: Run, trigger: Trigger, payload: Mapping[str, Any] | None = None) -> bool:
        """Decides how a run ends (the first decision wins) and cancels its scope."""
        if not run.lifecycle.can(trigger):
            return False
        run.lifecycle.fire(trigger)
        if payload is None:
            payload = {"status": str(run.lifecycle.status), "error": _REASONS[trigger]}
        run.final_payload = payload
        if run._scope is not None:
            run._scope.cancel()
        return True

    async def _complete(self, run: Run) -> None:
        """Emits the run's closing events, then unregisters it; always."""
        assert run.final_payload is not None
        try:
            events = run.stream.finish(run.final_payload, time.time())
            await self._deliver(run, events)
        finally:
            run.lifecycle.fire(Trigger.COMPLETE)
            run.ended_at = anyio.current_time()
            run._scope = run._lock = None  # an ended run keeps only what a resume needs
            for extra in self._table.complete(run):
                self._drop(extra)
            self._retention.push(run, run.ended_at)
            if self._held.bytes > self._held_limit:
                self._drop_oldest_until_within_budget()
            run.done.set()
            if not self._table.active_count:
                self._idle.set()

    def _drop(self, run: Run) -> None:
        """Forgets an ended run: its retention is over, or a retention bound needs the room."""
        if not self._table.drop(run):
            return
        self._held.bytes -= run.stream.held_bytes
        for connection in self.manager.forget_run(run.run_id):
            if isinstance(connection, OutboundQueue):
                connection.unsubscribe(run.run_id)
            else:
                connection.detach(run.run_id)

    def _drop_oldest_until_within_budget(self) -> None:
        """Past ``max_retained_mib``: drops ended runs, oldest first."""
        while self._held.bytes > self._held_limit:
            oldest = self._table.oldest_ended()
            if oldest is None:
                return
            self._drop(oldest)

    # ============================================================= services
    def _maybe_detached(self, run: Run) -> None:
        """Starts the detach timer of a run left with no subscribed connection."""
        if run.is_active and not self.manager.has_subscribers(run.run_id):
            self._detached.push((run, run._detach_generation))

    def _detach_due(self, item: tuple[Run, int]) -> None:
        """Cancels the run unless it was subscribed again since its timer started."""
        run, generation = item
        if run._detach_generation == generation and not self.manager.has_subscribers(run.run_id):
            self._end(run, Trigger.DETACH)

    async def _sweep_service(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            await anyio.sleep(self.config.sweep_interval_s)
            await self.cleanup_stale_contexts()

    async def _end_and_wait(self, runs: list[Run], trigger: Trigger) -> None:
        for run in runs:
            self._end(run, trigger)
        with anyio.move_on_after(self.config.shutdown_grace_s, shield=True):
            for run in runs:
                await run.done.wait()

    async def aclose_runs(self) -> None:
        """Takes no new runs, cancels every active one and waits (bounded) until all ended."""
        self._table.closing = True
        await self._end_and_wait(list(self._table.active()), Trigger.SHUTDOWN)
        with anyio.move_on_after(self.config.shutdown_grace_s, shield=True):
            await self._idle.wait()

    # ======================================================= introspection
    def statistics(self) -> RegistryStatistics:
        """A frozen snapshot of the registry's state and counters."""
        table, counts = self._table, self._delivery.counts
        return RegistryStatistics(
            active_runs=table.active_count, active_runs_per_user=table.active_per_user(),
            retained_runs=table.retained_count, connections=self.manager.connection_count(),
            runs_started=table.runs_started, runs_completed=table.runs_completed,
            runs_by_status=dict(table.completed_by_status),
            events_emitted=counts["events_emitted"], events_delivered=counts["events_delivered"],
            events_retried=counts["events_retried"], events_failed=counts["events_failed"],
            events_refused=self._refused, dedup_hits=table.dedup_hits)

    def health(self) -> Health:
        """``unhealthy`` when closing; ``degraded`` near capacity or when deliveries fail.

        Delivery failures count over the last 60 s, so health recovers; refused events
        (programming errors) are not delivery failures.
        """
        if self._table.closing:
            return Health("unhealthy", ("the registry is shutting down",))
        reasons = []
        active, limit = self._table.active_count, self.config.max_active_runs
        if active >= 0.9 * limit:
            reasons.append(f"{active} runs in flight, at or near max_active_runs ({limit})")
        counts = self._delivery.counts
        failing = self._window.failure(anyio.current_time(), counts["events_delivered"],
                                       counts["events_failed"])
        reasons += [failing] if failing else []
        return Health("degraded", tuple(reasons)) if reasons else Health("ok")


_TRIGGERS: Final = {"succeeded": Trigger.SUCCEED, "failed": Trigger.FAIL,
                    "cancelled": Trigger.CANCEL, "timed_out": Trigger.TIMEOUT}


def _failed(failure: Mapping[str, str]) -> dict[str, Any]:
    return {"status": "failed", **failure}


def _sent_through(connection: Connection, run_id: str) -> int:
    if isinstance(connection, OutboundQueue):
        return connection.sent_through(run_id)
    return connection.delivered_through(run_id)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
