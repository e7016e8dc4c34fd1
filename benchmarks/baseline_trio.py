"""A bare trio-websocket server speaking the benchmark subset of PROTOCOL.md, with no registry.

It is the baseline the registry's overhead is measured against: the same ``scripted`` agent,
the same JSON envelope, the same fan-out shape (the run task never waits on a socket: it puts
the serialized event in each subscribed socket's unbounded outbox, which that socket's writer
task drains with ``WebSocketConnection.send_message``). It keeps what a fair comparison needs
and nothing more: optional JWT auth (on when ``REGISTRY_AUTH_SECRET`` is set), ``start_agent``
(``scripted``, ``research``, ``echo``), an in-memory log per run so ``resume`` can replay,
``ack`` (ignored), ``cancel`` and ``ping``; ``/metrics`` serves the garbage collector's pauses
(:mod:`benchmarks.gcwatch`). No limits, no backpressure, no keepalive, no
timeouts, no lifecycle.

Run: ``python -m benchmarks.baseline_trio [--host 127.0.0.1] [--port 0]``; the first stdout line
is ``listening on ws://HOST:PORT/ws``; SIGINT/SIGTERM exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import signal
import sys
import time
from typing import Any, final

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from benchmarks import serverkit
from benchmarks.agents import Step, envelope
from benchmarks.gcwatch import GcPauses


@final
@attrs.define(eq=False)
class Peer:
    """One accepted socket and the unbounded outbox its writer task drains."""

    ws: WebSocketConnection
    user: str
    outbox: trio.MemorySendChannel[str]

    def push(self, text: str) -> None:
        """Queue one serialized frame (never blocks; a closed socket drops it)."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            self.outbox.send_nowait(text)

    def reply(self, frame: dict[str, Any]) -> None:
        """Queue one frame."""
        self.push(json.dumps(frame))


async def write_all(
    ws: WebSocketConnection, inbox: trio.MemoryReceiveChannel[str], done: trio.CancelScope
) -> None:
    """Send every queued frame, in order, until the socket closes; then cancel ``done``."""
    with contextlib.suppress(ConnectionClosed):
        async with inbox:
            async for text in inbox:
                await ws.send_message(text)
    done.cancel()


@final
@attrs.define(eq=False)
class Run:
    """One run: its log of serialized events and the next seq of each subscribed socket."""

    run_id: str
    thread_id: str
    user: str
    log: list[str] = attrs.field(factory=list)
    cursors: dict[Peer, int] = attrs.field(factory=dict)
    cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)


@final
@attrs.define(eq=False)
class Baseline:
    """The server state: runs by id and by (user, request_id)."""

    nursery: trio.Nursery
    secret: str | None
    retention_s: float
    fault_every: int = 0
    fault: int = 1
    emitted: int = 0
    gc: GcPauses = attrs.field(factory=GcPauses)
    runs: dict[str, Run] = attrs.field(factory=dict)
    requests: dict[tuple[str, str], str] = attrs.field(factory=dict)

    async def handle(self, request: WebSocketRequest) -> None:
        """Serve one connection: check path and auth, then read and write until it closes.

        ``/metrics`` (the collector's pauses) is answered as a refused handshake with status 200:
        trio-websocket only hands over WebSocket handshakes, so a scraper must send one.
        """
        if serverkit.path_of(request.path) == "/metrics":
            body = self.gc.metrics_text().encode()
            await request.reject(200, extra_headers=[(b"content-type", b"text/plain")], body=body)
            return
        if serverkit.path_of(request.path) != "/ws":
            await request.reject(404)
            return
        user = serverkit.user_for(serverkit.token_from(request.path, request.headers), self.secret)
        if user is None:
            await request.reject(401)
            return
        outbox, inbox = trio.open_memory_channel[str](math.inf)
        peer = Peer(await request.accept(), user, outbox)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_all, peer.ws, inbox, nursery.cancel_scope)
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        self.on_frame(peer, await peer.ws.get_message())
                nursery.cancel_scope.cancel()
        finally:
            outbox.close()
            for run in self.runs.values():
                run.cursors.pop(peer, None)

    def on_frame(self, peer: Peer, text: str | bytes) -> None:
        """Answer one client frame."""
        frame = serverkit.parse_frame(text)
        kind = frame["type"]
        if kind == "error":
            peer.reply(frame)
        elif kind == "start_agent":
            self.start(peer, frame)
        elif kind == "resume":
            self.resume(peer, frame)
        elif kind == "ping":
            peer.reply({"type": "pong", "id": frame.get("id")})
        elif kind == "cancel" and (run := self._owned(peer.user, frame.get("run_id"))):
            run.cancel_scope.cancel()

    def start(self, peer: Peer, frame: dict[str, Any]) -> None:
        """Start a run (or answer a duplicate) and subscribe ``peer`` to it."""
        request_id = frame.get("request_id")
        known = self.requests.get((peer.user, str(request_id)))
        if serverkit.start_error(frame) is None and known in self.runs:
            peer.reply(serverkit.accepted(request_id, self.runs[known], duplicate=True))
            return
        steps = serverkit.plan(frame)
        if isinstance(steps, dict):
            peer.reply(steps)
            return
        run = self._new_run(peer.user, str(request_id), frame.get("thread_id"))
        run.cursors[peer] = 1
        peer.reply(serverkit.accepted(request_id, run, duplicate=False))
        self.nursery.start_soon(self.drive, run, steps)

    def _new_run(self, user: str, request_id: str, thread_id: str | None) -> Run:
        """Create and index a run."""
        run = Run(secrets.token_hex(16), thread_id or secrets.token_hex(8), user)
        self.runs[run.run_id] = run
        self.requests[(user, request_id)] = run.run_id
        return run

    async def drive(self, run: Run, steps: list[Step]) -> None:
        """Walk the agent's steps, emitting each event, then retain the log a while."""
        with run.cancel_scope:
            for step in steps:
                if step.delay_s:
                    await trio.sleep(step.delay_s)
                self.emit(run, step.type, step.payload)
        if len(run.log) < len(steps):
            self.end_cancelled(run)
        await trio.sleep(self.retention_s)
        del self.runs[run.run_id]

    def end_cancelled(self, run: Run) -> None:
        """End a cancelled run: complete its open tool, then ``agent_completed`` cancelled."""
        last = json.loads(run.log[-1]) if run.log else {}
        if last.get("type") == "tool_executing":
            call = {k: last["payload"][k] for k in ("tool", "call_id")}
            self.emit(run, "tool_completed", {**call, "status": "cancelled", "error": "x"})
        self.emit(run, "agent_completed", {"status": "cancelled", "error": "cancelled"})

    def emit(self, run: Run, etype: str, payload: dict[str, Any]) -> None:
        """Append one event to the run's log and queue it for every socket at that seq."""
        seq = len(run.log) + 1
        text = json.dumps(envelope(etype, run.run_id, run.thread_id, seq, time.time(), payload))
        run.log.append(text)
        self.emitted += 1
        copies = 1 if not self.fault_every or self.emitted % self.fault_every else self.fault
        for peer, cursor in run.cursors.items():
            if cursor == seq:
                run.cursors[peer] = seq + 1
                for _ in range(copies):
                    peer.push(text)

    def resume(self, peer: Peer, frame: dict[str, Any]) -> None:
        """Subscribe ``peer`` to a run and queue its log after ``after_seq``."""
        problem = serverkit.seq_field_error(frame, "after_seq")
        run = None if problem else self._owned(peer.user, frame["run_id"])
        if problem is None and run is None:
            problem = serverkit.error("not_found", "no such run", run_id=frame["run_id"])
        elif run is not None and frame["after_seq"] > len(run.log):
            problem = serverkit.error(
                "invalid_field", "beyond", field="after_seq", run_id=run.run_id
            )
        if problem is not None or run is None:
            peer.reply(problem or {})
            return
        for text in run.log[frame["after_seq"] :]:
            peer.push(text)
        run.cursors[peer] = len(run.log) + 1

    def _owned(self, user: str, run_id: object) -> Run | None:
        """Return the run ``run_id`` when it belongs to ``user``."""
        run = self.runs.get(run_id) if isinstance(run_id, str) else None
        return run if run is not None and run.user == user else None


async def serve(host: str, port: int, state_args: dict[str, Any]) -> None:
    """Serve until SIGINT or SIGTERM, printing the listening line once accepting."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            state = Baseline(nursery, **state_args)
            server = await nursery.start(serve_websocket, state.handle, host, port, None)
            print(serverkit.listening_line(host, server.port), flush=True)
            with state.gc:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--retention-s", type=float, default=float(os.environ.get("REGISTRY_RETENTION_S", "10"))
    )
    parser.add_argument(
        "--fault",
        choices=("none", "lost", "duplicate"),
        default="none",
        help="for testing the checkers only: lose or duplicate one event in --fault-every",
    )
    parser.add_argument("--fault-every", type=int, default=200)
    args = parser.parse_args(argv)
    state_args = {
        "secret": os.environ.get("REGISTRY_AUTH_SECRET") or None,
        "retention_s": args.retention_s,
        "fault_every": 0 if args.fault == "none" else args.fault_every,
        "fault": {"none": 1, "lost": 0, "duplicate": 2}[args.fault],
    }
    trio.run(serve, args.host, args.port, state_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
