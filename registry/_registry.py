"""The agent execution registry: the nursery that owns every run, and its bookkeeping."""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, final

import anyio
import anyio.abc
import anyio.lowlevel
import attrs

from registry._config import Config
from registry._context import AgentExecutionContext
from registry._delivery import Delivery
from registry._errors import (
    InvalidField,
    Overloaded,
    RateLimited,
    RegistryClosed,
    ResumeUnavailable,
    RunNotFound,
    quote,
)
from registry._events import Event, EventType, RunStatus, validate_payload
from registry._lifecycle import Trigger
from registry._manager import Connection, WebSocketManager
from registry._outbound import OutboundQueue
from registry._payloads import Payload, payload_to_dict
from registry._stream import HeldBytes, RunStream, SeqOutOfRange, StreamError
from registry._timers import DeadlineQueue
from registry._util import unwrapping_groups

if TYPE_CHECKING:
    from registry._agents import AgentRegistry, Supervisor, ToolDispatcher
    from registry._notifier import WebSocketNotifier

__all__ = [
    "AgentExecutionRegistry",
    "Health",
    "RegistryStatistics",
    "get_agent_execution_registry",
    "open_registry",
]

log = logging.getLogger("registry")

Body = Callable[[], Awaitable[Any]]

#: An agent emitting without pause yields to other tasks at least this often.
_EMITS_PER_YIELD: Final = 8
#: Health judges delivery failures over this many recent seconds.
HEALTH_WINDOW_S: Final = 60.0
#: More than this share of deliveries failed in the window: degraded.
_FAILURE_RATIO: Final = 0.001

_STATUS_TRIGGER: Final = {
    RunStatus.SUCCEEDED: Trigger.SUCCEED,
    RunStatus.FAILED: Trigger.FAIL,
    RunStatus.CANCELLED: Trigger.CANCEL,
    RunStatus.TIMED_OUT: Trigger.TIMEOUT,
}
_REASONS: Final = {
    Trigger.CANCEL: "cancelled by the client",
    Trigger.DETACH: "no connection subscribed for detached_run_timeout_s",
    Trigger.SHUTDOWN: "the server is shutting down",
    Trigger.STALE: "stale context swept",
}


@final
@attrs.frozen
class RegistryStatistics:
    """A snapshot of the registry's counters (see :meth:`AgentExecutionRegistry.statistics`)."""

    active_runs: int
    active_runs_per_user: Mapping[str, int]
    retained_runs: int
    connections: int
    runs_started: int
    runs_completed: int
    runs_by_status: Mapping[str, int]
    events_emitted: int
    events_delivered: int
    events_retried: int
    events_failed: int
    events_refused: int
    dedup_hits: int


@final
@attrs.frozen
class Health:
    """``status`` is ``ok``, ``degraded`` or ``unhealthy``; ``reasons`` says why when not ok."""

    status: str
    reasons: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"


_open_registries: list[AgentExecutionRegistry] = []


def get_agent_execution_registry() -> AgentExecutionRegistry:
    """The registry opened most recently by :func:`open_registry` and still open.

    This is the one documented accessor for code that cannot be handed the registry
    explicitly (the migration plan's call sites). Prefer passing the registry down.

    Raises:
        RuntimeError: no registry is open.
    """
    if not _open_registries:
        raise RuntimeError("no AgentExecutionRegistry is open; use `async with open_registry()`")
    return _open_registries[-1]


@asynccontextmanager
async def open_registry(
    config: Config | None = None,
    *,
    agents: AgentRegistry | None = None,
    tools: ToolDispatcher | None = None,
) -> AsyncIterator[AgentExecutionRegistry]:
    """Opens a registry whose runs and services live in a task group of this block.

    On exit (normal, exception or cancellation) every active run is cancelled with its
    terminal event delivered, and the block returns only when every run has ended and been
    unregistered.

    Args:
        config: Timeouts and limits; ``Config()`` when omitted.
        agents: The agents runs may use; an empty :class:`AgentRegistry` when omitted.
        tools: The tools agents may call; an empty :class:`ToolDispatcher` when omitted.
    """
    from registry._agents import AgentRegistry, Supervisor, ToolDispatcher

    supervisor = Supervisor(agents or AgentRegistry(), tools or ToolDispatcher())
    async with unwrapping_groups(), anyio.create_task_group() as tg:
        reg = AgentExecutionRegistry(config or Config(), tg, supervisor)
        await tg.start(reg._retention.serve)
        await tg.start(reg._detached.serve)
        await tg.start(reg._sweep_service)
        _open_registries.append(reg)
        try:
            yield reg
        finally:
            _open_registries.remove(reg)
            with anyio.CancelScope(shield=True):
                await reg.aclose_runs()
            tg.cancel_scope.cancel()


@final
class AgentExecutionRegistry:
    """The single source of truth for agent runs. Open it with :func:`open_registry`.

    Every run executes in its own cancel scope inside the registry's task group, so a cancel,
    an agent exception, a timeout, a detached run or the registry's own exit always ends the
    run with exactly one terminal event and unregisters it.
    """

    def __init__(
        self, config: Config, task_group: anyio.abc.TaskGroup, supervisor: Supervisor
    ) -> None:
        self.config = config
        self.manager = WebSocketManager(config.max_connections_per_user)
        self.supervisor = supervisor
        supervisor.registry = self
        self._tg = task_group
        self._closing = False
        self._direct = config.delivery_mode == "direct"
        self._runs: dict[str, AgentExecutionContext] = {}
        self._by_request: dict[tuple[str, str], AgentExecutionContext] = {}
        self._active: dict[str, AgentExecutionContext] = {}
        self._active_per_user: Counter[str] = Counter()
        self._retention = DeadlineQueue(config.retention_s, self._forget)
        #: Ended runs still retained, oldest first, in all and per user.
        self._ended: dict[str, AgentExecutionContext] = {}
        self._ended_by_user: dict[str, dict[str, None]] = {}
        self._held = HeldBytes()
        self._held_limit = int(config.max_retained_mib * 1024 * 1024)
        self._detached = DeadlineQueue(config.detached_run_timeout_s, self._detach_due)
        self._idle = anyio.Event()
        self._idle.set()
        self._counts: Counter[str] = Counter()
        self._health_marks: deque[tuple[float, int, int]] = deque([(anyio.current_time(), 0, 0)])
        self._delivery = Delivery(config, self.manager, self._counts, self._maybe_detached)
        self._by_status: Counter[str] = Counter()

    @property
    def agents(self) -> AgentRegistry:
        return self.supervisor.agent_registry

    # ============================================================== runs
    def start_run(
        self,
        *,
        user_id: str,
        request_id: str,
        agent: str,
        message: str,
        thread_id: str | None = None,
        context: Mapping[str, Any] | None = None,
        subscriber: Connection | None = None,
    ) -> tuple[AgentExecutionContext, bool]:
        """Starts a run of a registered agent, or finds the one already started for the request.

        Does not block. A new run is subscribed to ``subscriber``; a duplicate subscribes
        nothing new.

        Returns:
            The run and whether it is a duplicate (same user and request_id, still retained).

        Raises:
            UnknownAgent, InvalidField: the agent or its ``context`` is not acceptable.
            RateLimited, Overloaded, RegistryClosed: no capacity for a new run.
        """
        context = dict(context or {})
        if subscriber is not None and subscriber.user_id != user_id:
            raise RunNotFound("a connection can only follow runs of its own user")
        existing = self._find_duplicate(user_id, request_id)
        if existing is not None:  # answered as such whatever agent and context it names
            return existing, True
        spec = self.agents.get(agent)
        spec.validate(context)
        run = self._create(user_id, request_id, agent, message, thread_id, context, external=False)
        self._launch(run, self.supervisor.body_for(run, spec), [subscriber] if subscriber else [])
        return run, False

    def cancel(self, run_id: str, user_id: str) -> bool:
        """Cancels a run of ``user_id``; returns False (a no-op) when it had already ended.

        Raises:
            RunNotFound: no such retained run of this user.
        """
        run = self.get_run(run_id, user_id)
        return self._end(run, Trigger.CANCEL)

    def get_run(self, run_id: str, user_id: str) -> AgentExecutionContext:
        """The retained run ``run_id`` of ``user_id``.

        Raises:
            RunNotFound: it does not exist, is no longer retained, or belongs to someone else.
        """
        run = self._runs.get(run_id)
        if run is None or run.user_id != user_id:
            raise RunNotFound(f"no run {quote(run_id)}")
        return run

    def active_runs(self) -> tuple[AgentExecutionContext, ...]:
        return tuple(self._active.values())

    # ======================================================= connections
    def connect(self, connection: Connection) -> None:
        """Registers an open connection (raises TooManyConnections at the per-user limit)."""
        self.manager.connect(connection)

    def disconnect(self, connection: Connection) -> None:
        """Forgets a closed connection and unsubscribes it from every run."""
        for run_id in self.manager.disconnect(connection):
            if isinstance(connection, OutboundQueue):
                connection.unsubscribe(run_id)
            run = self._runs.get(run_id)
            if run is not None:
                self._release(run)
                self._maybe_detached(run)

    def resume(self, run_id: str, user_id: str, after_seq: int, connection: Connection) -> None:
        """Subscribes ``connection`` to a run and replays every retained event after ``after_seq``.

        On a connection already subscribed it restarts that connection's copy of the stream.

        Raises:
            RunNotFound: no such retained run of this user.
            InvalidField: ``after_seq`` is beyond the last event (field ``after_seq``).
            ResumeUnavailable: events after ``after_seq`` were already trimmed.
        """
        run = self.get_run(run_id, user_id)
        if self.config.delivery_mode == "direct":
            raise ResumeUnavailable("delivery_mode is direct: runs are not retained for resume")
        try:
            run.stream.check_resume(after_seq)
        except SeqOutOfRange as exc:
            raise InvalidField("after_seq", str(exc)) from None
        self._subscribe(run, connection, after_seq)

    def ack(self, run_id: str, user_id: str, seq: int) -> None:
        """Records a cumulative ack and trims what every subscribed connection has sent.

        Raises:
            RunNotFound: no such retained run of this user.
            InvalidField: ``seq`` is beyond the last event (field ``seq``).
        """
        run = self.get_run(run_id, user_id)
        try:
            run.stream.ack(seq)
        except SeqOutOfRange as exc:
            raise InvalidField("seq", str(exc)) from None
        floor = run.stream.acked_seq
        for connection in self.manager.subscribers(run_id):
            floor = min(floor, _sent_through(connection, run_id))
        run.stream.trim_through(floor)
        self._release(run)

    # ============================================================ events
    async def ensure_event_delivery(
        self, context: AgentExecutionContext, event_type: str,
        payload: Mapping[str, Any] | Payload,
    ) -> bool:
        """Records one event of a run and delivers it to every subscribed connection.

        Each connection gets ``delivery_retries`` attempts, ``retry_delay_s`` apart, each
        bounded by ``event_delivery_timeout_s``; one that fails them all is unsubscribed
        from the run (the event stays retained, so it can resume). ``agent_completed``
        ends the run (see :meth:`complete_execution`). Never raises into the agent.

        It is a cancellation point, and a schedule point at least every
        ``_EMITS_PER_YIELD`` events of a run, so an agent that emits in a tight loop still
        lets sockets drain (an agent that sleeps between events yields anyway).

        Returns:
            True when the event was recorded and every subscriber took it; False when it
            broke a stream rule (logged) or some subscriber failed every attempt.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        context.emits_since_yield += 1
        if context.emits_since_yield >= _EMITS_PER_YIELD:
            context.emits_since_yield = 0
            await anyio.lowlevel.cancel_shielded_checkpoint()
        try:
            payload = payload_to_dict(payload)
            event_type = EventType(event_type)
            if event_type is EventType.AGENT_COMPLETED:
                return await self._complete(context, payload)
            if not context.is_active:
                raise StreamError(f"run {context.run_id} has ended")
            events = context.stream.emit(event_type, payload, time.time())
        except (ValueError, StreamError) as exc:
            self._counts["events_refused"] += 1
            log.warning("event refused run_id=%s user_id=%s: %s", context.run_id,
                        context.user_id, exc)
            return False
        return await self._fan_out(context, events)

    async def _fan_out(self, run: AgentExecutionContext, events: list[Event]) -> bool:
        """Hands newly recorded events to the run's sockets, then to its other subscribers.

        A socket only counts them (it reads them from the log as it drains): no await, no
        lock. A socket past half its bounds gets a bounded pause to drain (its transport's).
        """
        self._counts["events_emitted"] += len(events)
        run_id, last_seq = run.run_id, run.stream.last_seq
        queues = self.manager.queues(run_id)
        for queue in queues:
            if queue.on_append(run_id, last_seq):
                self._counts["events_delivered"] += len(events)
            else:
                self.disconnect(queue)
        if self._direct:  # the rollback path: nothing is kept for a resume
            run.stream.trim_through(last_seq)
        if self._held.bytes > self._held_limit:
            self._enforce_byte_budget()
        if run.stream.held_from() <= run.stream.trimmed_through:
            self._release(run)
        ok = True
        if self.manager.has_handed(run_id):
            ok = await self._delivery.deliver(run, events)
        for queue in queues:
            if queue.pause is not None and queue.above_high_water():
                await queue.pause()
        return ok

    def _release(self, run: AgentExecutionContext) -> None:
        """Frees the frames of trimmed events that no socket is still reading."""
        floor = run.stream.trimmed_through
        for queue in self.manager.queues(run.run_id):
            floor = min(floor, queue.sent_through(run.run_id))
        run.stream.release_through(floor)

    async def complete_execution(self, context: AgentExecutionContext, result: Any) -> None:
        """Ends a run: ``succeeded`` with ``result``, or ``failed`` when it is an exception.

        Blocks until the terminal event is delivered and the context unregistered. A no-op
        on a run that has already ended.
        """
        if isinstance(result, BaseException):
            payload = {"status": "failed", **self.describe_failure(context, result, "agent")}
        else:
            payload = {"status": "succeeded", "result": result}
        await self._complete(context, payload)

    async def _complete(self, run: AgentExecutionContext, payload: Mapping[str, Any]) -> bool:
        """Decides the run's end from an ``agent_completed`` payload and waits for it.

        Called from inside the run's own agent, the scope's cancellation ends the wait.
        """
        validate_payload(EventType.AGENT_COMPLETED, payload)
        decided = self._end(run, _STATUS_TRIGGER[RunStatus(payload["status"])], dict(payload))
        await run.done.wait()
        return decided

    def describe_failure(
        self, run: AgentExecutionContext, exc: BaseException, what: str
    ) -> dict[str, str]:
        """The ``error`` and ``error_id`` a failed agent or tool reports to the client.

        The full exception is logged with the ``error_id``; the client gets a short generic
        text unless ``expose_errors`` is set (development), then the exception's own text.
        """
        error_id = secrets.token_hex(8)
        log.warning("%s failed error_id=%s run_id=%s user_id=%s", what, error_id, run.run_id,
                    run.user_id, exc_info=exc)
        text = _describe(exc) if self.config.expose_errors else f"the {what} failed"
        return {"error": text, "error_id": error_id}

    # ========================================================= lifecycle
    def _find_duplicate(self, user_id: str, request_id: str) -> AgentExecutionContext | None:
        existing = self._by_request.get((user_id, request_id))
        if existing is not None:
            self._counts["dedup_hits"] += 1
        return existing

    def _create(
        self,
        user_id: str,
        request_id: str,
        agent: str,
        message: str,
        thread_id: str | None,
        context: Mapping[str, Any],
        *,
        external: bool,
    ) -> AgentExecutionContext:
        self._check_capacity(user_id)
        run_id = secrets.token_hex(16)
        thread_id = "thread_" + secrets.token_hex(8) if thread_id is None else thread_id
        now = anyio.current_time()
        run = AgentExecutionContext(
            run_id, user_id, request_id, thread_id, agent, message, context, now,
            RunStream(run_id, thread_id, agent, self.config.max_retained_events_per_run,
                      self._held),
            anyio.CancelScope(deadline=now + self.config.agent_timeout_s), external=external,
        )
        run.lifecycle.fire(Trigger.START)
        self._runs[run_id] = self._active[run_id] = run
        self._by_request[user_id, request_id] = run
        self._active_per_user[user_id] += 1
        self._counts["runs_started"] += 1
        self._idle = anyio.Event() if self._idle.is_set() else self._idle
        return run

    def _check_capacity(self, user_id: str) -> None:
        if self._closing:
            raise RegistryClosed("the registry is shutting down")
        limit = self.config.max_active_runs_per_user
        if self._active_per_user[user_id] >= limit:
            raise RateLimited(f"user already has {limit} runs in flight")
        if len(self._active) >= self.config.max_active_runs:
            raise Overloaded(f"server is at max_active_runs ({self.config.max_active_runs})")

    def _launch(
        self, run: AgentExecutionContext, body: Body, connections: Iterable[Connection]
    ) -> None:
        for connection in connections:
            self._subscribe(run, connection, 0)
        self._maybe_detached(run)
        self._tg.start_soon(self._drive, run, body, name=f"run {run.run_id}")

    def _subscribe(
        self, run: AgentExecutionContext, connection: Connection, after_seq: int
    ) -> None:
        """Starts ``connection``'s copy of the run after ``after_seq`` (checked held)."""
        if connection.user_id != run.user_id:
            raise RunNotFound(f"no run {run.run_id!r}")
        self.manager.subscribe(connection, run.run_id, run.stream.last_seq + 1)
        run.detach_generation += 1
        if isinstance(connection, OutboundQueue):
            connection.subscribe(run.run_id, run.stream, after_seq)
        else:
            connection.attach(run.run_id, after_seq, list(run.stream.events_after(after_seq)))

    async def _drive(self, run: AgentExecutionContext, body: Body) -> None:
        try:
            await self._execute(run, body)
        finally:
            self._end(run, Trigger.SHUTDOWN)  # a no-op unless cancelled from outside
            with anyio.CancelScope(shield=True):
                await self._finish(run)

    async def _execute(self, run: AgentExecutionContext, body: Body) -> None:
        outcome: tuple[Trigger, dict[str, Any]] | None = None
        with run.scope:
            if run.is_active:
                try:
                    result = await body()
                except Exception as exc:
                    outcome = Trigger.FAIL, {"status": "failed",
                                             **self.describe_failure(run, exc, "agent")}
                else:
                    outcome = Trigger.SUCCEED, {"status": "succeeded", "result": result}
        if outcome is not None:
            self._end(run, *outcome)
        elif run.scope.cancelled_caught:
            error = f"agent exceeded agent_timeout_s ({self.config.agent_timeout_s} s)"
            self._end(run, Trigger.TIMEOUT, {"status": "timed_out", "error": error})

    def _end(
        self, run: AgentExecutionContext, trigger: Trigger, payload: Mapping[str, Any] | None = None
    ) -> bool:
        """Decides how a run ends (first decision wins) and cancels its scope."""
        if not run.lifecycle.can(trigger):  # first ending wins; the table refuses the rest
            return False
        run.lifecycle.fire(trigger)
        if payload is None:
            payload = {"status": str(run.lifecycle.status), "error": _REASONS[trigger]}
        run.final_payload = payload
        run.scope.cancel()
        return True

    async def _finish(self, run: AgentExecutionContext) -> None:
        """Emits the closing events (validated when decided), then unregisters, always."""
        assert run.final_payload is not None
        try:
            await self._fan_out(run, run.stream.finish(run.final_payload, time.time()))
        finally:
            run.lifecycle.fire(Trigger.COMPLETE)
            self._unregister(run)
            run.done.set()

    def _unregister(self, run: AgentExecutionContext) -> None:
        del self._active[run.run_id]
        self._active_per_user[run.user_id] -= 1
        if not self._active_per_user[run.user_id]:
            del self._active_per_user[run.user_id]
        self._counts["runs_completed"] += 1
        self._by_status[str(run.status)] += 1
        run.ended_at = anyio.current_time()
        self._retention.push(run, run.ended_at)
        self._ended[run.run_id] = run
        mine = self._ended_by_user.setdefault(run.user_id, {})
        mine[run.run_id] = None
        if len(mine) > self.config.max_retained_runs_per_user:
            self._forget(self._ended[next(iter(mine))])
        self._enforce_byte_budget()
        if not self._active:
            self._idle.set()

    def _enforce_byte_budget(self) -> None:
        """Past ``max_retained_mib`` in all, forgets ended runs, oldest first."""
        while self._held.bytes > self._held_limit and self._ended:
            self._forget(next(iter(self._ended.values())))

    # ========================================================== services
    def _forget(self, run: AgentExecutionContext) -> None:
        """Drops an ended run: retention expired, or a retention bound needed the room.

        Idempotent: a run dropped by a bound is forgotten again when its timer comes.
        """
        if self._ended.pop(run.run_id, None) is None:
            return
        mine = self._ended_by_user[run.user_id]
        del mine[run.run_id]
        if not mine:
            del self._ended_by_user[run.user_id]
        del self._runs[run.run_id]
        self._held.bytes -= run.stream.held_bytes
        if self._by_request.get((run.user_id, run.request_id)) is run:
            del self._by_request[run.user_id, run.request_id]
        for connection in self.manager.forget_run(run.run_id):
            if isinstance(connection, OutboundQueue):
                connection.unsubscribe(run.run_id)
            else:
                connection.detach(run.run_id)

    def _maybe_detached(self, run: AgentExecutionContext) -> None:
        """Starts the detach timer of a run left with no subscribed connection."""
        if run.is_active and not self.manager.has_subscribers(run.run_id):
            self._detached.push((run, run.detach_generation))

    def _detach_due(self, item: tuple[AgentExecutionContext, int]) -> None:
        """Cancels the run unless it was subscribed again since its timer started."""
        run, generation = item
        if run.detach_generation == generation and not self.manager.has_subscribers(run.run_id):
            self._end(run, Trigger.DETACH)

    async def _sweep_service(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            await anyio.sleep(self.config.sweep_interval_s)
            await self.cleanup_stale_contexts()

    async def cleanup_stale_contexts(self) -> int:
        """Ends every active run older than ``stale_context_age_s``; returns how many.

        Blocks until those runs have ended (terminal event delivered, unregistered).
        """
        horizon = anyio.current_time() - self.config.stale_context_age_s
        stale = [run for run in self._active.values() if run.created_at <= horizon]
        for run in stale:
            self._end(run, Trigger.STALE)
        for run in stale:
            await run.done.wait()
        if stale:
            log.warning("swept %d stale contexts", len(stale))
        return len(stale)

    async def aclose_runs(self) -> None:
        """Stops taking runs, cancels every active one and waits until all have ended."""
        self._closing = True
        for run in list(self._active.values()):
            self._end(run, Trigger.SHUTDOWN)
        await self._idle.wait()

    # ====================================================== introspection
    def statistics(self) -> RegistryStatistics:
        """A frozen snapshot of the registry's state and counters."""
        c = self._counts
        return RegistryStatistics(
            active_runs=len(self._active),
            active_runs_per_user=dict(self._active_per_user),
            retained_runs=len(self._runs),
            connections=self.manager.connection_count(),
            runs_started=c["runs_started"],
            runs_completed=c["runs_completed"],
            runs_by_status=dict(self._by_status),
            events_emitted=c["events_emitted"],
            events_delivered=c["events_delivered"],
            events_retried=c["events_retried"],
            events_failed=c["events_failed"],
            events_refused=c["events_refused"],
            dedup_hits=c["dedup_hits"],
        )

    def health(self) -> Health:
        """``unhealthy`` when closing; ``degraded`` near capacity or when deliveries fail.

        Delivery failures count over the last :data:`HEALTH_WINDOW_S` seconds, so health
        recovers once deliveries succeed again. Events refused because the caller broke a
        stream rule are programming errors, not delivery failures: they do not count.
        """
        if self._closing:
            return Health("unhealthy", ("the registry is shutting down",))
        reasons = []
        active, limit = len(self._active), self.config.max_active_runs
        if active >= 0.9 * limit:
            reasons.append(f"{active} runs in flight, at or near max_active_runs ({limit})")
        handed, failed = self._recent_deliveries()
        if failed and failed / (handed + failed) > _FAILURE_RATIO:
            reasons.append(f"{failed} of {handed + failed} event deliveries failed in the "
                           f"last {HEALTH_WINDOW_S:g} s")
        return Health("degraded", tuple(reasons)) if reasons else Health("ok")

    def _recent_deliveries(self) -> tuple[int, int]:
        """Deliveries handed and failed since the oldest mark inside the health window."""
        now, marks = anyio.current_time(), self._health_marks
        handed, failed = self._counts["events_delivered"], self._counts["events_failed"]
        if now - marks[-1][0] >= 1.0:
            marks.append((now, handed, failed))
        while len(marks) > 1 and marks[1][0] <= now - HEALTH_WINDOW_S:
            marks.popleft()
        _, handed_before, failed_before = marks[0]
        return handed - handed_before, failed - failed_before

    # ================================================ migration-plan API
    async def initialize(self) -> None:
        """Kept for the migration plan: the registry is ready once ``open_registry`` yields.

        Raises:
            RegistryClosed: the registry is shutting down.
        """
        if self._closing:
            raise RegistryClosed("the registry is shutting down")

    async def create_execution_context(
        self,
        agent_type: str,
        user_id: str,
        message: str,
        context: Mapping[str, Any] | None = None,
    ) -> tuple[AgentExecutionContext, WebSocketNotifier]:
        """Registers a run that the caller drives itself through the returned notifier.

        ``context`` may carry ``request_id`` (dedup key; random when absent) and
        ``thread_id``. Every connection the user has open is subscribed. The run still lives
        in a scope of the registry: a timeout, cancel, sweep or shutdown ends it with its
        terminal event even if the caller never calls :meth:`complete_execution`.

        Raises:
            RateLimited, Overloaded, RegistryClosed: no capacity for a new run.
        """
        from registry._notifier import WebSocketNotifier

        context = dict(context or {})
        request_id = str(context.get("request_id") or secrets.token_hex(16))
        run = self._find_duplicate(user_id, request_id)
        if run is None:
            thread_id = context.get("thread_id")
            run = self._create(user_id, request_id, agent_type, message,
                               thread_id if isinstance(thread_id, str) else None, context,
                               external=True)
            self._launch(run, anyio.sleep_forever, self.manager.connections(user_id))
        return run, WebSocketNotifier(self, run)

    def setup_agent_websocket_integration(
        self, supervisor: Supervisor, agent_registry: AgentRegistry
    ) -> None:
        """Wires a supervisor and an agent registry to this registry and its WebSocketManager.

        Runs started afterwards use ``agent_registry`` and are executed by ``supervisor``.
        """
        supervisor.agent_registry = agent_registry
        supervisor.registry = self
        agent_registry.websocket_manager = self.manager
        self.supervisor = supervisor


def _sent_through(connection: Connection, run_id: str) -> int:
    if isinstance(connection, OutboundQueue):
        return connection.sent_through(run_id)
    return connection.delivered_through(run_id)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
