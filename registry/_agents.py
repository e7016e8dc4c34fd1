"""What agents are and how they run: AgentRegistry, ToolDispatcher, AgentContext, Supervisor.

An agent is ``async def agent(ctx: AgentContext) -> result``. It reports progress through
``ctx`` (never through a socket); the registry numbers, checks and delivers what it emits.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, final

import attrs

from registry._errors import UnknownAgent, quote
from registry._events import EventType

if TYPE_CHECKING:
    from registry._context import AgentExecutionContext
    from registry._manager import WebSocketManager
    from registry._registry import AgentExecutionRegistry

__all__ = [
    "AgentContext",
    "AgentFn",
    "AgentRegistry",
    "AgentSpec",
    "Supervisor",
    "ToolDispatcher",
    "ToolFn",
]

AgentFn = Callable[["AgentContext"], Awaitable[Any]]
ToolFn = Callable[[Mapping[str, Any]], Awaitable[Any]]
ContextValidator = Callable[[Mapping[str, Any]], None]


def _accept_any(context: Mapping[str, Any]) -> None:
    """The default context validator: every context object is acceptable."""


@final
@attrs.frozen
class AgentSpec:
    """A registered agent.

    Attributes:
        name: What clients put in ``start_agent.agent``.
        run: The agent function.
        validate: Raises :class:`~registry.InvalidField` (``field`` like ``context.tools``)
            when a ``context`` object is unacceptable; called before the run is created.
    """

    name: str
    run: AgentFn
    validate: ContextValidator = _accept_any


@final
class AgentRegistry:
    """The agents a registry can run, by name."""

    def __init__(self) -> None:
        self._agents: dict[str, AgentSpec] = {}
        self.websocket_manager: WebSocketManager | None = None

    def register(
        self, name: str, run: AgentFn, *, validate: ContextValidator | None = None
    ) -> AgentSpec:
        """Registers an agent under ``name``.

        Raises:
            ValueError: the name is empty or already taken.
        """
        if not name or name in self._agents:
            raise ValueError(f"agent name {name!r} is empty or already registered")
        spec = AgentSpec(name, run, validate or _accept_any)
        self._agents[name] = spec
        return spec

    def get(self, name: str) -> AgentSpec:
        """The agent named ``name``; raises :class:`~registry.UnknownAgent` if none."""
        try:
            return self._agents[name]
        except KeyError:
            raise UnknownAgent(f"no agent named {quote(name)}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._agents)


@final
class ToolDispatcher:
    """Runs tools for agents and emits the ``tool_executing``/``tool_completed`` pair of each.

    A tool that raises gets ``tool_completed`` with status ``error`` and the exception is
    re-raised to the agent. A tool cancelled with its run is completed ``cancelled`` by the
    run's stream.
    """

    def __init__(self) -> None:
        self._tools: dict[str, ToolFn] = {}
        self._call_ids = itertools.count(1)

    def register(self, name: str, fn: ToolFn) -> None:
        if not name or name in self._tools:
            raise ValueError(f"tool name {name!r} is empty or already registered")
        self._tools[name] = fn

    def names(self) -> tuple[str, ...]:
        return tuple(self._tools)

    async def execute(
        self,
        ctx: AgentContext,
        tool: str,
        args: Mapping[str, Any] | None = None,
        fn: ToolFn | None = None,
    ) -> Any:
        """Runs ``fn`` (or the registered tool named ``tool``) between its two events.

        Raises:
            KeyError: no ``fn`` was given and no tool of that name is registered.
            Exception: whatever the tool raised (after ``tool_completed`` ``error``).
        """
        impl = fn if fn is not None else self._tools[tool]
        args = dict(args or {})
        call_id = f"call_{next(self._call_ids)}"
        base = {"tool": tool, "call_id": call_id}
        await ctx.emit(EventType.TOOL_EXECUTING, {**base, "args": args})
        try:
            result = await impl(args)
        except Exception as exc:
            failure = ctx.registry.describe_failure(ctx.execution, exc, "tool")
            await ctx.emit(EventType.TOOL_COMPLETED, {**base, "status": "error", **failure})
            raise
        await ctx.emit(EventType.TOOL_COMPLETED, {**base, "status": "ok", "result": result})
        return result


@final
class AgentContext:
    """What an agent sees of its run: the request, and the ways to report progress."""

    def __init__(
        self,
        registry: AgentExecutionRegistry,
        execution: AgentExecutionContext,
        tools: ToolDispatcher,
    ) -> None:
        self.registry = registry
        self.execution = execution
        self.tools = tools

    @property
    def message(self) -> str:
        return self.execution.message

    @property
    def context(self) -> Mapping[str, Any]:
        return self.execution.context

    @property
    def run_id(self) -> str:
        return self.execution.run_id

    @property
    def user_id(self) -> str:
        return self.execution.user_id

    async def emit(self, event_type: EventType, payload: Mapping[str, Any]) -> bool:
        """Emits one event of this run (see ``ensure_event_delivery``)."""
        return await self.registry.ensure_event_delivery(self.execution, event_type, payload)

    async def think(self, thought: str) -> bool:
        return await self.emit(EventType.AGENT_THINKING, {"thought": thought})

    async def partial(self, text: str) -> bool:
        return await self.emit(EventType.PARTIAL_RESULT, {"text": text})

    async def tool(
        self, name: str, args: Mapping[str, Any] | None = None, fn: ToolFn | None = None
    ) -> Any:
        """Calls a tool through the :class:`ToolDispatcher`; returns its result."""
        return await self.tools.execute(self, name, args, fn)


@final
class Supervisor:
    """Runs agents from an :class:`AgentRegistry` with a :class:`ToolDispatcher`.

    The registry calls :meth:`body_for` to get the coroutine function a run executes.
    """

    def __init__(
        self,
        agent_registry: AgentRegistry | None = None,
        tool_dispatcher: ToolDispatcher | None = None,
    ) -> None:
        self.agent_registry = agent_registry or AgentRegistry()
        self.tool_dispatcher = tool_dispatcher or ToolDispatcher()
        self.registry: AgentExecutionRegistry | None = None

    def body_for(
        self, execution: AgentExecutionContext, spec: AgentSpec
    ) -> Callable[[], Awaitable[Any]]:
        """The coroutine function that runs ``spec`` for ``execution``: started, then the agent."""
        registry = self.registry
        if registry is None:
            raise RuntimeError("the supervisor is not attached to a registry")
        ctx = AgentContext(registry, execution, self.tool_dispatcher)

        async def body() -> Any:
            await ctx.emit(EventType.AGENT_STARTED, {"agent": spec.name})
            return await spec.run(ctx)

        return body

    async def run_agent(
        self,
        agent: str,
        user_id: str,
        message: str,
        *,
        request_id: str,
        context: Mapping[str, Any] | None = None,
    ) -> Mapping[str, Any]:
        """Starts ``agent`` through the registry and waits for it; returns the terminal payload."""
        if self.registry is None:
            raise RuntimeError("the supervisor is not attached to a registry")
        run, _ = self.registry.start_run(
            user_id=user_id, request_id=request_id, agent=agent, message=message, context=context
        )
        return await run.wait_done()
