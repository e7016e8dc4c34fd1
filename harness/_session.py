"""What one authenticated WebSocket does with its client's messages, for any transport.

A :class:`ChatSession` turns a client message into registry calls and queues its answer
(``run_accepted``, ``error``, ``pong``, ``refreshed``) on the connection's
:class:`~registry.OutboundQueue`. It never blocks and never touches a socket: the trio
server and the asyncio (FastAPI) server both drive it, so the wire behaviour is one code.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, final

from harness._auth import AuthError, verify_token
from harness._ops import Operations
from harness._protocol import (
    Ack,
    Cancel,
    ClientCommand,
    Ping,
    ProtocolError,
    Refresh,
    Resume,
    StartAgent,
    error_frame,
    parse_client_frame,
    pong_frame,
    refreshed_frame,
    run_accepted_frame,
)
from registry import (
    AgentExecutionRegistry,
    InvalidField,
    OutboundQueue,
    RegistryError,
)

__all__ = ["ChatSession"]

log = logging.getLogger("harness.session")

#: A run id longer than this cannot exist; it is not echoed back in an error.
_MAX_ECHOED_ID: Final = 128


@final
class ChatSession:
    """The protocol side of one WebSocket connection.

    Args:
        registry: Where runs live.
        ops: Counters of the operations surface (errors by code, resumes by outcome).
        queue: The connection's outbound queue (already connected to the registry).
        secret: The JWT secret, to check ``refresh`` tokens.
        token_exp: When the connection's token expires (Unix seconds).
    """

    def __init__(
        self,
        registry: AgentExecutionRegistry,
        ops: Operations,
        queue: OutboundQueue,
        secret: str,
        token_exp: float,
    ) -> None:
        self.registry = registry
        self.ops = ops
        self.queue = queue
        self.secret = secret
        self.token_exp = token_exp

    @property
    def user_id(self) -> str:
        return self.queue.user_id

    async def handle(self, text: str | None) -> None:
        """Acts on one whole client message (``None``: a binary message, which is refused).

        Answers (and errors) go to the queue; the connection stays open. On one node this
        never blocks; on a node of a service it may wait for the shared state.
        """
        try:
            if text is None:
                raise ProtocolError("bad_json", "binary frames are not accepted; send JSON text")
            command = parse_client_frame(text)
            await _HANDLERS[type(command)](self, command)
        except ProtocolError as exc:
            self._error(exc.code, exc.frame())
        except RecursionError:  # JSON nested too deeply to answer (e.g. a ping id)
            self._error("bad_json", error_frame("bad_json", "the frame is nested too deeply"))

    def _dispatch_error(self, command: ClientCommand, exc: RegistryError) -> None:
        ids: dict[str, Any] = {}
        if isinstance(command, StartAgent):
            ids["request_id"] = command.request_id
        elif isinstance(command, Resume | Ack | Cancel) and len(command.run_id) <= _MAX_ECHOED_ID:
            ids["run_id"] = command.run_id
        field = exc.field if isinstance(exc, InvalidField) else None
        self._error(exc.code, error_frame(exc.code, str(exc), field=field, **ids))

    def _error(self, code: str, frame: bytes) -> None:
        self.ops.count_error(code)
        self.queue.push_control(frame)

    # ------------------------------------------------------------ handlers
    async def _start(self, command: StartAgent) -> None:
        try:
            run, duplicate = await self.registry.on_start_agent(
                user_id=self.user_id, request_id=command.request_id, agent=command.agent,
                message=command.message, thread_id=command.thread_id,
                context=command.context, subscriber=self.queue,
            )
        except RegistryError as exc:
            self._dispatch_error(command, exc)
            return
        self.queue.push_control(run_accepted_frame(
            command.request_id, run.run_id, run.thread_id, duplicate))

    async def _resume(self, command: Resume) -> None:
        try:
            await self.registry.on_resume(command.run_id, self.user_id, command.after_seq,
                                          self.queue)
        except RegistryError as exc:
            if exc.code in ("not_found", "resume_unavailable"):
                self.ops.count_resume(exc.code)  # the contract's outcomes; others are errors
            self._dispatch_error(command, exc)
        else:
            self.ops.count_resume("ok")

    async def _ack(self, command: Ack) -> None:
        try:
            await self.registry.on_ack(command.run_id, self.user_id, command.seq)
        except RegistryError as exc:
            self._dispatch_error(command, exc)

    async def _cancel(self, command: Cancel) -> None:
        try:
            await self.registry.on_cancel(command.run_id, self.user_id)
        except RegistryError as exc:
            self._dispatch_error(command, exc)

    async def _ping(self, command: Ping) -> None:
        self.queue.push_control(pong_frame(command.id))

    async def _refresh(self, command: Refresh) -> None:
        try:
            identity = verify_token(self.secret, command.token)
        except AuthError as exc:
            log.info("refresh refused user_id=%s: %s", self.user_id, exc)
            identity = None
        if identity is None or identity.user_id != self.user_id:
            message = "token: not a valid token for this connection's user"
            self._error("invalid_field", error_frame("invalid_field", message, field="token"))
            return
        self.token_exp = identity.exp
        self.queue.push_control(refreshed_frame(identity.exp))


_HANDLERS: Final[dict[type[Any], Callable[[ChatSession, Any], Awaitable[None]]]] = {
    StartAgent: ChatSession._start,
    Resume: ChatSession._resume,
    Ack: ChatSession._ack,
    Cancel: ChatSession._cancel,
    Ping: ChatSession._ping,
    Refresh: ChatSession._refresh,
}
