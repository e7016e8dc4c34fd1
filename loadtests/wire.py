"""Pure helpers for the wire protocol of PROTOCOL.md: tokens, client frames, expected scripts.

Nothing here does I/O, reads a clock it was not given, or imports locust, gevent or trio.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any, Final

import jwt

EVENT_TYPES: Final = frozenset(
    {
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
        "partial_result",
        "agent_completed",
    }
)
"""The run event types of the protocol (frames carrying run_id/thread_id/seq/ts/payload)."""

_LISTENING = re.compile(r"^listening on (ws://[^\s/]+:\d+/ws)\s*$")


def mint_token(secret: str, user_id: str, ttl_s: float = 3600.0, now: float | None = None) -> str:
    """Return an HS256 JWT with ``sub`` = ``user_id`` and ``exp`` = now + ``ttl_s``.

    Args:
        secret: The server's ``auth_secret``.
        user_id: The user id, a non-empty string.
        ttl_s: Lifetime of the token in seconds.
        now: Unix time to count from; defaults to the wall clock.
    """
    issued = time.time() if now is None else now
    claims = {"sub": user_id, "exp": int(issued + ttl_s), "iat": int(issued)}
    return jwt.encode(claims, secret, algorithm="HS256")


def url_with_token(base_url: str, token: str) -> str:
    """Return ``base_url`` with ``?token=<token>`` appended (keeping any existing query)."""
    sep = "&" if "?" in base_url else "?"
    return f"{base_url}{sep}token={urllib.parse.quote(token, safe='')}"


def parse_listening(line: str) -> str | None:
    """Return the ws URL from a server's ``listening on ws://HOST:PORT/ws`` line, else None."""
    match = _LISTENING.match(line.strip())
    return match.group(1) if match else None


def start_agent(
    request_id: str, agent: str, message: str, context: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Build a ``start_agent`` frame."""
    frame: dict[str, Any] = {
        "type": "start_agent",
        "request_id": request_id,
        "agent": agent,
        "message": message,
    }
    if context is not None:
        frame["context"] = dict(context)
    return frame


def resume(run_id: str, after_seq: int) -> dict[str, Any]:
    """Build a ``resume`` frame asking for every event with seq > ``after_seq``."""
    return {"type": "resume", "run_id": run_id, "after_seq": after_seq}


def ack(run_id: str, seq: int) -> dict[str, Any]:
    """Build a cumulative ``ack`` frame: the client holds every event <= ``seq``."""
    return {"type": "ack", "run_id": run_id, "seq": seq}


def scripted_context(
    tools: int = 1, tokens: int = 3, delay_ms: int = 10, fail_at_tool: int | None = None
) -> dict[str, Any]:
    """Build the ``context`` of the ``scripted`` demo agent."""
    context: dict[str, Any] = {"tools": tools, "tokens": tokens, "delay_ms": delay_ms}
    if fail_at_tool is not None:
        context["fail_at_tool"] = fail_at_tool
    return context


def scripted_types(context: Mapping[str, Any]) -> tuple[str, ...]:
    """Return the exact event types, in seq order, that ``scripted`` emits for ``context``.

    A run without ``fail_at_tool`` has 3 + 2T + K events; with ``fail_at_tool`` = F it stops
    after tool F's ``tool_completed`` (status ``error``) and ends ``failed``: 3 + 2F events.
    """
    tools = int(context.get("tools", 1))
    tokens = int(context.get("tokens", 3))
    fail_at = context.get("fail_at_tool")
    head = ("agent_started", "agent_thinking")
    if fail_at is not None:
        return (*head, *("tool_executing", "tool_completed") * int(fail_at), "agent_completed")
    pairs = ("tool_executing", "tool_completed") * tools
    return (*head, *pairs, *("partial_result",) * tokens, "agent_completed")


def is_event(frame: Mapping[str, Any]) -> bool:
    """Return True when ``frame`` is a run event (as opposed to a reply, error or pong)."""
    return frame.get("type") in EVENT_TYPES
