"""The backend's two agents, written against the registry: they report through ``ctx``.

An agent never sees a socket, a notifier or a run id. ``ctx.think`` and ``ctx.partial``
record one event each; ``ctx.tool`` records the ``tool_executing`` / ``tool_completed``
pair around the call, whatever the tool does (a tool that raises gets its
``tool_completed`` with status ``error``, and the exception comes back to the agent). What
a run owes its client when it fails, is cancelled or times out, the registry sends.

What docs/MIGRATION.md counts as integration code is marked ``# [glue]``: a line with that
comment at its end, or the lines between ``# [glue]`` and ``# [/glue]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from examples.fastapi_backend import domain
from registry import AgentContext, AgentRegistry, Supervisor, ToolDispatcher

__all__ = ["build_supervisor", "smalltalk", "support"]


async def support(ctx: AgentContext) -> dict[str, Any]:
    """Answers a support question: looks up the order it names and the help articles."""
    await ctx.think("Reading your message")  # [glue]
    order_id = domain.order_number(ctx.message)
    order: dict[str, str] | None = None
    if order_id is not None:
        with contextlib.suppress(LookupError):  # an unknown number: the answer says so
            order = await ctx.tool("lookup_order", {"order_id": order_id})  # [glue]
    articles = await ctx.tool("search_help", {"query": ctx.message})  # [glue]
    answer = domain.compose_answer(order, order_id, articles)
    for word in domain.words(answer):
        await ctx.sleep(domain.TYPING_DELAY_S)
        await ctx.partial(word)  # [glue]
    return {"answer": answer, "articles": articles}


async def smalltalk(ctx: AgentContext) -> str:
    """Answers anything that is not a support question."""
    await ctx.think("Just chatting")  # [glue]
    answer = domain.greeting(ctx.message)
    for word in domain.words(answer):
        await ctx.sleep(domain.TYPING_DELAY_S)
        await ctx.partial(word)  # [glue]
    return answer


# [glue]
async def _lookup_order(args: Mapping[str, Any]) -> dict[str, str]:
    return await domain.find_order(str(args["order_id"]))


async def _search_help(args: Mapping[str, Any]) -> list[str]:
    return await domain.search_help(str(args["query"]))


def build_supervisor() -> Supervisor:
    """The backend's supervisor: its agents by name and the tools they may call."""
    agents = AgentRegistry()
    agents.register("support", support)
    agents.register("smalltalk", smalltalk)
    tools = ToolDispatcher()
    tools.register("lookup_order", _lookup_order)
    tools.register("search_help", _search_help)
    return Supervisor(agents, tools)
# [/glue]
