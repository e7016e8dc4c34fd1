"""The entry point: :func:`open_registry` opens a registry inside the caller's block.

The registry's task group is a task group of that block, so a run can never outlive it:
on the block's exit every active run ends with its terminal event delivered, bounded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import anyio

from registry._agents import AgentRegistry, Supervisor, ToolDispatcher
from registry._config import Config
from registry._current import OPEN
from registry._redis import open_redis_state
from registry._registry import AgentExecutionRegistry
from registry._shared import SharedState
from registry._util import unwrapping_groups

__all__ = ["open_registry"]


@asynccontextmanager
async def open_registry(
    config: Config | None = None,
    *,
    agents: AgentRegistry | None = None,
    tools: ToolDispatcher | None = None,
    shared: SharedState | None = None,
) -> AsyncIterator[AgentExecutionRegistry]:
    """Opens a registry whose runs and services live in a task group of this block.

    On exit (normal, exception or cancellation) every active run is cancelled with its
    terminal event delivered (bounded by ``shutdown_grace_s``); the block returns once
    every run has ended and been unregistered.

    Args:
        config: Timeouts and limits; ``Config()`` when omitted.
        agents: The agents runs may use; an empty :class:`AgentRegistry` when omitted.
        tools: The tools agents may call; an empty :class:`ToolDispatcher` when omitted.
        shared: The state shared with the other nodes of a service; opened from
            ``config.redis_url`` when omitted and set, else none (all state in memory).
    """
    config = config or Config()
    async with AsyncExitStack() as stack:
        if shared is None and config.redis_url is not None:
            shared = await stack.enter_async_context(open_redis_state(config.redis_url))
        reg = await stack.enter_async_context(_running(config, agents, tools, shared))
        yield reg


@asynccontextmanager
async def _running(
    config: Config, agents: AgentRegistry | None, tools: ToolDispatcher | None,
    shared: SharedState | None,
) -> AsyncIterator[AgentExecutionRegistry]:
    async with unwrapping_groups(), anyio.create_task_group() as tg:
        reg = AgentExecutionRegistry(config, tg, Supervisor(agents, tools), shared)
        await reg.start_services()
        OPEN.append(reg)
        try:
            yield reg
        finally:
            OPEN.remove(reg)
            with anyio.move_on_after(config.shutdown_grace_s, shield=True):
                await reg.aclose_runs()
            tg.cancel_scope.cancel()
