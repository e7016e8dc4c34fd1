"""One run as the registry tracks it: the execution context of the migration plan."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, final

import anyio
import attrs

from registry._events import RunStatus
from registry._lifecycle import RunLifecycle, RunState
from registry._stream import RunStream

__all__ = ["AgentExecutionContext"]


@final
@attrs.define(eq=False)
class AgentExecutionContext:
    """One run: who asked for what, its event stream, its lifecycle and its task scope.

    Created only by the registry. Read its attributes freely; change it only through the
    registry (``ensure_event_delivery``, ``complete_execution``, ``cancel``).

    Attributes:
        run_id: Unguessable id (128 random bits, hex).
        user_id: The user who started the run; only their connections see its events.
        request_id: The client's idempotency key; (user_id, request_id) names one run.
        thread_id: The conversation thread; every event carries it.
        agent_type: The agent's name.
        message: The user's message.
        context: The client's context object (agent-specific options).
        created_at: Registry clock (monotonic seconds) when it was created.
        stream: The sans-IO event log (numbering, retention, replay).
        lifecycle: The sans-IO lifecycle (state and final status).
    """

    run_id: str
    user_id: str
    request_id: str
    thread_id: str
    agent_type: str
    message: str
    context: Mapping[str, Any]
    created_at: float
    stream: RunStream
    scope: anyio.CancelScope
    external: bool = False
    lifecycle: RunLifecycle = attrs.field(factory=RunLifecycle)
    done: anyio.Event = attrs.field(factory=anyio.Event)
    delivery_lock: anyio.Lock = attrs.field(factory=anyio.Lock)
    final_payload: Mapping[str, Any] | None = None
    ended_at: float | None = None
    detach_generation: int = 0
    emits_since_yield: int = 0

    @property
    def is_active(self) -> bool:
        """True until the run's ending has been decided (then it is completing or completed)."""
        return self.lifecycle.active

    @property
    def state(self) -> RunState:
        return self.lifecycle.state

    @property
    def status(self) -> RunStatus | None:
        """How the run ended, once decided; None while it runs."""
        return self.lifecycle.status

    @property
    def last_seq(self) -> int:
        return self.stream.last_seq

    async def wait_done(self) -> Mapping[str, Any]:
        """Blocks until the run has ended and been unregistered; returns the terminal payload."""
        await self.done.wait()
        assert self.final_payload is not None
        return self.final_payload
