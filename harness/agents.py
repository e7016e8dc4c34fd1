"""The demo agents ``python -m harness serve`` registers: echo, scripted and research.

Agents report through their :class:`registry.AgentContext` only; they never touch sockets.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Final

from registry import AgentContext, AgentRegistry, InvalidField

__all__ = ["ScriptedPlan", "demo_agents", "echo_agent", "research_agent", "scripted_agent"]

#: name -> (default, lowest, highest); ``fail_at_tool`` is checked against ``tools``.
#: ``token_bytes`` is this project's extension: pad each token's text to that many characters
#: (0: the plain ``token<i> ``), for tests and benchmarks that need large events.
_SCRIPTED_LIMITS: Final = {
    "tools": (1, 0, 1000),
    "tokens": (3, 0, 100000),
    "delay_ms": (10, 0, 60000),
    "token_bytes": (0, 0, 65536),
}


class ScriptedPlan:
    """The validated ``context`` of a ``scripted`` run."""

    __slots__ = ("delay_s", "fail_at_tool", "token_bytes", "tokens", "tools")

    def __init__(self, context: Mapping[str, Any]) -> None:
        values = {name: _bounded(context, name, *lim) for name, lim in _SCRIPTED_LIMITS.items()}
        self.tools = int(values["tools"])
        self.tokens = int(values["tokens"])
        self.delay_s = values["delay_ms"] / 1000
        self.token_bytes = int(values["token_bytes"])
        fail = context.get("fail_at_tool")
        if fail is not None and (not _is_int(fail) or not 1 <= fail <= self.tools):
            raise InvalidField("context.fail_at_tool", f"must be a whole number 1..{self.tools}")
        self.fail_at_tool: int | None = fail


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bounded(context: Mapping[str, Any], name: str, default: int, low: int, high: int) -> float:
    value = context.get(name, default)
    numeric = _is_int(value) or (name == "delay_ms" and isinstance(value, float))
    if not numeric or not low <= value <= high:
        raise InvalidField(f"context.{name}", f"must be a number {low}..{high}")
    return float(value)


def validate_scripted(context: Mapping[str, Any]) -> None:
    ScriptedPlan(context)


class ScriptedToolFailure(RuntimeError):
    """What tool ``fail_at_tool`` raises."""


async def echo_agent(ctx: AgentContext) -> Any:
    """agent_started, agent_thinking, agent_completed with ``result`` = the message."""
    await ctx.think(f"echoing {len(ctx.message)} characters")
    return ctx.message


async def scripted_agent(ctx: AgentContext) -> Any:
    """Exactly 3 + 2T + K events, sleeping D ms before each event after the first."""
    plan = ScriptedPlan(ctx.options)
    await _pause(ctx, plan.delay_s)
    await ctx.think(f"running {plan.tools} tools and {plan.tokens} tokens")
    for index in range(1, plan.tools + 1):
        await _pause(ctx, plan.delay_s)
        try:
            await ctx.tool(f"tool_{index}", {"index": index}, _scripted_tool(ctx, plan, index))
        except ScriptedToolFailure:
            await _pause(ctx, plan.delay_s)  # D ms before agent_completed too
            raise
    for index in range(plan.tokens):
        await _pause(ctx, plan.delay_s)
        await ctx.partial(_token(index, plan.token_bytes))
    await _pause(ctx, plan.delay_s)
    return {"tools": plan.tools, "tokens": plan.tokens}


def _token(index: int, size: int) -> str:
    text = f"token{index} "
    return text.ljust(size, ".") if size else text


def _scripted_tool(ctx: AgentContext, plan: ScriptedPlan, index: int) -> Any:
    async def tool(args: Mapping[str, Any]) -> Any:
        await _pause(ctx, plan.delay_s)
        if index == plan.fail_at_tool:
            raise ScriptedToolFailure(f"tool {index} failed as scripted")
        return {"index": index, "ok": True}

    return tool


async def _pause(ctx: AgentContext, seconds: float) -> None:
    if seconds > 0:
        await ctx.sleep(seconds)


_RESEARCH_TOOLS: Final = (
    ("web_search", 0.05, 0.25),
    ("fetch_page", 0.08, 0.4),
    ("read_docs", 0.03, 0.15),
    ("calculator", 0.005, 0.03),
    ("summarize", 0.05, 0.2),
)


async def research_agent(ctx: AgentContext) -> Any:
    """A realistic chat agent: thinks, calls 2-4 tools of varied latency, streams an answer."""
    rng = random.Random(ctx.run_id)
    await ctx.think(f"Planning how to answer: {ctx.message[:80]!r}")
    sources = []
    for tool, low, high in rng.sample(_RESEARCH_TOOLS, rng.randint(2, 4)):
        await ctx.think(f"I should use {tool}")
        latency = rng.uniform(low, high)
        sources.append(await ctx.tool(tool, {"query": ctx.message[:200]},
                                      _research_tool(ctx, latency)))
    words = _answer_words(ctx.message, rng)
    for word in words:
        await ctx.sleep(rng.uniform(0.005, 0.02))
        await ctx.partial(word + " ")
    return {"answer": " ".join(words), "sources": sources}


def _research_tool(ctx: AgentContext, latency: float) -> Any:
    async def tool(args: Mapping[str, Any]) -> Any:
        await ctx.sleep(latency)
        return {"query": args["query"], "hits": 3, "latency_ms": round(latency * 1000)}

    return tool


def _answer_words(message: str, rng: random.Random) -> list[str]:
    base = ("Here is what I found about", *message.split()[:8], ": the sources agree that",
            "the answer depends on context, and the details follow.")
    words = " ".join(base).split()
    fillers = ("Moreover,", "Also,", "Finally,")
    return words + [rng.choice(fillers) for _ in range(rng.randint(5, 15))]


def demo_agents() -> AgentRegistry:
    """A fresh AgentRegistry with echo, scripted and research."""
    agents = AgentRegistry()
    agents.register("echo", echo_agent)
    agents.register("scripted", scripted_agent, validate=validate_scripted)
    agents.register("research", research_agent)
    return agents
