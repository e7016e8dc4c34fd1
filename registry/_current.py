"""The one documented accessor: the registry that is open, for code that cannot be handed it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio.lowlevel

if TYPE_CHECKING:
    from registry._registry import AgentExecutionRegistry

__all__ = ["get_agent_execution_registry"]

#: Registries open now, innermost last (``open_registry`` pushes and pops).
OPEN: list[AgentExecutionRegistry] = []


async def get_agent_execution_registry() -> AgentExecutionRegistry:
    """The registry opened most recently by ``open_registry`` and still open.

    For the migration plan's call sites (``orchestrator = await get_agent_execution_registry()``);
    prefer passing the registry down.

    Raises:
        RuntimeError: no registry is open.
    """
    await anyio.lowlevel.checkpoint()
    if not OPEN:
        raise RuntimeError("no AgentExecutionRegistry is open; use `async with open_registry()`")
    return OPEN[-1]
