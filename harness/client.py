"""The reference client of PROTOCOL.md, for Python users, on trio.

::

    async with open_chat("ws://127.0.0.1:8765/ws", token) as chat:
        async for event in chat.run("research", "hello"):
            print(event["type"], event["payload"])

The client survives dropped sockets: it reconnects, re-sends ``start_agent`` with the same
``request_id`` for runs not yet accepted, resumes accepted runs from the last seq it holds,
drops repeated events and acks as it goes, so a run yields every event exactly once, in order.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import secrets
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any, Final, final
from urllib.parse import urlencode, urlsplit, urlunsplit

import trio
import trio_websocket
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
)

from harness._wsfix import tolerate_pings_while_closing
from registry import Config
from registry._util import unwrapping_groups

__all__ = ["Chat", "ChatError", "ChatUnavailable", "chat_main", "open_chat"]

log = logging.getLogger("harness.client")

TERMINAL: Final = "agent_completed"


class ChatError(Exception):
    """The server answered a run's request with an ``error`` frame.

    Attributes:
        code: PROTOCOL.md's error code; ``field`` for ``invalid_field``.
    """

    def __init__(self, frame: Mapping[str, Any]) -> None:
        super().__init__(f"{frame.get('code')}: {frame.get('message')}")
        self.code: str = str(frame.get("code"))
        self.field: str | None = frame.get("field")
        self.frame = dict(frame)


class ChatUnavailable(Exception):
    """The server could not be reached again within the reconnect budget."""


@final
class _Run:
    """What the client holds of one run it is following."""

    __slots__ = ("last_acked", "last_seq", "request_id", "run_id", "send", "start_frame")

    def __init__(
        self, request_id: str, start_frame: str, send: trio.MemorySendChannel[Any]
    ) -> None:
        self.request_id = request_id
        self.start_frame = start_frame
        self.send = send
        self.run_id: str | None = None
        self.last_seq = 0
        self.last_acked = 0


@final
class Chat:
    """One chat session over a self-healing socket; create it with :func:`open_chat`."""

    def __init__(
        self, url: str, *, ack_every: int, reconnect_attempts: int, reconnect_delay_s: float
    ) -> None:
        self.url = url
        self.ack_every = ack_every
        self.reconnect_attempts = reconnect_attempts
        self.reconnect_delay_s = reconnect_delay_s
        self.reconnects = 0
        self._ws: WebSocketConnection | None = None
        self._by_request: dict[str, _Run] = {}
        self._by_run: dict[str, _Run] = {}
        self._dead: ChatUnavailable | None = None

    async def run(
        self,
        agent: str,
        message: str,
        *,
        request_id: str | None = None,
        thread_id: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Starts a run and yields its events (dicts of the wire envelope) through agent_completed.

        Raises:
            ChatError: the server refused the run (or its resume).
            ChatUnavailable: the connection could not be re-established.
        """
        if self._dead is not None:
            raise self._dead
        request_id = request_id or secrets.token_hex(16)
        frame: dict[str, Any] = {"type": "start_agent", "request_id": request_id,
                                 "agent": agent, "message": message}
        frame.update({k: v for k, v in (("thread_id", thread_id), ("context", context)) if v})
        send, receive = trio.open_memory_channel[Any](math.inf)
        run = _Run(request_id, json.dumps(frame), send)
        self._by_request[request_id] = run
        try:
            await self._send(run.start_frame)
            async for item in receive:
                if isinstance(item, Exception):
                    raise item
                yield item
                if item["type"] == TERMINAL:
                    return
        finally:
            self._forget(run)

    async def cancel(self, run_id: str) -> None:
        """Asks the server to cancel a run (its events still arrive, ending ``cancelled``)."""
        await self._send(json.dumps({"type": "cancel", "run_id": run_id}))

    async def drop_connection(self) -> None:
        """Closes the current socket abruptly, as a network failure would (for tests and demos)."""
        ws = self._ws
        if ws is not None:
            await ws._close_stream()

    # --------------------------------------------------------- connection
    async def _connection_loop(self, task_status: trio.TaskStatus[None]) -> None:
        """Keeps a socket open: reconnects with backoff, resyncs runs after each connect."""
        failures = 0
        started = False
        while self._dead is None:
            try:
                async with trio_websocket.open_websocket_url(self.url) as ws:
                    failures = 0
                    self._ws = ws
                    if not started:
                        started = True
                        task_status.started()
                    await self._resync(ws)
                    await self._read(ws)
            except ConnectionRejected as exc:
                self._give_up(f"handshake rejected with HTTP {exc.status_code}")
            except (OSError, HandshakeError, ConnectionClosed) as exc:
                failures += 1
                if failures > self.reconnect_attempts:
                    self._give_up(f"cannot reach the server: {exc!r}")
            self._ws = None
            if self._dead is None:
                self.reconnects += 1
                await trio.sleep(self.reconnect_delay_s * min(failures, 10))
        if not started:
            raise self._dead

    def _give_up(self, reason: str) -> None:
        self._dead = ChatUnavailable(f"{self.url.split('?')[0]}: {reason}")
        self._fail_all(self._dead)

    async def _resync(self, ws: WebSocketConnection) -> None:
        """After a (re)connect: resume accepted runs, re-send starts that were never accepted."""
        for run in list(self._by_request.values()):
            if run.run_id is None:
                await ws.send_message(run.start_frame)
            else:
                await ws.send_message(_resume(run.run_id, run.last_seq))

    async def _read(self, ws: WebSocketConnection) -> None:
        while True:
            frame = json.loads(await ws.get_message())
            kind = frame.get("type")
            if kind == "run_accepted":
                await self._accepted(frame)
            elif kind == "error":
                self._error(frame)
            elif "seq" in frame and "run_id" in frame:
                await self._event(frame)

    async def _accepted(self, frame: Mapping[str, Any]) -> None:
        run = self._by_request.get(frame["request_id"])
        if run is None:
            return
        run.run_id = frame["run_id"]
        self._by_run[run.run_id] = run
        if frame.get("duplicate"):
            # A repeated start subscribes nothing: ask for what we miss explicitly.
            await self._send(_resume(run.run_id, run.last_seq))

    async def _event(self, frame: dict[str, Any]) -> None:
        run = self._by_run.get(frame["run_id"])
        if run is None or frame["seq"] <= run.last_seq:
            return  # a repeat after a resume, or a run we no longer follow
        if frame["seq"] != run.last_seq + 1:
            log.warning("gap in run %s at seq %d: resuming", frame["run_id"], run.last_seq)
            await self._send(_resume(frame["run_id"], run.last_seq))
            return
        run.last_seq = frame["seq"]
        run.send.send_nowait(frame)
        if frame["type"] == TERMINAL or run.last_seq - run.last_acked >= self.ack_every:
            run.last_acked = run.last_seq
            await self._send(json.dumps({"type": "ack", "run_id": frame["run_id"],
                                         "seq": run.last_seq}))

    def _error(self, frame: Mapping[str, Any]) -> None:
        run = self._by_request.get(frame.get("request_id", "")) or self._by_run.get(
            frame.get("run_id", ""))
        if run is not None:
            run.send.send_nowait(ChatError(frame))
        else:
            log.warning("server error: %s", frame)

    async def _send(self, text: str) -> None:
        """Sends now if connected; otherwise the next resync sends what matters."""
        ws = self._ws
        if ws is None:
            return
        with suppress(ConnectionClosed):
            await ws.send_message(text)

    def _forget(self, run: _Run) -> None:
        self._by_request.pop(run.request_id, None)
        if run.run_id is not None:
            self._by_run.pop(run.run_id, None)

    def _fail_all(self, exc: Exception) -> None:
        for run in self._by_request.values():
            run.send.send_nowait(exc)


def _resume(run_id: str, after_seq: int) -> str:
    return json.dumps({"type": "resume", "run_id": run_id, "after_seq": after_seq})


def with_token(url: str, token: str) -> str:
    """``url`` with ``?token=`` set."""
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode({"token": token})) if q)
    return urlunsplit(parts._replace(query=query))


@asynccontextmanager
async def open_chat(
    url: str,
    token: str,
    *,
    ack_every: int = 16,
    reconnect_attempts: int = 5,
    reconnect_delay_s: float = 0.05,
) -> AsyncIterator[Chat]:
    """Connects to the server at ``url`` (``ws://HOST:PORT/ws``) as the token's user.

    Raises:
        ChatUnavailable: the first connection failed ``reconnect_attempts`` times.
    """
    tolerate_pings_while_closing()
    chat = Chat(with_token(url, token), ack_every=ack_every,
                reconnect_attempts=reconnect_attempts, reconnect_delay_s=reconnect_delay_s)
    async with unwrapping_groups(), trio.open_nursery() as nursery:
        await nursery.start(chat._connection_loop)
        try:
            yield chat
        finally:
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ CLI
def format_event(event: Mapping[str, Any]) -> str:
    """One readable line for an event."""
    payload = event.get("payload", {})
    kind = event["type"]
    if kind == "agent_started":
        detail = payload.get("agent", "")
    elif kind == "agent_thinking":
        detail = payload.get("thought", "")
    elif kind == "tool_executing":
        detail = f"{payload.get('tool')} {json.dumps(payload.get('args'))}"
    elif kind == "tool_completed":
        outcome = payload.get("result", payload.get("error"))
        detail = f"{payload.get('tool')} {payload.get('status')}: {json.dumps(outcome)[:120]}"
    elif kind == "partial_result":
        detail = repr(payload.get("text", ""))
    else:
        outcome = payload.get("result", payload.get("error"))
        detail = f"{payload.get('status')}: {json.dumps(outcome)[:200]}"
    return f"[{event['seq']:>4}] {kind:<16} {detail}"


def chat_main(args: argparse.Namespace, config: Config) -> int:
    """``python -m harness chat``: one run, its events printed live."""
    if not config.auth_secret:
        print("error: set REGISTRY_AUTH_SECRET (or --auth-secret)", file=sys.stderr)
        return 2
    from harness._auth import mint_token

    token = mint_token(config.auth_secret, args.user)
    context = json.loads(args.context) if args.context else None
    return trio.run(_chat, args.url, token, args.agent, args.message, context)


async def _chat(url: str, token: str, agent: str, message: str, context: Any) -> int:
    try:
        async with open_chat(url, token) as chat:
            async for event in chat.run(agent, message, context=context):
                print(format_event(event), flush=True)
                if event["type"] == TERMINAL:
                    return 0 if event["payload"]["status"] == "succeeded" else 1
    except (ChatError, ChatUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 1
