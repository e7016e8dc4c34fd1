"""The migration plan's API, with the guarantees of every other run.

A backend that ports onto the registry keeps the calls its plan names:
``initialize``, ``create_execution_context``, ``complete_execution``,
``setup_agent_websocket_integration``, ``cleanup_stale_contexts`` and the accessor
``get_agent_execution_registry``. Each is a thin layer over the driver's own steps, so a run
made here is numbered, retained, deduplicated, timed out, swept and ended like any other.

:meth:`MigrationPlanAPI.open_execution_context` is the form to prefer: its block *is* the
run's cancel scope, so the caller's code cannot outlive the run, nor the run the code.
"""

from __future__ import annotations

import abc
import secrets
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from registry._errors import DuplicateRun, RegistryClosed
from registry._lifecycle import Trigger
from registry._notifier import WebSocketNotifier
from registry._payloads import outcome
from registry._run import Run

if TYPE_CHECKING:
    from registry._agents import AgentRegistry, Supervisor
    from registry._config import Config
    from registry._manager import Connection, WebSocketManager
    from registry._table import RunTable
    from registry._vocabulary import EventType, EventTypeName

__all__ = ["MigrationPlanAPI"]


class MigrationPlanAPI(abc.ABC):
    """The migration plan's methods of :class:`~registry.AgentExecutionRegistry`.

    A mixin: it uses only the driver's steps declared abstract below.
    """

    config: Config
    manager: WebSocketManager
    supervisor: Supervisor
    agents: AgentRegistry
    _table: RunTable

    # the driver's steps it builds on (registry/_registry.py)
    @abc.abstractmethod
    def _admit(self, user_id: str, request_id: str, agent: str, message: str,
               thread_id: str | None, options: Mapping[str, Any] | None) -> Run: ...

    @abc.abstractmethod
    def _launch(self, run: Run, body: Any, connections: Iterable[Connection]) -> None: ...

    @abc.abstractmethod
    def _subscribe(self, run: Run, connection: Connection, after_seq: int) -> None: ...

    @abc.abstractmethod
    def _maybe_detached(self, run: Run) -> None: ...

    @abc.abstractmethod
    def _end(self, run: Run, trigger: Trigger, payload: Mapping[str, Any] | None = None, *,
             from_inside: bool = False) -> bool: ...

    @abc.abstractmethod
    async def _complete(self, run: Run) -> None: ...

    @abc.abstractmethod
    async def _end_and_wait(self, runs: list[Run], trigger: Trigger) -> None: ...

    @abc.abstractmethod
    def describe_failure(self, run: Run, exc: BaseException, what: str) -> dict[str, str]: ...

    @abc.abstractmethod
    async def ensure_event_delivery(self, context: Run, event_type: EventType | EventTypeName,
                                    payload: Any) -> bool: ...

    async def initialize(self) -> None:
        """The plan's start-up step; the registry is ready once ``open_registry`` yields.

        Raises:
            RegistryClosed: the registry is shutting down.
        """
        await anyio.lowlevel.checkpoint()
        if self._table.closing:
            raise RegistryClosed("the registry is shutting down")

    async def setup_agent_websocket_integration(
        self, supervisor: Supervisor, registry: AgentRegistry
    ) -> None:
        """Runs started from now on take their agents from ``registry`` (an AgentRegistry).

        ``supervisor.run(...)`` and ``supervisor.run_agent(...)`` reach this registry through
        ``get_agent_execution_registry()``; neither object is changed.
        """
        await anyio.lowlevel.checkpoint()
        self.supervisor = supervisor
        self.agents = registry

    async def create_execution_context(
        self, agent_type: str, user_id: str, message: str,
        context: Mapping[str, Any] | None = None,
    ) -> tuple[Run, WebSocketNotifier]:
        """Registers a run that the caller drives through the returned notifier.

        ``context`` may carry ``request_id`` (the dedup key; random when absent) and
        ``thread_id``. Every connection the user has open follows the run. A repeated
        request_id returns the run already registered, with ``notifier.duplicate`` True.
        The run ends by ``complete_execution``, the notifier's ``send_agent_completed``, or
        like any run by timeout, cancel, sweep, detach or shutdown; prefer
        :meth:`open_execution_context`, which also ends it when the caller's code ends.

        Raises:
            UnknownAgent: ``agent_type`` is not registered.
            InvalidField: ``user_id`` is empty.
            RateLimited, Overloaded, RegistryClosed: no room for a new run.
        """
        await anyio.lowlevel.checkpoint()
        run, duplicate = self._register(agent_type, user_id, message, context)
        if not duplicate:
            self._launch(run, anyio.sleep_forever, self.manager.connections(user_id))
        return run, self._notifier(run, duplicate)

    @asynccontextmanager
    async def open_execution_context(
        self, agent_type: str, user_id: str, message: str,
        context: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[tuple[Run, WebSocketNotifier]]:
        """A run whose cancel scope is this block (as ``create_execution_context`` otherwise).

        The block raising ends the run ``failed`` (the exception goes on); a cancel, a
        timeout, a sweep or the registry's shutdown cancels the block and ends the run
        ``cancelled`` / ``timed_out``; the block's own cancellation ends it ``cancelled``;
        a block that ends without completing the run ends it ``succeeded`` (result None).
        The terminal event is delivered before the block is left.

        Raises:
            DuplicateRun: a run exists for this request_id (its ``run`` attribute).
            UnknownAgent, InvalidField, RateLimited, Overloaded, RegistryClosed: as
                :meth:`create_execution_context`.
        """
        await anyio.lowlevel.checkpoint()
        run, duplicate = self._register(agent_type, user_id, message, context)
        if duplicate:
            raise DuplicateRun(run)
        run._in_block = True
        for connection in self.manager.connections(user_id):
            self._subscribe(run, connection, 0)
        self._maybe_detached(run)
        try:
            async with self._scope_block(run):
                yield run, self._notifier(run, False)
        finally:
            with anyio.move_on_after(self.config.shutdown_grace_s, shield=True):
                await self._complete(run)

    @asynccontextmanager
    async def _scope_block(self, run: Run) -> AsyncIterator[None]:
        """Runs the caller's block in the run's scope and decides how the run ends."""
        scope = run._scope
        assert scope is not None
        try:
            with scope:
                yield
        except Exception as exc:
            self._end(run, Trigger.FAIL, {"status": "failed",
                                          **self.describe_failure(run, exc, "agent")})
            raise
        except BaseException:
            self._end(run, Trigger.CANCEL)
            raise
        if scope.cancelled_caught:
            self._end(run, Trigger.TIMEOUT, {"status": "timed_out", "error": (
                f"the run exceeded agent_timeout_s ({self.config.agent_timeout_s} s)")})
        self._end(run, Trigger.SUCCEED, {"status": "succeeded", **outcome(True)})

    async def complete_execution(self, context: Run, result: Any) -> None:
        """Ends a run: ``succeeded`` with ``result``, or ``failed`` when it is an exception.

        Blocks until the terminal event is delivered and the run unregistered. A no-op on a
        run that has already ended.
        """
        if isinstance(result, BaseException):
            payload = {"status": "failed", **self.describe_failure(context, result, "agent")}
        else:
            payload = {"status": "succeeded", **outcome(True, result)}
        await self.ensure_event_delivery(context, "agent_completed", payload)

    async def cleanup_stale_contexts(self) -> int:
        """Ends every active run older than ``stale_context_age_s``; returns how many.

        Blocks (bounded by ``shutdown_grace_s``) until those runs have ended.
        """
        await anyio.lowlevel.checkpoint()
        stale = self._table.stale(anyio.current_time() - self.config.stale_context_age_s)
        await self._end_and_wait(stale, Trigger.STALE)
        return len(stale)

    def _register(
        self, agent_type: str, user_id: str, message: str, context: Mapping[str, Any] | None,
    ) -> tuple[Run, bool]:
        options = dict(context or {})
        request_id = str(options.get("request_id") or secrets.token_hex(16))
        existing = self._table.find(user_id, request_id) if user_id else None
        if existing is not None:
            return existing, True
        self.agents.get(agent_type)
        thread_id = options.get("thread_id")
        thread_id = thread_id if isinstance(thread_id, str) and thread_id else None
        return self._admit(user_id, request_id, agent_type, message, thread_id, options), False

    def _notifier(self, run: Run, duplicate: bool) -> WebSocketNotifier:
        async def emit(kind: EventType, payload: Any) -> bool:
            return await self.ensure_event_delivery(run, kind, payload)

        return WebSocketNotifier(run, emit, duplicate=duplicate)
