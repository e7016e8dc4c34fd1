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
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final, final

import anyio
import anyio.abc
import anyio.lowlevel

from registry._agents import Supervisor, run_agent
from registry._cluster import ClusterAPI
from registry._compat import MigrationPlanAPI
from registry._config import Config
from registry._delivery import Delivery
from registry._emit import EmitAPI
from registry._errors import RunNotFound
from registry._health import DeliveryWindow, Health, RegistryStatistics, judge, snapshot
from registry._lifecycle import Trigger
from registry._manager import Connection, WebSocketManager
from registry._payloads import outcome
from registry._retention import Retention
from registry._run import Run
from registry._service import ServiceAPI
from registry._shared import SharedState
from registry._stream import RunStream
from registry._subscriptions import SubscriptionsAPI
from registry._table import RunTable
from registry._timers import DeadlineQueue, Pacer
from registry._util import checkpoints

__all__ = ["AgentExecutionRegistry"]

log = logging.getLogger("registry")

Body = Callable[[], Awaitable[Any]]

_REASONS: Final = {
    Trigger.CANCEL: "cancelled by the client",
    Trigger.DETACH: "no connection subscribed for detached_run_timeout_s",
    Trigger.SHUTDOWN: "the server is shutting down",
    Trigger.STALE: "stale context swept",
}


@final
class AgentExecutionRegistry(ClusterAPI, EmitAPI, SubscriptionsAPI, ServiceAPI,
                             MigrationPlanAPI):
    """The single source of truth for agent runs. Open it with :func:`open_registry`.

    Every run executes in its own cancel scope, so a cancel, an agent exception, a timeout,
    a detached run or the registry's exit always ends it with exactly one terminal event
    and unregisters it.
    """

    def __init__(
        self, config: Config, tg: anyio.abc.TaskGroup, supervisor: Supervisor,
        shared: SharedState | None = None,
    ) -> None:
        self.config = config
        self.node_id = "node_" + secrets.token_hex(6)
        self.manager = WebSocketManager(config.max_connections_per_user)
        self.supervisor = supervisor
        self.agents = supervisor.agent_registry
        self._tg = tg
        self._table = RunTable(
            max_active_runs=config.max_active_runs,
            max_active_runs_per_user=config.max_active_runs_per_user,
            max_retained_runs_per_user=config.max_retained_runs_per_user)
        self._delivery = Delivery(config, self.manager, self._maybe_detached, self.disconnect)
        self._retention = Retention(config, self._table, self.manager, self.disconnect)
        self._detached = DeadlineQueue(config.detached_run_timeout_s, self._detach_due)
        self.pacer = Pacer()
        self._checkpoint_if_cancelled, self._schedule_point = checkpoints()
        self._idle = anyio.Event()
        self._idle.set()
        self._refused = 0
        self._window = DeliveryWindow(anyio.current_time())
        self._init_cluster(shared)

    async def start_services(self) -> None:
        """Starts retention expiry, the detach timer, the stale sweep (and a node's services)."""
        for service in (self._retention.expiry.serve, self._detached.serve, self._sweep_service,
                        self.pacer.serve):
            await self._tg.start(service)
        await self.start_cluster()

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
        self._launch_agent(run, subscriber)
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

    # ============================================================ lifecycle
    def _admit(
        self, user_id: str, request_id: str, agent: str, message: str, thread_id: str | None,
        options: Mapping[str, Any] | None, run_id: str | None = None,
    ) -> Run:
        """Creates and registers a run (after its capacity check)."""
        self._table.check_room(user_id)
        run_id, now = run_id or secrets.token_hex(16), anyio.current_time()
        thread_id = thread_id if thread_id is not None else "thread_" + secrets.token_hex(8)
        run = Run(
            run_id=run_id, user_id=user_id, request_id=request_id, thread_id=thread_id,
            agent=agent, message=message, options=dict(options or {}), created_at=now,
            stream=RunStream(run_id, thread_id, agent, self.config.max_retained_events_per_run,
                             self._retention.held),
            scope=anyio.CancelScope(deadline=now + self.config.agent_timeout_s))
        run.lifecycle.fire(Trigger.START)
        self._table.add(run)
        if self._idle.is_set():
            self._idle = anyio.Event()
        return run

    def _launch_agent(self, run: Run, subscriber: Connection | None) -> None:
        self._launch(run, self._agent_body(run), [subscriber] if subscriber else [])

    def _launch(self, run: Run, body: Body, connections: Iterable[Connection]) -> None:
        for connection in connections:
            self._subscribe(run, connection, 0)
        self._maybe_detached(run)
        self._tg.start_soon(self._drive, run, body, name=f"run {run.run_id}")

    def _agent_body(self, run: Run) -> Body:
        ctx = self.agent_context(run)
        return lambda: run_agent(self.agents.get(run.agent), ctx)

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

    def _end(self, run: Run, trigger: Trigger, payload: Mapping[str, Any] | None = None, *,
             from_inside: bool = False) -> bool:
        """Decides how a run ends (the first decision wins) and cancels its scope.

        A caller's block that ends its own run (``from_inside``) is not cancelled: the
        code after ``complete_execution`` in the block still runs.
        """
        if not run.lifecycle.can(trigger):
            return False
        run.lifecycle.fire(trigger)
        if payload is None:
            payload = {"status": str(run.lifecycle.status), "error": _REASONS[trigger]}
        run.final_payload = payload
        if run._scope is not None and not (from_inside and run._in_block):
            run._scope.cancel()
        return True

    async def _complete(self, run: Run) -> None:
        """Emits the run's closing events, then unregisters it; always, and once."""
        assert run.final_payload is not None
        if run.stream.ended:  # a block's run completed from inside the block
            return
        try:
            events = run.stream.finish(run.final_payload, time.time())
            await self._deliver(run, events, confirm=True)
        finally:
            run.lifecycle.fire(Trigger.COMPLETE)
            run.ended_at = anyio.current_time()
            run._scope = run._lock = None  # an ended run keeps only what a resume needs
            self._retention.keep(run, run.ended_at)
            run.done.set()
            if not self._table.active_count:
                self._idle.set()

    # ============================================================= services
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
        """Takes no new runs, cancels every active one and waits (bounded) until all ended.

        A node of a service then writes what it owes the shared state and leaves it.
        """
        self._table.closing = True
        await self._end_and_wait(list(self._table.active()), Trigger.SHUTDOWN)
        with anyio.move_on_after(self.config.shutdown_grace_s, shield=True):
            await self._idle.wait()
        await self.leave_cluster()

    # ======================================================= introspection
    def statistics(self) -> RegistryStatistics:
        """A frozen snapshot of the registry's state and counters."""
        return snapshot(self._table, self._delivery.counts, self._refused,
                        self.manager.connection_count())

    def health(self) -> Health:
        """``unhealthy`` when closing; ``degraded`` near capacity or when deliveries fail.

        Delivery failures count over the last 60 s, so health recovers; refused events
        (programming errors) are not delivery failures. A node of a service is degraded
        while its shared state cannot be reached.
        """
        now = anyio.current_time()
        health = judge(self._table, self._delivery.counts, self._window, now)
        if self._unreachable_since is None or health.status == "unhealthy":
            return health
        since = now - self._unreachable_since
        reason = f"the service's shared state (Redis) is unreachable for {since:.0f} s"
        return Health("degraded", (*health.reasons, reason))


def _failed(failure: Mapping[str, str]) -> dict[str, Any]:
    return {"status": "failed", **failure}
