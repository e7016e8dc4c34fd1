"""What agents are and how they run: AgentRegistry, ToolDispatcher, AgentContext, Supervisor.

An agent is ``async def agent(ctx: AgentContext) -> result``. It reports progress through
``ctx`` (never through a socket); the registry numbers, checks and delivers what it emits.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, final

import anyio
import attrs

from registry._current import get_agent_execution_registry
from registry._errors import RunNotFound, UnknownAgent, quote
from registry._payloads import (
    AgentStarted,
    AgentThinking,
    PartialResult,
    Payload,
    ToolCompleted,
    ToolExecuting,
)
from registry._run import Run
from registry._vocabulary import EventType, EventTypeName

__all__ = [
    "AgentContext",
    "AgentFn",
    "AgentRegistry",
    "AgentSpec",
    "Supervisor",
    "ToolDispatcher",
    "ToolFn",
    "run_agent",
]

AgentFn = Callable[["AgentContext"], Awaitable[Any]]
ToolFn = Callable[[Mapping[str, Any]], Awaitable[Any]]
ContextValidator = Callable[[Mapping[str, Any]], None]
#: How a handle records an event of its run (the registry's ``ensure_event_delivery``).
Emit = Callable[[EventType | EventTypeName, Payload | Mapping[str, Any]], Awaitable[bool]]
#: How a failure becomes the ``error``/``error_id`` a client sees (logged in full).
DescribeFailure = Callable[[BaseException, str], dict[str, str]]


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

    A tool that raises gets ``tool_completed`` with status ``error`` (a generic text and an
    ``error_id``, see ``expose_errors``) and the exception is re-raised to the agent. A tool
    cancelled with its run is completed ``cancelled`` by the run's stream.
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
        call_id = f"call_{next(self._call_ids)}"
        await ctx.emit(EventType.TOOL_EXECUTING, ToolExecuting(tool, call_id, dict(args or {})))
        try:
            result = await impl(args or {})
        except Exception as exc:
            failure = ctx.describe_failure(exc, "tool")
            await ctx.emit(EventType.TOOL_COMPLETED, ToolCompleted(
                tool, call_id, "error", error=failure["error"], error_id=failure["error_id"]))
            raise
        await ctx.emit(EventType.TOOL_COMPLETED, ToolCompleted(tool, call_id, "ok", result))
        return result


@final
class AgentContext:
    """An agent's handle on its run: what was asked, and the ways to report progress.

    Args:
        run: The run (read it; change it only through ``emit``).
        emit: Records one event of the run.
        tools: Runs the agent's tool calls.
        describe_failure: Turns a tool's exception into what the client may see.
        sleep: How :meth:`sleep` waits.
    """

    def __init__(
        self, run: Run, emit: Emit, tools: ToolDispatcher, describe_failure: DescribeFailure,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.run = run
        self.emit = emit
        self.tools = tools
        self.describe_failure = describe_failure
        self._sleep = sleep

    @property
    def message(self) -> str:
        return self.run.message

    @property
    def options(self) -> Mapping[str, Any]:
        """The client's options for this run (``start_agent.context`` on the wire)."""
        return self.run.options

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def user_id(self) -> str:
        return self.run.user_id

    @property
    def thread_id(self) -> str:
        return self.run.thread_id

    async def think(self, thought: str) -> bool:
        return await self.emit(EventType.AGENT_THINKING, AgentThinking(thought))

    async def partial(self, text: str) -> bool:
        return await self.emit(EventType.PARTIAL_RESULT, PartialResult(text))

    async def tool(
        self, name: str, args: Mapping[str, Any] | None = None, fn: ToolFn | None = None
    ) -> Any:
        """Calls a tool through the :class:`ToolDispatcher`; returns its result."""
        return await self.tools.execute(self, name, args, fn)

    async def sleep(self, seconds: float) -> None:
        """Waits ``seconds`` (a cancellation point, like any wait of the run).

        Cheaper than ``trio.sleep`` when many runs pace their events: the registry's
        :class:`~registry._timers.Pacer` wakes every run due at one tick together. The wait
        may end a little late: up to 2 ms, or up to 16 ms for a wait of half a second or
        more (at most 3.2 % of it), so that runs pacing long waits share their wake-ups.
        """
        await self._sleep(seconds)


async def run_agent(spec: AgentSpec, ctx: AgentContext) -> Any:
    """What a run of ``spec`` does: ``agent_started``, then the agent; returns its result."""
    await ctx.emit(EventType.AGENT_STARTED, AgentStarted(spec.name))
    return await spec.run(ctx)


@final
class Supervisor:
    """Runs agents from an :class:`AgentRegistry` with a :class:`ToolDispatcher`.

    Attributes:
        agent_registry: Where agents are found by name.
        tool_dispatcher: What agents call tools through.
    """

    def __init__(
        self,
        agent_registry: AgentRegistry | None = None,
        tool_dispatcher: ToolDispatcher | None = None,
    ) -> None:
        self.agent_registry = agent_registry or AgentRegistry()
        self.tool_dispatcher = tool_dispatcher or ToolDispatcher()

    async def execute(self, ctx: AgentContext) -> Any:
        """Runs the run's agent with ``ctx``: ``agent_started``, then the agent; its result."""
        return await run_agent(self.agent_registry.get(ctx.run.agent), ctx)

    async def run(self, message: str, thread_id: str, user_id: str, run_id: str) -> Any:
        """Runs the agent of an existing run (the migration plan's ``supervisor.run``).

        For a run made with ``create_execution_context``: finds it through the open
        registry, runs its agent and returns the result (``complete_execution`` ends it).

        Raises:
            RunNotFound: no such run of ``user_id`` (or it does not match ``thread_id``).
            UnknownAgent: the run's agent is not in this supervisor's agent registry.
        """
        registry = await get_agent_execution_registry()
        run = registry.get_run(run_id, user_id)
        if run.thread_id != thread_id or run.message != message:
            raise RunNotFound(f"run {quote(run_id)} has another thread or message")
        return await self.execute(registry.agent_context(run, self.tool_dispatcher))

    async def run_agent(
        self, agent: str, user_id: str, message: str, *, request_id: str,
        context: Mapping[str, Any] | None = None,
    ) -> Mapping[str, Any]:
        """Starts ``agent`` through the open registry and waits; returns the terminal payload."""
        registry = await get_agent_execution_registry()
        run, _ = registry.start_run(user_id=user_id, request_id=request_id, agent=agent,
                                    message=message, context=context)
        return await run.wait_done()
