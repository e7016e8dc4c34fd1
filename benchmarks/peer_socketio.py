"""Peer: the chat workload on python-socketio (ASGI, served by uvicorn), as a user would build it.

The idiomatic Socket.IO design: the client emits ``start_agent`` and gets ``run_accepted`` as the
Socket.IO *ack*; the run is an asyncio task that emits each event (the PROTOCOL.md envelope) as
Socket.IO event ``event`` to a room named after the run, which the starting socket joined. There
is no event log: ``resume`` joins the room again (``after_seq`` is ignored), so events emitted
while the client was away are lost. ``ack`` is accepted and ignored. JWT optional (on when
``REGISTRY_AUTH_SECRET`` is set), from ``?token=`` on the Engine.IO URL.

Run: ``python -m benchmarks.peer_socketio [--host 127.0.0.1] [--port 0]``; the first stdout line
is ``listening on ws://HOST:PORT/ws`` (clients connect to ``/socket.io/`` on that host:port);
SIGINT/SIGTERM exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import socket
import sys
import time
import urllib.parse
from typing import Any, final

import attrs
import socketio
import uvicorn

from benchmarks import serverkit
from benchmarks.agents import Step, envelope


@final
@attrs.define(eq=False)
class SioRun:
    """A run: its owner and thread."""

    run_id: str
    thread_id: str
    user: str


@final
@attrs.define(eq=False)
class SioPeer:
    """The Socket.IO server, its runs, and the users of its sessions."""

    secret: str | None
    sio: socketio.AsyncServer = attrs.field(
        factory=lambda: socketio.AsyncServer(async_mode="asgi", cors_allowed_origins=[])
    )
    runs: dict[str, SioRun] = attrs.field(factory=dict)
    requests: dict[tuple[str, str], str] = attrs.field(factory=dict)
    users: dict[str, str] = attrs.field(factory=dict)
    tasks: set[asyncio.Task[None]] = attrs.field(factory=set)

    def register(self) -> None:
        """Attach the event handlers to the Socket.IO server."""
        self.sio.on("connect", self.connect)
        self.sio.on("disconnect", self.disconnect)
        self.sio.on("start_agent", self.start_agent)
        self.sio.on("resume", self.resume)
        self.sio.on("ack", self.ack)

    async def connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> bool:
        """Accept a session with a valid ``?token=`` (or any, when auth is off)."""
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        token = (query.get("token") or [None])[0]
        user = serverkit.user_for(token, self.secret)
        if user is None:
            return False
        self.users[sid] = user
        return True

    async def disconnect(self, sid: str, reason: Any = None) -> None:
        """Forget a session's user (Socket.IO leaves its rooms by itself)."""
        self.users.pop(sid, None)

    async def start_agent(self, sid: str, frame: dict[str, Any]) -> dict[str, Any]:
        """Start a run, join its room; the return value is the Socket.IO ack."""
        if not isinstance(frame, dict):
            return serverkit.error("bad_json", "x")
        user = self.users.get(sid, "")
        request_id = str(frame.get("request_id"))
        known = self.runs.get(self.requests.get((user, request_id), ""))
        steps = serverkit.plan(frame)
        if isinstance(steps, dict):
            return steps
        if known is not None:
            return serverkit.accepted(request_id, known, True)
        run = SioRun(secrets.token_hex(16), frame.get("thread_id") or secrets.token_hex(8), user)
        self.runs[run.run_id] = run
        self.requests[(user, request_id)] = run.run_id
        await self.sio.enter_room(sid, run.run_id)
        task = asyncio.create_task(self.drive(run, steps))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return serverkit.accepted(request_id, run, False)

    async def resume(self, sid: str, frame: dict[str, Any]) -> None:
        """Join the run's room again: live events only, nothing replayed."""
        run = self.runs.get(str(frame.get("run_id"))) if isinstance(frame, dict) else None
        if run is not None and run.user == self.users.get(sid):
            await self.sio.enter_room(sid, run.run_id)

    async def ack(self, sid: str, frame: Any) -> None:
        """Accept and ignore a cumulative ack."""

    async def drive(self, run: SioRun, steps: list[Step]) -> None:
        """Walk the agent's steps, emitting each event to the run's room."""
        await asyncio.sleep(0)  # let the ack (run_accepted) go out first
        for seq, step in enumerate(steps, start=1):
            if step.delay_s:
                await asyncio.sleep(step.delay_s)
            event = envelope(step.type, run.run_id, run.thread_id, seq, time.time(), step.payload)
            await self.sio.emit("event", event, room=run.run_id)





def bound_socket(host: str, port: int) -> socket.socket:
    """Return a listening TCP socket on ``host:port`` (0 picks a free port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit TCP_NODELAY. Without it, serving this pre-bound socket showed
    # ~40 ms stalls (Nagle + delayed ACK) at the start of every run: not the peer's fault.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(4096)
    return sock


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: serve with uvicorn until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    peer = SioPeer(os.environ.get("REGISTRY_AUTH_SECRET") or None)
    peer.register()
    sock = bound_socket(args.host, args.port)
    line = serverkit.listening_line(args.host, sock.getsockname()[1])
    app = socketio.ASGIApp(peer.sio, on_startup=lambda: print(line, flush=True))
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    # uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown: that is a clean exit here.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
