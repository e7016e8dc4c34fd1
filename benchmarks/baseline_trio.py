"""A bare trio-websocket server speaking the benchmark subset of PROTOCOL.md, with no registry.

It is the baseline the registry's overhead is measured against: the same ``scripted`` agent,
the same JSON envelope, sent straight from the run task to the socket with
``WebSocketConnection.send_message``. It keeps what a fair comparison needs and nothing more:
optional JWT auth (on when ``REGISTRY_AUTH_SECRET`` is set), ``start_agent`` (``scripted``,
``research``, ``echo``), an in-memory log per run so ``resume`` can replay, ``ack`` (ignored),
``cancel`` and ``ping``. No limits, no queues, no keepalive, no timeouts.

Run: ``python -m benchmarks.baseline_trio [--host 127.0.0.1] [--port 0]``; the first stdout line
is ``listening on ws://HOST:PORT/ws``; SIGINT/SIGTERM exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from benchmarks.agents import InvalidField, Step, envelope, steps_for


@final
@attrs.define(eq=False)
class Run:
    """One run: its log of serialized events and the sockets subscribed to it."""

    run_id: str
    thread_id: str
    user: str
    log: list[str] = attrs.field(factory=list)
    cursors: dict[WebSocketConnection, int] = attrs.field(factory=dict)
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
    runs: dict[str, Run] = attrs.field(factory=dict)
    requests: dict[tuple[str, str], str] = attrs.field(factory=dict)

    async def handle(self, request: WebSocketRequest) -> None:
        """Serve one connection: check path and auth, then answer frames until it closes."""
        if serverkit.path_of(request.path) != "/ws":
            await request.reject(404)
            return
        user = serverkit.user_for(serverkit.token_from(request.path, request.headers), self.secret)
        if user is None:
            await request.reject(401)
            return
        ws = await request.accept()
        try:
            while True:
                await self.on_frame(ws, user, await ws.get_message())
        except ConnectionClosed:
            pass
        finally:
            for run in self.runs.values():
                run.cursors.pop(ws, None)

    async def on_frame(self, ws: WebSocketConnection, user: str, text: str | bytes) -> None:
        """Answer one client frame."""
        frame = serverkit.parse_frame(text)
        kind = frame["type"]
        if kind == "error":
            await send(ws, frame)
        elif kind == "start_agent":
            await self.start(ws, user, frame)
        elif kind == "resume":
            await self.resume(ws, user, frame)
        elif kind == "ping":
            await send(ws, {"type": "pong", "id": frame.get("id")})
        elif kind == "cancel" and (run := self._owned(user, frame.get("run_id"))):
            run.cancel_scope.cancel()

    async def start(self, ws: WebSocketConnection, user: str, frame: dict[str, Any]) -> None:
        """Start a run (or answer a duplicate) and subscribe ``ws`` to it."""
        request_id = frame.get("request_id")
        known = self.requests.get((user, str(request_id)))
        if serverkit.start_error(frame) is None and known in self.runs:
            await send(ws, accepted(request_id, self.runs[known], duplicate=True))
            return
        steps = plan(frame)
        if isinstance(steps, dict):
            await send(ws, steps)
            return
        run = self._new_run(user, str(request_id), frame.get("thread_id"))
        run.cursors[ws] = 1
        await send(ws, accepted(request_id, run, duplicate=False))
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
                await self.emit(run, step.type, step.payload)
        if len(run.log) < len(steps):
            await self.end_cancelled(run)
        await trio.sleep(self.retention_s)
        del self.runs[run.run_id]

    async def end_cancelled(self, run: Run) -> None:
        """End a cancelled run: complete its open tool, then ``agent_completed`` cancelled."""
        last = json.loads(run.log[-1]) if run.log else {}
        if last.get("type") == "tool_executing":
            call = {k: last["payload"][k] for k in ("tool", "call_id")}
            await self.emit(run, "tool_completed", {**call, "status": "cancelled", "error": "x"})
        await self.emit(run, "agent_completed", {"status": "cancelled", "error": "cancelled"})

    async def emit(self, run: Run, etype: str, payload: dict[str, Any]) -> None:
        """Append one event to the run's log and send it to every socket at that seq."""
        seq = len(run.log) + 1
        text = json.dumps(envelope(etype, run.run_id, run.thread_id, seq, time.time(), payload))
        run.log.append(text)
        self.emitted += 1
        copies = 1 if not self.fault_every or self.emitted % self.fault_every else self.fault
        for ws, cursor in list(run.cursors.items()):
            if cursor == seq:
                run.cursors[ws] = seq + 1
                for _ in range(copies):
                    await send_text(run, ws, text)

    async def resume(self, ws: WebSocketConnection, user: str, frame: dict[str, Any]) -> None:
        """Subscribe ``ws`` to a run and replay its log after ``after_seq``."""
        problem = serverkit.seq_field_error(frame, "after_seq")
        run = None if problem else self._owned(user, frame["run_id"])
        if problem is None and run is None:
            problem = serverkit.error("not_found", "no such run", run_id=frame["run_id"])
        elif run is not None and frame["after_seq"] > len(run.log):
            problem = serverkit.error(
                "invalid_field", "beyond", field="after_seq", run_id=run.run_id
            )
        if problem is not None or run is None:
            await send(ws, problem or {})
            return
        run.cursors[ws] = frame["after_seq"] + 1
        await self.replay(run, ws)

    async def replay(self, run: Run, ws: WebSocketConnection) -> None:
        """Send logged events to ``ws`` until it has caught up with the live stream."""
        while ws in run.cursors and run.cursors[ws] <= len(run.log):
            seq = run.cursors[ws]
            run.cursors[ws] = seq + 1
            await send_text(run, ws, run.log[seq - 1])

    def _owned(self, user: str, run_id: object) -> Run | None:
        """Return the run ``run_id`` when it belongs to ``user``."""
        run = self.runs.get(run_id) if isinstance(run_id, str) else None
        return run if run is not None and run.user == user else None


def plan(frame: dict[str, Any]) -> list[Step] | dict[str, Any]:
    """Return the steps a valid ``start_agent`` asks for, else the error frame to answer."""
    problem = serverkit.start_error(frame)
    if problem is not None:
        return problem
    request_id = frame["request_id"]
    try:
        steps = steps_for(frame["agent"], frame["message"], frame.get("context", {}))
    except InvalidField as exc:
        return serverkit.error("invalid_field", str(exc), field=exc.field, request_id=request_id)
    if steps is None:
        return serverkit.error("unknown_agent", "no such agent", request_id=request_id)
    return steps


def accepted(request_id: object, run: Run, *, duplicate: bool) -> dict[str, Any]:
    """Build the ``run_accepted`` answer."""
    return {
        "type": "run_accepted",
        "request_id": request_id,
        "run_id": run.run_id,
        "thread_id": run.thread_id,
        "duplicate": duplicate,
    }


async def send(ws: WebSocketConnection, frame: dict[str, Any]) -> None:
    """Send one frame, ignoring a socket that already closed."""
    with contextlib.suppress(ConnectionClosed):
        await ws.send_message(json.dumps(frame))


async def send_text(run: Run, ws: WebSocketConnection, text: str) -> None:
    """Send one serialized event; a closed socket is unsubscribed."""
    try:
        await ws.send_message(text)
    except ConnectionClosed:
        run.cursors.pop(ws, None)


async def serve(host: str, port: int, state_args: dict[str, Any]) -> None:
    """Serve until SIGINT or SIGTERM, printing the listening line once accepting."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            state = Baseline(nursery, **state_args)
            server = await nursery.start(serve_websocket, state.handle, host, port, None)
            print(serverkit.listening_line(host, server.port), flush=True)
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
