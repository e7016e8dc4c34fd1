"""Trio load generator for the benchmarks: many sockets, closed-loop runs, checked and timed.

Gevent Locust tops out at a few hundred sockets on two cores; this generator holds thousands.
Each run worker owns one socket and starts ``scripted`` runs back to back, checking every event
with the pure :class:`loadtests.checker.ClientChecker` and recording its delivery latency
(receive wall time - ``ts``) in HDR histograms. It speaks PROTOCOL.md (``native``: the registry,
the trio baseline and the ``websockets`` peer) or Socket.IO over a WebSocket (``socketio``).
The runner uses it for the ``drops`` and ``idle`` scenarios; the measurements of rate and
latency use the lighter :mod:`benchmarks.leangen` (a trio-websocket client costs about twice the
CPU per event and adds its own delays at high rates).

Modes (``python -m benchmarks.loadgen MODE --url ws://127.0.0.1:PORT/ws ...``):

* ``rate``: ``--rate R`` events/s offered by R x delay / 1000 concurrent runs.
* ``fanout``: ``--sockets N`` open, ``--runs C`` of them running, ``--delay-ms D``.
* ``drops``: like ``rate``, but every run drops its socket mid-run (abruptly, no close
  handshake), stays offline ``--offline-ms``, reconnects and resumes after the last seq held.
* ``idle``: hold ``--levels 1000,5000,10000`` idle sockets; after each level it prints
  ``HELD <level> <alive> <errors>`` and waits for a line on stdin; then ``DONE``.

The JWT secret comes from env ``REGISTRY_AUTH_SECRET``. Results (JSON) go to ``--out``.
Everything is bounded: run count by time, each run by ``--run-timeout-s``, targets only the URL
given (the benchmarks pass 127.0.0.1). ``RLIMIT_NOFILE`` is raised to its hard limit at start,
because 10k sockets need 10k descriptors (the default soft limit is often 1024).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, final
from urllib.parse import urlsplit

import attrs
import trio
from hdrh.histogram import HdrHistogram
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)
from wsproto.utilities import LocalProtocolError

from benchmarks import sio_frames
from benchmarks.genkit import raise_fd_limit, user_name
from loadtests import wire
from loadtests.checker import ClientChecker, Violation
from loadtests.latency import new_histogram, record_ms, summarize
from loadtests.tally import Tally


class ConnectFailed(Exception):
    """A WebSocket (or Socket.IO) handshake failed."""


@attrs.frozen
class Target:
    """Where and how to connect: URL, wire flavor and the JWT secret."""

    url: str
    flavor: str
    secret: str

    def url_for(self, user: str) -> str:
        """Return the URL for ``user`` (token in the query; Socket.IO path for that flavor)."""
        token = wire.mint_token(self.secret, user)
        if self.flavor == "socketio":
            base = self.url.rsplit("/ws", 1)[0] + "/socket.io/?EIO=4&transport=websocket"
            return wire.url_with_token(base, token)
        return wire.url_with_token(self.url, token)


@final
@attrs.define(eq=False)
class Conn:
    """One client socket speaking either flavor, with frames as protocol dicts."""

    ws: WebSocketConnection
    flavor: str
    #: The TCP stream under ``ws``, kept to drop it abruptly (:meth:`abort`).
    stream: trio.SocketStream
    _next_ack: int = 0

    async def send(self, frame: dict[str, Any]) -> None:
        """Send a client frame (Socket.IO: ``start_agent`` asks for an ack)."""
        if self.flavor == "native":
            await self.ws.send_message(json.dumps(frame))
            return
        ack_id = None
        if frame["type"] == "start_agent":
            ack_id, self._next_ack = self._next_ack, self._next_ack + 1
        await self.ws.send_message(sio_frames.encode_event(frame["type"], frame, ack_id))

    async def receive(self) -> list[dict[str, Any]]:
        """Receive the next frame(s); raises ConnectionClosed when the socket ended."""
        text = await self.ws.get_message()
        if self.flavor == "native":
            return _objects(text)
        packet = sio_frames.decode(str(text))
        if packet.kind == "ping":
            await self.ws.send_message(sio_frames.PONG)
        if packet.kind in ("event", "ack") and isinstance(packet.data, dict):
            return [packet.data]
        return []

    async def abort(self) -> None:
        """Drop the socket abruptly, without a close handshake (like a lost network)."""
        await self.stream.aclose()

    async def close(self) -> None:
        """Close politely (bounded to 2 s)."""
        with trio.move_on_after(2):
            await self.ws.aclose()


def _objects(text: str | bytes) -> list[dict[str, Any]]:
    """Return ``[frame]`` for a JSON object, else ``[]`` (not a frame of the protocol)."""
    try:
        frame = json.loads(text)
    except ValueError:
        return []
    return [frame] if isinstance(frame, dict) else []


_CONNECT_ERRORS = (HandshakeError, OSError, trio.TooSlowError, ConnectionClosed)


async def _client_connection(
    stream: trio.SocketStream,
    netloc: str,
    resource: str,
    task_status: trio.TaskStatus[WebSocketConnection] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Handshake, then hold the connection's reader task in a nursery of its own.

    trio-websocket's reader task fails with ``LocalProtocolError`` when the server's keepalive
    ping arrives while this side is closing (it tries to answer with a pong): that ends this
    connection only, not the whole generator.
    """
    try:
        async with trio.open_nursery() as own:
            ws = await wrap_client_stream(own, stream, netloc, resource, message_queue_size=64)
            task_status.started(ws)
    except* LocalProtocolError:
        pass


async def connect(nursery: trio.Nursery, target: Target, user: str) -> Conn:
    """Open a socket for ``user`` whose reader task runs in ``nursery``.

    Raises:
        ConnectFailed: on refusal, timeout or a failed Socket.IO handshake.
    """
    url = urlsplit(target.url_for(user))
    resource = f"{url.path}?{url.query}" if url.query else url.path
    try:
        with trio.fail_after(30):
            stream = await trio.open_tcp_stream(url.hostname or "127.0.0.1", url.port or 80)
            ws = await nursery.start(_client_connection, stream, url.netloc, resource)
            if target.flavor == "socketio":
                await _socketio_handshake(ws)
    except _CONNECT_ERRORS as exc:
        raise ConnectFailed(repr(exc)) from exc
    except ExceptionGroup as group:  # a handshake failure, from the connection's own nursery
        if group.split(_CONNECT_ERRORS)[1] is not None:
            raise
        raise ConnectFailed(repr(group)) from group
    return Conn(ws, target.flavor, stream)


async def _socketio_handshake(ws: WebSocketConnection) -> None:
    """Read the Engine.IO open packet, connect the default namespace, await its answer."""
    opened = sio_frames.decode(str(await ws.get_message()))
    if opened.kind != "open":
        raise ConnectFailed(f"no Engine.IO open: {opened}")
    await ws.send_message(sio_frames.CONNECT)
    answer = sio_frames.decode(str(await ws.get_message()))
    if answer.kind != "connect":
        raise ConnectFailed(f"Socket.IO connect refused: {answer}")


@final
@attrs.define(eq=False)
class Meter:
    """Latency histograms (inside the measurement window), counts and violations."""

    window: tuple[float, float] = (0.0, float("inf"))
    total: HdrHistogram = attrs.field(factory=new_histogram)
    by_type: dict[str, HdrHistogram] = attrs.field(factory=dict)
    in_window: int = 0
    tally: Tally = attrs.field(factory=Tally)
    errors: Counter[str] = attrs.field(factory=Counter)
    examples: list[str] = attrs.field(factory=list)

    def record(self, frame: dict[str, Any], received_at: float) -> None:
        """Record one run event's latency when it arrived inside the window."""
        if not self.window[0] <= received_at <= self.window[1]:
            return
        latency_ms = (received_at - float(frame["ts"])) * 1000
        record_ms(self.total, latency_ms)
        etype = str(frame["type"])
        if etype not in self.by_type:
            self.by_type[etype] = new_histogram()
        record_ms(self.by_type[etype], latency_ms)
        self.in_window += 1

    def report(self, found: Sequence[Violation]) -> None:
        """Count violations by kind and keep the first 20 as examples."""
        self.tally.add_violations(found)
        for violation in found[: max(0, 20 - len(self.examples))]:
            self.examples.append(
                f"{violation.kind.value} {violation.run_id[:12]} "
                f"seq {violation.seq}: {violation.detail}"
            )


@attrs.frozen
class RunPlan:
    """What each run of a worker asks for, and whether it drops its socket mid-run."""

    context: dict[str, Any]
    drop: bool = False
    offline_s: float = 0.1
    run_timeout_s: float = 30.0

    @property
    def script(self) -> tuple[str, ...]:
        """The exact event types the run must deliver."""
        return wire.scripted_types(self.context)


@final
@attrs.define(eq=False)
class Follow:
    """The state of the run a worker is following."""

    request_id: str
    drop_at: int | None
    run_id: str | None = None
    error: str | None = None
    received: int = 0


@final
@attrs.define(eq=False)
class Worker:
    """One closed-loop client: one socket, one user, one run at a time."""

    target: Target
    user: str
    plan: RunPlan
    meter: Meter
    nursery: trio.Nursery
    rng: random.Random = attrs.field(factory=random.Random)
    checker: ClientChecker = attrs.field(factory=ClientChecker)
    conn: Conn | None = None

    async def run_until(self, stop_at: float) -> None:
        """Start runs back to back until ``stop_at`` (wall time), then close the socket."""
        await trio.sleep(self.rng.uniform(0, self.plan.context["delay_ms"] / 1000))
        while time.time() < stop_at and self.conn is not None:
            await self.one_run()
        if self.conn is not None:
            await self.conn.close()

    async def one_run(self) -> None:
        """Start a run, follow it to its end (or timeout), then judge it."""
        assert self.conn is not None
        script = self.plan.script
        drop_at = self.rng.randint(2, max(2, len(script) - 1)) if self.plan.drop else None
        follow = Follow(uuid.uuid4().hex, drop_at)
        self.checker.start_sent(follow.request_id, script)
        frame = wire.start_agent(follow.request_id, "scripted", "bench", self.plan.context)
        await self._send(frame)
        with trio.move_on_after(self.plan.run_timeout_s):
            await self._follow(follow)
        await self._judge(follow)

    async def _follow(self, follow: Follow) -> None:
        """Receive until the run's terminal event, an error, or a lost connection."""
        while self.conn is not None:
            try:
                frames = await self.conn.receive()
            except ConnectionClosed:
                self.meter.tally.counts["unexpected_closes"] += 1
                if not await self._reconnect(follow):
                    return
                continue
            received_at = time.time()
            for frame in frames:
                self._on_frame(follow, frame, received_at)
            if self._ended(follow):
                return
            if follow.drop_at is not None and follow.received >= follow.drop_at:
                follow.drop_at = None
                self.meter.tally.counts["drops"] += 1
                await self._reconnect(follow, self.plan.offline_s)

    def _on_frame(self, follow: Follow, frame: dict[str, Any], received_at: float) -> None:
        """Time and check one frame, and track the followed run."""
        if wire.is_event(frame) and isinstance(frame.get("ts"), int | float):
            self.meter.record(frame, received_at)
        self.meter.report(self.checker.on_frame(frame))
        ftype = frame.get("type")
        if ftype == "run_accepted" and frame.get("request_id") == follow.request_id:
            follow.run_id = str(frame.get("run_id"))
        elif ftype == "error":
            self._on_error(follow, frame)
        elif wire.is_event(frame) and follow.run_id and frame.get("run_id") == follow.run_id:
            follow.received += 1

    def _on_error(self, follow: Follow, frame: dict[str, Any]) -> None:
        """An error about the followed run ends it for this client; others are counted."""
        ours = frame.get("request_id") == follow.request_id
        if ours or (follow.run_id is not None and frame.get("run_id") == follow.run_id):
            follow.error = str(frame.get("code"))
        else:
            self.meter.errors[f"error:{frame.get('code')}"] += 1

    def _ended(self, follow: Follow) -> bool:
        """Return True when the run is over for this client (terminal event or error)."""
        if follow.error is not None:
            return True
        return follow.run_id is not None and self.checker.runs[follow.run_id].terminal_seen

    async def _reconnect(self, follow: Follow, offline_s: float = 0.0) -> bool:
        """Replace the socket (after ``offline_s`` without one, as in a network blip) and
        resume the run after the last seq held; False if impossible."""
        if self.conn is not None:
            await self.conn.abort()
        await trio.sleep(offline_s)
        self.meter.report(self.checker.socket_replaced())
        self.conn = await self._connect()
        if self.conn is None or follow.run_id is None:
            return False
        after = self.checker.runs[follow.run_id].last_seq
        self.checker.resume_sent(follow.run_id, after)
        await self._send(wire.resume(follow.run_id, after))
        return True

    async def _judge(self, follow: Follow) -> None:
        """Finish the run's checks and count it; ack its last event."""
        if follow.run_id is None:
            self.meter.tally.counts["runs_failed_to_start"] += 1
            self.meter.errors[f"start:{follow.error or 'timeout'}"] += 1
            return
        self.meter.tally.counts["runs_started"] += 1
        self.meter.report(self.checker.finish_run(follow.run_id))
        checked = self.checker.runs[follow.run_id]
        self.meter.tally.add_finished_run(checked)
        if follow.error is not None:
            self.meter.errors[f"run:{follow.error}"] += 1
        await self._send(wire.ack(follow.run_id, checked.contiguous_seq))

    async def _connect(self) -> Conn | None:
        """Open a socket for this worker's user; count a failure and return None."""
        try:
            return await connect(self.nursery, self.target, self.user)
        except ConnectFailed as exc:
            self.meter.errors["connect"] += 1
            self.meter.examples.append(f"connect failed: {exc}"[:200])
            return None

    async def _send(self, frame: dict[str, Any]) -> None:
        """Send a frame; a closed socket is noticed by the next receive."""
        if self.conn is None:
            return
        with contextlib.suppress(ConnectionClosed):
            await self.conn.send(frame)


async def open_workers(
    nursery: trio.Nursery, target: Target, plan: RunPlan, meter: Meter, count: int
) -> list[Worker]:
    """Connect ``count`` workers concurrently (at most 64 handshakes at a time)."""
    prefix = uuid.uuid4().hex[:8]
    workers = [Worker(target, user_name(prefix, i), plan, meter, nursery) for i in range(count)]
    limiter = trio.CapacityLimiter(64)

    async def open_one(worker: Worker) -> None:
        async with limiter:
            worker.conn = await worker._connect()

    async with trio.open_nursery() as connecting:
        for worker in workers:
            connecting.start_soon(open_one, worker)
    return [worker for worker in workers if worker.conn is not None]


async def hold_idle(
    nursery: trio.Nursery,
    target: Target,
    count: int,
    meter: Meter,
    prefix: str,
    first_index: int = 0,
) -> list[Conn]:
    """Open ``count`` idle sockets (64 handshakes at a time) and return those that opened."""
    conns: list[Conn] = []
    limiter = trio.CapacityLimiter(64)

    async def open_one(index: int) -> None:
        async with limiter:
            try:
                conns.append(await connect(nursery, target, user_name(prefix, index)))
            except ConnectFailed as exc:
                meter.errors["connect"] += 1
                if len(meter.examples) < 20:
                    meter.examples.append(f"connect failed: {exc}"[:200])

    async with trio.open_nursery() as connecting:
        for index in range(first_index, first_index + count):
            connecting.start_soon(open_one, index)
    return conns


async def ping_all(conns: Sequence[Conn]) -> int:
    """Ping every idle native socket with the protocol ``ping``; return how many answered."""
    answered = 0
    limiter = trio.CapacityLimiter(256)

    async def ping(index: int, conn: Conn) -> None:
        nonlocal answered
        async with limiter:
            with trio.move_on_after(20):
                try:
                    await conn.send({"type": "ping", "id": index})
                    frames = await conn.receive()
                except ConnectionClosed:
                    return
                answered += any(frame.get("type") == "pong" for frame in frames)

    async with trio.open_nursery() as pinging:
        for index, conn in enumerate(conns):
            pinging.start_soon(ping, index, conn)
    return answered


async def drive_runs(
    target: Target, plan: RunPlan, args: argparse.Namespace, runs: int, idle: int
) -> dict[str, Any]:
    """Open ``idle`` idle sockets and ``runs`` run workers, run them, return the results."""
    meter = Meter()
    async with trio.open_nursery() as nursery:
        holders = await hold_idle(nursery, target, idle, meter, uuid.uuid4().hex[:8])
        workers = await open_workers(nursery, target, plan, meter, runs)
        began, cpu_before = time.time(), cpu_seconds()
        meter.window = (began + args.warmup, began + args.warmup + args.duration)
        async with trio.open_nursery() as running:
            for worker in workers:
                running.start_soon(worker.run_until, meter.window[1])
        cpu_share = (cpu_seconds() - cpu_before) / max(time.time() - began, 1e-9)
        nursery.cancel_scope.cancel()
    return results(meter, args, len(workers) + len(holders), cpu_share)


def cpu_seconds() -> float:
    """Return this process's user + system CPU time so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def results(
    meter: Meter, args: argparse.Namespace, sockets: int, cpu_share: float
) -> dict[str, Any]:
    """Return the JSON-ready results of a run mode."""
    return {
        "mode": args.mode,
        "offered_rate": offered_rate(args),
        "achieved_rate": round(meter.in_window / args.duration, 1),
        "window_s": args.duration,
        "sockets": sockets,
        "concurrent_runs": concurrency(args),
        "latency_ms": summarize(meter.total),
        "latency_by_type_ms": {k: summarize(v) for k, v in sorted(meter.by_type.items())},
        "tally": meter.tally.to_dict(),
        "errors": dict(meter.errors),
        "examples": meter.examples,
        "loadgen_cpu_percent": round(cpu_share * 100, 1),
    }


def concurrency(args: argparse.Namespace) -> int:
    """Return the number of concurrent runs a mode keeps going."""
    if args.mode in ("rate", "drops"):
        return max(1, round(float(args.rate) * int(args.delay_ms) / 1000))
    return int(args.runs)


def offered_rate(args: argparse.Namespace) -> float:
    """Return the nominal offered event rate: concurrent runs x 1000 / delay_ms."""
    return round(concurrency(args) * 1000 / max(int(args.delay_ms), 1), 1)


async def idle_levels(target: Target, levels: Sequence[int]) -> dict[str, Any]:
    """Hold idle sockets at each level; print ``HELD`` lines and wait for stdin between."""
    meter = Meter()
    held: list[Conn] = []
    report = []
    prefix = uuid.uuid4().hex[:8]
    async with trio.open_nursery() as nursery:
        for level in levels:
            began = time.time()
            more = await hold_idle(nursery, target, level - len(held), meter, prefix, len(held))
            held.extend(more)
            alive = await ping_all(held)
            took = round(time.time() - began, 2)
            report.append({"level": level, "held": len(held), "alive": alive, "connect_s": took})
            print(f"HELD {level} {alive} {meter.errors['connect']}", flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)
        nursery.cancel_scope.cancel()
    print("DONE", flush=True)
    return {
        "mode": "idle",
        "levels": report,
        "errors": dict(meter.errors),
        "examples": meter.examples,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the generator's command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__)
    add = parser.add_argument
    add("mode", choices=("rate", "fanout", "drops", "idle"))
    add("--url", required=True, help="ws://127.0.0.1:PORT/ws")
    add("--flavor", choices=("native", "socketio"), default="native")
    add("--rate", type=float, default=1000.0, help="rate/drops: offered events/s")
    add("--sockets", type=int, default=1000, help="fanout: sockets open")
    add("--runs", type=int, default=200, help="fanout: concurrent runs")
    add("--delay-ms", type=int, default=10, help="scripted delay_ms")
    add("--tools", type=int, default=2)
    add("--tokens", type=int, default=20)
    add("--duration", type=float, default=5.0, help="measurement window (s)")
    add("--warmup", type=float, default=1.0, help="seconds before the window opens")
    add("--levels", default="1000,5000,10000", help="idle: socket counts")
    add("--offline-ms", type=float, default=100.0, help="drops: time without a socket")
    add("--out", type=Path, required=True, help="JSON results file")
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen mode and return its results."""
    target = Target(args.url, args.flavor, os.environ.get("REGISTRY_AUTH_SECRET", ""))
    if args.mode == "idle":
        return await idle_levels(target, [int(x) for x in args.levels.split(",")])
    context = wire.scripted_context(args.tools, args.tokens, args.delay_ms)
    expected_s = len(wire.scripted_types(context)) * args.delay_ms / 1000
    plan = RunPlan(context, args.mode == "drops", args.offline_ms / 1000, 5 + 3 * expected_s)
    runs = concurrency(args)
    idle = max(0, args.sockets - runs) if args.mode == "fanout" else 0
    return await drive_runs(target, plan, args, runs, idle)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: run, write the JSON results, exit 0."""
    args = parse_args(argv)
    limit = raise_fd_limit()
    data = trio.run(amain, args)
    data["fd_limit"] = limit
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
