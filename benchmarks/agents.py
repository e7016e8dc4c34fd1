"""The demo agents of PROTOCOL.md as pure step lists, shared by the baseline and peer servers.

An agent here is a list of ``Step`` (sleep this long, then emit this event). Each server walks
the list with its own framework's sleep (trio or asyncio), so the three comparison servers run
exactly the same script as the registry's ``scripted`` agent. No I/O and no framework imports.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Final

import attrs

_LIMITS: Final = {"tools": (0, 1000), "tokens": (0, 100_000), "delay_ms": (0, 60_000)}
_DEFAULTS: Final = {"tools": 1, "tokens": 3, "delay_ms": 10}


@attrs.frozen
class Step:
    """Sleep ``delay_s`` seconds, then emit an event of ``type`` with ``payload``."""

    delay_s: float
    type: str
    payload: dict[str, Any]


class InvalidField(ValueError):
    """A ``start_agent`` field or context value is out of range; ``field`` names it."""

    def __init__(self, field: str) -> None:
        super().__init__(f"invalid {field}")
        self.field = field


def _whole(context: Mapping[str, Any], name: str) -> int:
    """Return ``context[name]`` (or its default) checked against its limits."""
    value = context.get(name, _DEFAULTS[name])
    low, high = _LIMITS[name]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidField(f"context.{name}")
    return value


def _fail_at(context: Mapping[str, Any], tools: int) -> int | None:
    """Return ``context["fail_at_tool"]`` checked to be 1..tools, or None."""
    value = context.get("fail_at_tool")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= tools:
        raise InvalidField("context.fail_at_tool")
    return value


def scripted_steps(context: Mapping[str, Any]) -> list[Step]:
    """Return the steps of the ``scripted`` agent for ``context``.

    Raises:
        InvalidField: naming ``context.tools``, ``context.tokens``, ``context.delay_ms`` or
            ``context.fail_at_tool``.
    """
    tools, tokens = _whole(context, "tools"), _whole(context, "tokens")
    delay = _whole(context, "delay_ms") / 1000
    fail_at = _fail_at(context, tools)
    steps = [Step(0.0, "agent_started", {"agent": "scripted"})]
    steps.append(Step(delay, "agent_thinking", {"thought": "planning"}))
    for tool in range(1, (fail_at or tools) + 1):
        call = {"tool": f"tool{tool}", "call_id": f"call-{tool}"}
        steps.append(Step(delay, "tool_executing", {**call, "args": {"n": tool}}))
        if tool == fail_at:
            steps.append(Step(delay, "tool_completed", {**call, "status": "error", "error": "x"}))
            return [*steps, Step(delay, "agent_completed", {"status": "failed", "error": "x"})]
        steps.append(Step(delay, "tool_completed", {**call, "status": "ok", "result": tool}))
    steps.extend(Step(delay, "partial_result", {"text": f"tok{i} "}) for i in range(tokens))
    steps.append(Step(delay, "agent_completed", {"status": "succeeded", "result": "done"}))
    return steps


def research_steps(message: str, rng: random.Random | None = None) -> list[Step]:
    """Return a realistic chat run: thinking, 1-3 tools of varied latency, streamed tokens."""
    rand = rng or random.Random()
    steps = [Step(0.0, "agent_started", {"agent": "research"})]
    steps.append(Step(rand.uniform(0.05, 0.2), "agent_thinking", {"thought": "searching"}))
    for tool in range(1, rand.randint(1, 3) + 1):
        call = {"tool": "web_search", "call_id": f"call-{tool}"}
        steps.append(Step(0.01, "tool_executing", {**call, "args": {"q": message[:40]}}))
        done = {**call, "status": "ok", "result": "3 hits"}
        steps.append(Step(rand.uniform(0.05, 0.5), "tool_completed", done))
    words = rand.randint(10, 40)
    for _ in range(words):
        steps.append(Step(rand.uniform(0.01, 0.05), "partial_result", {"text": "w "}))
    steps.append(Step(0.01, "agent_completed", {"status": "succeeded", "result": "answer"}))
    return steps


def echo_steps(message: str) -> list[Step]:
    """Return the steps of the ``echo`` agent."""
    return [
        Step(0.0, "agent_started", {"agent": "echo"}),
        Step(0.0, "agent_thinking", {"thought": "echoing"}),
        Step(0.0, "agent_completed", {"status": "succeeded", "result": message}),
    ]


def steps_for(agent: str, message: str, context: Mapping[str, Any]) -> list[Step] | None:
    """Return the steps for ``agent``, or None when no such agent exists.

    Raises:
        InvalidField: when the ``scripted`` context is out of range.
    """
    if agent == "scripted":
        return scripted_steps(context)
    if agent == "research":
        return research_steps(message)
    if agent == "echo":
        return echo_steps(message)
    return None


def envelope(
    etype: str, run_id: str, thread_id: str, seq: int, ts: float, payload: Mapping[str, Any]
) -> dict[str, Any]:
    """Return a run event in the envelope of PROTOCOL.md."""
    return {
        "type": etype,
        "run_id": run_id,
        "thread_id": thread_id,
        "seq": seq,
        "ts": ts,
        "payload": dict(payload),
    }
