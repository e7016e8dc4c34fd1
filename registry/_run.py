"""One run as the registry tracks it (the migration plan's ``AgentExecutionContext``)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any, final

import anyio
import attrs

from registry._lifecycle import RunLifecycle, RunState
from registry._stream import RunStream
from registry._util import Lock, new_lock
from registry._vocabulary import RunStatus

__all__ = ["AgentExecutionContext", "Run"]


@final
@attrs.define(eq=False, kw_only=True)
class Run:
    """One run: who asked for what, its event log and where it is in its life.

    The registry creates its runs. Read their public attributes freely; change a run only
    through the registry (emitting events, completing, cancelling). The private fields are
    the registry's: a run that has ended keeps none of them but what a late resume needs.
    Legacy glue code may build one by hand (``AgentExecutionContext(run_id=..., user_id=...,
    agent=...)``) for a ``WebSocketNotifier(websocket_manager)``, the path the migration
    plan replaces: such a run is not registered and has none of the registry's guarantees.

    Attributes:
        run_id: Unguessable id (128 random bits, hex).
        user_id: The user who started the run; only their connections see its events.
        request_id: The client's idempotency key; (user_id, request_id) names one run.
        thread_id: The conversation thread; every event carries it.
        agent: The agent's name.
        message: The user's message.
        options: The client's options for the agent (``start_agent.context`` on the wire).
        created_at: Registry clock (monotonic seconds) when it was created.
        stream: The sans-IO event log (numbering, retention, replay).
        lifecycle: The sans-IO lifecycle (state and final status).
        final_payload: The ``agent_completed`` payload, once the end is decided.
    """

    run_id: str
    user_id: str
    agent: str
    request_id: str = attrs.field(
        default=attrs.Factory(lambda self: self.run_id, takes_self=True))
    thread_id: str = attrs.field(factory=lambda: "thread_" + secrets.token_hex(8))
    message: str = ""
    options: Mapping[str, Any] = attrs.field(factory=dict)
    created_at: float = 0.0
    stream: RunStream = attrs.field(default=attrs.Factory(
        lambda self: RunStream(self.run_id, self.thread_id, self.agent, 100_000),
        takes_self=True))
    lifecycle: RunLifecycle = attrs.field(factory=RunLifecycle)
    final_payload: Mapping[str, Any] | None = None
    ended_at: float | None = None
    _done: anyio.Event = attrs.field(factory=anyio.Event, alias="done")
    #: The run's cancel scope and delivery lock while it is active (None once ended).
    _scope: anyio.CancelScope | None = attrs.field(default=None, alias="scope")
    _lock: Lock | None = attrs.field(factory=new_lock, alias="lock")
    #: True when the run's scope is a caller's block (``open_execution_context``).
    _in_block: bool = attrs.field(default=False, alias="in_block")
    #: True for a mirror of a run another node runs (its scope is the mirror's tail).
    _mirror: bool = attrs.field(default=False, alias="mirror")
    _detach_generation: int = attrs.field(default=0, alias="detach_generation")
    _emits_since_yield: int = attrs.field(default=0, alias="emits_since_yield")

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

    @property
    def done(self) -> anyio.Event:
        """Set once the run has ended and been unregistered."""
        return self._done

    @property
    def agent_type(self) -> str:
        """The agent's name, as the migration plan calls it."""
        return self.agent

    @property
    def context(self) -> Mapping[str, Any]:
        """The client's options, as the migration plan calls them."""
        return self.options

    async def wait_done(self) -> Mapping[str, Any]:
        """Blocks until the run has ended and been unregistered; returns the terminal payload."""
        await self._done.wait()
        assert self.final_payload is not None
        return self.final_payload


#: The migration plan's name for a run.
AgentExecutionContext = Run
