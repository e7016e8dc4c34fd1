"""Peer: the chat workload on a plain ``websockets`` (asyncio) server, as a user would build it.

Same wire subset as the trio baseline (PROTOCOL.md envelope, ``start_agent`` with the
``scripted`` agent, optional JWT), built the obvious way: a run is an asyncio task that
``await ws.send()``s each event to the sockets subscribed to it. There is no event log, so
``resume`` only re-subscribes a socket to the live stream (``after_seq`` is ignored): whatever
was emitted while the client was away is lost. ``ack`` is accepted and ignored. ``GET
/metrics`` answers the garbage collector's pauses (:mod:`benchmarks.gcwatch`).

Run: ``python -m benchmarks.peer_websockets [--host 127.0.0.1] [--port 0]``; the first stdout
line is ``listening on ws://HOST:PORT/ws``; SIGINT/SIGTERM exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import time
from http import HTTPStatus
from typing import Any, final

import attrs
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from benchmarks import serverkit
from benchmarks.agents import Step, envelope
from benchmarks.gcwatch import GcPauses


@final
@attrs.define(eq=False)
class PeerRun:
    """A run: its owner, thread and the sockets that get its events."""

    run_id: str
    thread_id: str
    user: str
    subscribers: set[ServerConnection] = attrs.field(factory=set)


@final
@attrs.define(eq=False)
class PeerServer:
    """Runs by id and by (user, request_id); tasks are kept so they are not collected."""

    secret: str | None
    gc: GcPauses = attrs.field(factory=GcPauses)
    runs: dict[str, PeerRun] = attrs.field(factory=dict)
    requests: dict[tuple[str, str], str] = attrs.field(factory=dict)
    tasks: set[asyncio.Task[None]] = attrs.field(factory=set)

    def check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Handshake hook: the collector's pauses on ``/metrics``, 404 for another path, 401
        without a valid token."""
        if serverkit.path_of(request.path) == "/metrics":
            return connection.respond(HTTPStatus.OK, self.gc.metrics_text())
        if serverkit.path_of(request.path) != "/ws":
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        headers = [(k.encode(), v.encode()) for k, v in request.headers.raw_items()]
        if serverkit.user_for(serverkit.token_from(request.path, headers), self.secret) is None:
            return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
        return None

    async def handle(self, ws: ServerConnection) -> None:
        """Answer frames until the socket closes, then unsubscribe it everywhere."""
        assert ws.request is not None
        headers = [(k.encode(), v.encode()) for k, v in ws.request.headers.raw_items()]
        user = serverkit.user_for(serverkit.token_from(ws.request.path, headers), self.secret)
        try:
            async for text in ws:
                await self.on_frame(ws, str(user), text)
        except ConnectionClosed:
            pass
        finally:
            for run in self.runs.values():
                run.subscribers.discard(ws)

    async def on_frame(self, ws: ServerConnection, user: str, text: str | bytes) -> None:
        """Answer one client frame."""
        frame = serverkit.parse_frame(text)
        kind = frame["type"]
        if kind == "error":
            await ws.send(json.dumps(frame))
        elif kind == "start_agent":
            await self.start(ws, user, frame)
        elif kind == "resume":
            run = self.runs.get(str(frame.get("run_id")))
            if run is not None and run.user == user:
                run.subscribers.add(ws)
        elif kind == "ping":
            await ws.send(json.dumps({"type": "pong", "id": frame.get("id")}))

    async def start(self, ws: ServerConnection, user: str, frame: dict[str, Any]) -> None:
        """Start a run (or answer a duplicate) with the socket subscribed."""
        request_id = str(frame.get("request_id"))
        known = self.runs.get(self.requests.get((user, request_id), ""))
        steps = serverkit.plan(frame)
        if isinstance(steps, dict) or known is not None:
            ok = not isinstance(steps, dict)
            reply = serverkit.accepted(request_id, known, True) if ok else steps
            await ws.send(json.dumps(reply))
            return
        run = PeerRun(secrets.token_hex(16), frame.get("thread_id") or secrets.token_hex(8), user)
        self.runs[run.run_id] = run
        self.requests[(user, request_id)] = run.run_id
        run.subscribers.add(ws)
        await ws.send(json.dumps(serverkit.accepted(request_id, run, False)))
        task = asyncio.create_task(drive(run, steps))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


async def drive(run: PeerRun, steps: list[Step]) -> None:
    """Walk the agent's steps, sending each event to the current subscribers."""
    for seq, step in enumerate(steps, start=1):
        if step.delay_s:
            await asyncio.sleep(step.delay_s)
        event = envelope(step.type, run.run_id, run.thread_id, seq, time.time(), step.payload)
        text = json.dumps(event)
        for ws in list(run.subscribers):
            try:
                await ws.send(text)
            except ConnectionClosed:
                run.subscribers.discard(ws)


async def serve_until_signalled(host: str, port: int, state: PeerServer) -> None:
    """Serve until SIGINT/SIGTERM, printing the listening line once accepting."""
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    server: Server
    async with serve(state.handle, host, port, process_request=state.check_request) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(serverkit.listening_line(host, bound), flush=True)
        await stop


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    state = PeerServer(os.environ.get("REGISTRY_AUTH_SECRET") or None)
    with state.gc:
        asyncio.run(serve_until_signalled(args.host, args.port, state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
