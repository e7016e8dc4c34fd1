"""Lean load generator: one asyncio protocol per socket over a sans-IO frame codec, no task per
socket, so that a thousand busy sockets cost it a small share of one core.

``python -m benchmarks.leangen --url ws://127.0.0.1:PORT/ws --sockets 1000 --delay-ms 500
--tools 2 --tokens 20 --duration 30 --warmup 5 --server-pid PID --out result.json``

Several nodes of one service: ``--url`` takes a comma-separated list and the sockets are spread
over it round robin (socket i on node i mod N), ``--server-pid`` takes the nodes' pids (their
CPU and RSS are summed) and ``--redis HOST:PORT`` reads the Redis's ``INFO`` at the window's
edges (commands, reads and CPU, per event: :mod:`benchmarks.redisinfo`).

It speaks PROTOCOL.md (``--flavor native``: the registry, FastAPI, the trio baseline and the
``websockets`` peer) or Socket.IO over a WebSocket (``socketio``: :mod:`benchmarks.sio_frames`).
Every socket is one closed-loop client (4 sockets per user): it starts a ``scripted`` run,
follows it to its ``agent_completed`` (or ``--run-timeout-s``), checks every frame with the pure
:class:`loadtests.checker.ClientChecker`, acks the run (unless ``--no-ack``) and starts the
next, until the measurement window closes; the runs still in flight then end and are checked
too. With
``--runs-per-socket N`` each socket stops after N runs instead (the retained-memory scenario).
``--idle N`` opens N more sockets that only stay open (the fan-out scenario).

Measured over the window (it opens ``--warmup`` s after every socket is open and lasts
``--duration`` s): the delivery latency of every event (receive wall time - its ``ts``) in HDR
histograms, the events received, the server's CPU ticks and RSS from /proc (``--server-pid``),
this process's own CPU and garbage-collector pauses, and the server's collector figures from
``GET /metrics``. ``--interval S`` adds a record every S seconds (the soak). Server pings are
answered; a close by the server is counted and its run judged as it stands. The JWT secret
comes from env ``REGISTRY_AUTH_SECRET``; only the URL given is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, final
from urllib.parse import urlsplit

import attrs
from hdrh.histogram import HdrHistogram

from benchmarks import genkit, redisinfo, sio_frames, ws_frames
from benchmarks.gcwatch import GcPauses
from loadtests import wire
from loadtests.checker import ClientChecker, Violation
from loadtests.latency import new_histogram, record_ms, summarize
from loadtests.tally import Tally

SATURATED_PERCENT = 85.0
"""Above this share of one core the generator itself may be what limits the measurement."""
HANDSHAKES_AT_ONCE = 64


class ConnectFailed(Exception):
    """The TCP connection or the WebSocket handshake failed."""


@attrs.frozen
class Plan:
    """Where to connect and what every client does."""

    host: str
    port: int
    path: str
    #: Every node's (host, port); sockets go round robin over them. The first is host:port.
    nodes: tuple[tuple[str, int], ...]
    secret: str
    flavor: str
    sockets: int
    idle: int
    context: dict[str, Any]
    warmup: float
    duration: float
    interval: float
    runs_per_socket: int
    run_timeout_s: float
    #: The servers' pids (one per node): their CPU and RSS are summed.
    server_pids: tuple[int, ...]
    #: (host, port) of the Redis the nodes share, read at the window's edges; None: no Redis.
    redis: tuple[str, int] | None = None
    #: Ack each run at its end (lets the server trim its retained events), as clients do.
    ack: bool = True

    @property
    def script(self) -> tuple[str, ...]:
        """The exact event types a run must deliver."""
        return wire.scripted_types(self.context)

    def node_for(self, index: int) -> tuple[str, int]:
        """Return the (host, port) socket number ``index`` connects to: round robin."""
        return self.nodes[index % len(self.nodes)]

    def resource_for(self, user: str) -> str:
        """Return the request target of ``user``'s socket (path with its token); Socket.IO
        sessions go to ``/socket.io/`` on the same host and port."""
        path = self.path
        if self.flavor == "socketio":
            path = path.rsplit("/ws", 1)[0] + "/socket.io/?EIO=4&transport=websocket"
        return wire.url_with_token(path, wire.mint_token(self.secret, user))


@final
@attrs.define(eq=False)
class Meter:
    """Latency histograms (window and current interval), counts and violations."""

    window: tuple[float, float] = (math.inf, math.inf)
    total: HdrHistogram = attrs.field(factory=new_histogram)
    #: The ``agent_completed`` events' latencies alone (a run's end can wait on more than its
    #: other events: with a shared state, until the end is written there).
    ends: HdrHistogram = attrs.field(factory=new_histogram)
    #: The current interval's latencies (only when intervals are recorded).
    interval: HdrHistogram | None = None
    in_window: int = 0
    #: Every event frame received (window or not) and their payload bytes.
    events: int = 0
    event_bytes: int = 0
    tally: Tally = attrs.field(factory=Tally)
    errors: Counter[str] = attrs.field(factory=Counter)
    examples: list[str] = attrs.field(factory=list)

    def record(self, ts: float, received_at: float, end: bool = False) -> None:
        """Record one event's latency when it arrived inside the window (``end``: an
        ``agent_completed``)."""
        if not self.window[0] <= received_at <= self.window[1]:
            return
        latency_ms = (received_at - ts) * 1000
        record_ms(self.total, latency_ms)
        if end:
            record_ms(self.ends, latency_ms)
        if self.interval is not None:
            record_ms(self.interval, latency_ms)
        self.in_window += 1

    def report(self, found: Sequence[Violation]) -> None:
        """Count violations by kind and keep the first 20 as examples."""
        if not found:
            return
        self.tally.add_violations(found)
        for violation in found[: max(0, 20 - len(self.examples))]:
            self.examples.append(
                f"{violation.kind.value} {violation.run_id[:12]} "
                f"seq {violation.seq}: {violation.detail}"
            )

    def take_interval(self) -> HdrHistogram:
        """Return the current interval's histogram and start a new one."""
        taken, self.interval = self.interval or new_histogram(), new_histogram()
        return taken


@final
@attrs.define(eq=False)
class Follow:
    """The run a client is following."""

    request_id: str
    started: float
    run_id: str | None = None
    error: str | None = None


@final
@attrs.define(eq=False)
class Session:
    """The generator's state: plan, meter, clients, and when runs stop being started."""

    plan: Plan
    loop: asyncio.AbstractEventLoop
    meter: Meter = attrs.field(factory=Meter)
    stop_at: float = math.inf
    clients: list[Client] = attrs.field(factory=list)
    busy: int = 0
    closing: bool = False
    all_done: asyncio.Event = attrs.field(factory=asyncio.Event)

    def finished(self) -> None:
        """A client will start no more runs."""
        self.busy -= 1
        if self.busy <= 0:
            self.all_done.set()


@final
class Client(asyncio.Protocol):
    """One socket: handshake, frames, and the closed loop of runs, all in transport callbacks.

    Each run gets a fresh :class:`ClientChecker` (so the generator's memory stays flat over a
    soak); the previous run's checker still judges that run's late frames, so a duplicate or
    an event after ``agent_completed`` is reported as such, not as foreign.
    """

    def __init__(
        self, session: Session, user: str, idle: bool = False,
        address: tuple[str, int] | None = None,
    ) -> None:
        self.session = session
        self.user = user
        #: The node this socket connects to.
        self.address = address or (session.plan.host, session.plan.port)
        #: An idle socket only answers pings; it never starts a run.
        self.idle = idle
        self.key = ws_frames.new_key()
        self.opened: asyncio.Future[None] = session.loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.decoder: ws_frames.FrameDecoder | None = None
        self.checker = ClientChecker()
        self.previous: ClientChecker | None = None
        self.follow: Follow | None = None
        self.runs = 0
        self.done = False
        self.socketio = session.plan.flavor == "socketio"
        self.next_ack = 0

    # ------------------------------------------------------------------ transport
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        plan = self.session.plan
        netloc = f"{self.address[0]}:{self.address[1]}"
        transport.write(ws_frames.handshake_request(netloc, plan.resource_for(self.user), self.key))

    def data_received(self, data: bytes) -> None:
        if self.decoder is None:
            data = self._handshake(data)
            if not data or self.decoder is None:
                return
        now = time.time()
        try:
            frames = self.decoder.feed(data)
        except ws_frames.FrameError as exc:
            self._count_error("frame", str(exc))
            self.abort()
            return
        for opcode, payload in frames:
            if opcode == ws_frames.OP_TEXT:
                self._on_text(payload, now)
            elif opcode == ws_frames.OP_PING:
                self._write(ws_frames.client_frame(ws_frames.OP_PONG, payload))
            elif opcode == ws_frames.OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self._closed_by_server(code)
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.opened.done():
            self.opened.set_exception(ConnectFailed(repr(exc) if exc else "closed"))
            return
        if self.idle:
            if not self.session.closing:
                self.session.meter.tally.counts["unexpected_closes"] += 1
                self._count_error("idle_closed", repr(exc))
            return
        if not self.done:
            self.session.meter.tally.counts["unexpected_closes"] += 1
            self._end()

    def _handshake(self, data: bytes) -> bytes:
        """Consume the handshake answer; return the bytes after it (frames)."""
        self.head += data
        try:
            complete, rest = ws_frames.read_handshake(self.head, self.key)
        except ws_frames.HandshakeRefused as exc:
            self.opened.set_exception(ConnectFailed(str(exc)))
            self.abort()
            return b""
        if complete:
            self.head = b""
            self.decoder = ws_frames.FrameDecoder()
            if not self.socketio:  # Socket.IO: open once its namespace is connected
                self.opened.set_result(None)
        return rest

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _send(self, frame: dict[str, Any]) -> None:
        """Send a client frame (Socket.IO: as an event named after its type; ``start_agent``
        asks for an ack, which is its ``run_accepted``)."""
        if not self.socketio:
            self._send_text(json.dumps(frame))
            return
        ack_id = None
        if frame["type"] == "start_agent":
            ack_id, self.next_ack = self.next_ack, self.next_ack + 1
        self._send_text(sio_frames.encode_event(frame["type"], frame, ack_id))

    def _send_text(self, text: str) -> None:
        self._write(ws_frames.client_frame(ws_frames.OP_TEXT, text.encode()))

    def abort(self) -> None:
        """Drop the socket at once (no close handshake)."""
        if self.transport is not None:
            self.transport.abort()

    def _closed_by_server(self, code: int) -> None:
        """Answer the server's close and end this client."""
        if not self.session.closing:
            self.session.meter.errors[f"closed:{code}"] += 1
        self._write(ws_frames.close_frame(1000))
        if self.transport is not None:
            self.transport.close()
        if not self.idle:
            self._end()

    def _count_error(self, key: str, detail: str) -> None:
        meter = self.session.meter
        meter.errors[key] += 1
        if len(meter.examples) < 20:
            meter.examples.append(f"{key}: {detail}"[:200])

    # ------------------------------------------------------------------ runs
    def start_run(self) -> None:
        """Start the next run, or close politely when this client is through."""
        if self.done or self.idle:
            return
        session, plan = self.session, self.session.plan
        limit = plan.runs_per_socket
        through = time.time() >= session.stop_at or bool(limit and self.runs >= limit)
        if self.transport is None or through:
            self._write(ws_frames.close_frame(1000))
            if self.transport is not None:
                self.transport.close()
            self._end()
            return
        follow = Follow(uuid.uuid4().hex, session.loop.time())
        self.follow = follow
        self.previous, self.checker = self.checker, ClientChecker()
        self.checker.start_sent(follow.request_id, plan.script)
        self._send(wire.start_agent(follow.request_id, "scripted", "bench", plan.context))

    def _on_text(self, payload: bytes, received_at: float) -> None:
        """Time, check and follow one text frame."""
        try:
            frame = self._socketio_frame(payload) if self.socketio else json.loads(payload)
        except ValueError:
            self._count_error("bad_json", repr(payload[:80]))
            return
        if not isinstance(frame, dict):
            return
        ftype = frame.get("type")
        run_id = frame.get("run_id")
        meter = self.session.meter
        ts = frame.get("ts")
        if ftype in wire.EVENT_TYPES and isinstance(ts, int | float):
            meter.record(ts, received_at, ftype == "agent_completed")
            meter.events += 1
            meter.event_bytes += len(payload)
        previous = self.previous
        if previous is not None and isinstance(run_id, str) and run_id in previous.runs:
            meter.report(previous.on_frame(frame))
            return
        meter.report(self.checker.on_frame(frame))
        follow = self.follow
        if follow is None:
            return
        if ftype == "run_accepted" and frame.get("request_id") == follow.request_id:
            follow.run_id = str(run_id)
        elif ftype == "error":
            self._on_error(follow, frame)
        if follow.error is not None or (ftype == "agent_completed" and run_id == follow.run_id):
            self.judge()
            self.start_run()

    def _socketio_frame(self, payload: bytes) -> Any:
        """Handle one Engine.IO packet; return the protocol frame it carries, if any."""
        packet = sio_frames.decode(payload.decode())
        if packet.kind in ("event", "ack"):
            return packet.data
        if packet.kind == "ping":
            self._send_text(sio_frames.PONG)
        elif packet.kind == "open":
            self._send_text(sio_frames.CONNECT)
        elif packet.kind == "connect" and not self.opened.done():
            self.opened.set_result(None)
        elif packet.kind == "connect_error" and not self.opened.done():
            self.opened.set_exception(ConnectFailed(f"Socket.IO refused: {packet.data}"))
            self.abort()
        return None

    def _on_error(self, follow: Follow, frame: dict[str, Any]) -> None:
        """An error about the followed run ends it for this client; others are counted."""
        ours = frame.get("request_id") == follow.request_id
        if ours or (follow.run_id is not None and frame.get("run_id") == follow.run_id):
            follow.error = str(frame.get("code"))
        else:
            self.session.meter.errors[f"error:{frame.get('code')}"] += 1

    def judge(self) -> None:
        """Finish the followed run's checks and count it; ack it."""
        follow, self.follow = self.follow, None
        if follow is None:
            return
        self.runs += 1
        tally, errors = self.session.meter.tally, self.session.meter.errors
        if follow.run_id is None:
            tally.counts["runs_failed_to_start"] += 1
            errors[f"start:{follow.error or 'timeout'}"] += 1
            return
        tally.counts["runs_started"] += 1
        self.session.meter.report(self.checker.finish_run(follow.run_id))
        checked = self.checker.runs[follow.run_id]
        tally.add_finished_run(checked)
        if follow.error is not None:
            errors[f"run:{follow.error}"] += 1
        if self.session.plan.ack:
            self._send(wire.ack(follow.run_id, checked.contiguous_seq))

    def timed_out(self, now: float) -> bool:
        """Return True when the followed run has run past ``run_timeout_s``."""
        limit = self.session.plan.run_timeout_s
        return self.follow is not None and now - self.follow.started > limit

    def _end(self) -> None:
        """No more runs on this client: judge the one in flight, tell the session."""
        if self.done:
            return
        self.judge()
        self.done = True
        self.session.finished()


async def open_clients(session: Session, count: int, idle: bool = False) -> list[Client]:
    """Open ``count`` sockets (at most 64 handshakes at a time); return those that opened."""
    plan, limiter = session.plan, asyncio.Semaphore(HANDSHAKES_AT_ONCE)
    prefix = uuid.uuid4().hex[:8]

    async def open_one(index: int) -> Client | None:
        address = plan.node_for(index)
        client = Client(session, genkit.user_name(prefix, index), idle, address)
        async with limiter:
            try:
                await asyncio.wait_for(
                    session.loop.create_connection(lambda: client, *address), 30
                )
                await asyncio.wait_for(client.opened, 30)
            except (OSError, TimeoutError, ConnectFailed) as exc:
                client.done = True
                client.abort()
                client._count_error("connect", repr(exc))
                return None
        return client

    opened = await asyncio.gather(*(open_one(index) for index in range(count)))
    return [client for client in opened if client is not None]


async def watch_timeouts(session: Session) -> None:
    """Every 0.5 s, judge the runs that passed ``run_timeout_s`` and start the next."""
    while True:
        await asyncio.sleep(0.5)
        now = session.loop.time()
        for client in session.clients:
            if client.timed_out(now):
                session.meter.errors["run_timeout"] += 1
                client.judge()
                client.start_run()


# ---------------------------------------------------------------------- measurements
async def http_get(host: str, port: int, path: str, upgrade: bool) -> tuple[int, str]:
    """GET ``path`` (as a WebSocket handshake when ``upgrade``); return status and body.

    Raises:
        OSError, TimeoutError, ValueError: no usable answer within 5 s.
    """
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    try:
        extra = (
            f"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {ws_frames.new_key().decode()}\r\n"
            if upgrade
            else "Connection: close\r\n"
        )
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode("latin-1").split("\r\n")
        fields = (line.partition(":") for line in lines[1:])
        headers = {name.strip().lower(): value.strip() for name, _, value in fields}
        if "content-length" in headers:
            body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
        else:
            body = await asyncio.wait_for(reader.read(), 5)
        return int(lines[0].split(" ", 2)[1]), body.decode("utf-8", "replace")
    finally:
        writer.close()


@final
@attrs.define(eq=False)
class MetricsReader:
    """Reads ``/metrics`` of the server; a plain GET first, a WebSocket handshake for servers
    that only answer those (trio-websocket); remembers which worked, gives up after both fail."""

    host: str
    port: int
    upgrade: bool | None = None
    broken: bool = False

    async def read(self) -> dict[str, float] | None:
        """Return the parsed samples, or None when the server has no usable ``/metrics``."""
        if self.broken:
            return None
        for upgrade in (False, True) if self.upgrade is None else (self.upgrade,):
            try:
                status, body = await http_get(self.host, self.port, "/metrics", upgrade)
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
                continue
            if status == 200:
                self.upgrade = upgrade
                return genkit.parse_prometheus(body)
        if self.upgrade is None:
            self.broken = True
        return None


async def read_redis(address: tuple[str, int] | None) -> redisinfo.Snapshot | None:
    """Return the counters of the Redis at ``address`` (None without one or when it does not
    answer within 5 s)."""
    if address is None:
        return None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), 5)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(redisinfo.INFO_REQUEST)
        data = b""
        while (text := redisinfo.parse_bulk(data)) is None:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            if not chunk:
                return None
            data += chunk
        return redisinfo.snapshot(text)
    except (OSError, TimeoutError, ValueError, KeyError):
        return None
    finally:
        writer.close()


@attrs.frozen
class Mark:
    """One reading at a window or interval boundary."""

    t: float
    events: int
    own_ticks: int
    machine_ticks: int
    server_ticks: int | None
    server_rss: int | None
    metrics: dict[str, float] | None
    redis: redisinfo.Snapshot | None = None


async def take_mark(session: Session, metrics: MetricsReader) -> Mark:
    """Read the counters, /proc, /metrics and Redis now."""
    pids = session.plan.server_pids
    try:
        ticks = sum(genkit.cpu_ticks(pid) for pid in pids) if pids else None
        rss = sum(genkit.rss_bytes(pid) for pid in pids) if pids else None
    except OSError:
        ticks = rss = None
    now, events, own = time.time(), session.meter.in_window, genkit.cpu_ticks()
    busy = genkit.machine_busy_ticks()
    redis = await read_redis(session.plan.redis)
    return Mark(now, events, own, busy, ticks, rss, await metrics.read(), redis)


def between(a: Mark, b: Mark, latency: HdrHistogram, since: float) -> dict[str, Any]:
    """Return what happened between two marks: rates, CPU, RSS, latency, collector."""
    seconds = max(b.t - a.t, 1e-9)
    events = b.events - a.events
    out: dict[str, Any] = {
        "t_s": round(b.t - since, 1),
        "seconds": round(seconds, 3),
        "events": events,
        "events_per_s": round(events / seconds, 1),
        "latency_ms": summarize(latency),
        "loadgen_cpu_percent": round(
            (b.own_ticks - a.own_ticks) / genkit.CLK_TCK / seconds * 100, 1
        ),
    }
    if a.server_ticks is not None and b.server_ticks is not None and b.server_rss is not None:
        cpu_s = (b.server_ticks - a.server_ticks) / genkit.CLK_TCK
        out["server_cpu_ticks"] = b.server_ticks - a.server_ticks
        out["server_cpu_percent"] = round(cpu_s / seconds * 100, 1)
        out["cpu_us_per_event"] = round(cpu_s / events * 1e6, 2) if events else None
        out["server_rss_mib"] = round(b.server_rss / 2**20, 1)
        others = (b.machine_ticks - a.machine_ticks) - out["server_cpu_ticks"]
        others -= b.own_ticks - a.own_ticks
        if a.redis is not None and b.redis is not None:
            others -= round((b.redis.cpu_s - a.redis.cpu_s) * genkit.CLK_TCK)
        out["other_processes_cpu_percent"] = round(others / genkit.CLK_TCK / seconds * 100, 1)
    if a.redis is not None and b.redis is not None:
        out["redis"] = redisinfo.delta(a.redis, b.redis, events, seconds)
    gc_a = genkit.gc_figures(a.metrics) if a.metrics else None
    gc_b = genkit.gc_figures(b.metrics) if b.metrics else None
    out["gc"] = genkit.gc_delta(gc_a, gc_b)
    if b.metrics and "registry_retained_runs" in b.metrics:
        out["retained_runs"] = b.metrics["registry_retained_runs"]
    return out


async def sleep_until(wall: float) -> None:
    """Sleep until wall-clock time ``wall``."""
    await asyncio.sleep(max(0.0, wall - time.time()))


async def measure(session: Session, own_gc: GcPauses) -> dict[str, Any]:
    """Read the marks at the window's edges (and every ``interval`` s inside it)."""
    plan, meter = session.plan, session.meter
    metrics = MetricsReader(plan.host, plan.port)
    start, end = meter.window
    await sleep_until(start)
    first = last = await take_mark(session, metrics)
    own_gc.longest_s, gc_count = 0.0, own_gc.count
    if plan.interval:
        meter.take_interval()
    intervals = []
    step = plan.interval or plan.duration
    while last.t < end - 0.05:
        await sleep_until(min(last.t + step, end))
        mark = await take_mark(session, metrics)
        if plan.interval:
            intervals.append(between(last, mark, meter.take_interval(), start))
        last = mark
    window = between(first, last, meter.total, start)
    window["loadgen_gc"] = {
        "collections": own_gc.count - gc_count,
        "longest_ms": round(own_gc.longest_s * 1000, 3),
    }
    window["intervals"] = intervals
    if first.server_rss:
        window["server_rss_mib_start"] = round(first.server_rss / 2**20, 1)
    return window


# ---------------------------------------------------------------------- the run
async def drive(plan: Plan) -> dict[str, Any]:
    """Open the sockets, run the closed loops, measure the window, wait for the runs to end."""
    session = Session(plan, asyncio.get_running_loop())
    with GcPauses() as own_gc:
        idle = await open_clients(session, plan.idle, idle=True)
        clients = await open_clients(session, plan.sockets)
        session.clients, session.busy = clients, len(clients)
        if not clients:
            session.all_done.set()
        gc.collect()
        gc.freeze()  # the sockets' objects are long-lived: keep them out of every collection
        began = time.time()
        session.meter.window = (began + plan.warmup, began + plan.warmup + plan.duration)
        if not plan.runs_per_socket:
            session.stop_at = session.meter.window[1]
        spread = plan.context["delay_ms"] / 1000
        for client in clients:
            session.loop.call_later(random.uniform(0, spread), client.start_run)
        timeouts = asyncio.create_task(watch_timeouts(session))
        window: dict[str, Any] = {}
        if not plan.runs_per_socket:
            window = await measure(session, own_gc)
        bound = plan.run_timeout_s + 10 + (plan.duration if plan.runs_per_socket else 0)
        try:
            await asyncio.wait_for(session.all_done.wait(), bound)
        except TimeoutError:
            session.meter.errors["drain_timeout"] += 1
        timeouts.cancel()
        session.closing = True
        for client in [*idle, *clients]:
            client.abort()
    return results(session, window, len(clients), len(idle))


def results(
    session: Session, window: dict[str, Any], opened: int, idle: int
) -> dict[str, Any]:
    """Return the JSON-ready results."""
    plan, meter = session.plan, session.meter
    return {
        "mode": "lean",
        "flavor": plan.flavor,
        "nodes": len(plan.nodes),
        "sockets": opened + idle,
        "sockets_asked": plan.sockets + plan.idle,
        "concurrent_runs": opened,
        "context": plan.context,
        "events_per_run": len(plan.script),
        "offered_rate": round(opened * 1000 / max(plan.context["delay_ms"], 1), 1),
        "achieved_rate": round(meter.in_window / plan.duration, 1) if window else None,
        "window_s": plan.duration,
        "events_received": meter.events,
        "event_bytes_mean": round(meter.event_bytes / meter.events, 1) if meter.events else None,
        "latency_ms": summarize(meter.total),
        "agent_completed_latency_ms": summarize(meter.ends),
        "tally": meter.tally.to_dict(),
        "errors": dict(meter.errors),
        "examples": meter.examples,
        "window": window,
        "loadgen_cpu_percent": window.get("loadgen_cpu_percent"),
        "loadgen_saturated": (window.get("loadgen_cpu_percent") or 0) > SATURATED_PERCENT,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the generator's command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.leangen", description=__doc__)
    add = parser.add_argument
    add("--url", required=True,
        help="ws://127.0.0.1:PORT/ws, or several comma-separated (sockets round robin)")
    add("--flavor", choices=("native", "socketio"), default="native")
    add("--idle", type=int, default=0, help="extra sockets that only stay open")
    add("--sockets", type=int, default=1000, help="sockets, each with one run in flight")
    add("--delay-ms", type=int, default=500, help="scripted delay_ms")
    add("--tools", type=int, default=2)
    add("--tokens", type=int, default=20)
    add("--token-bytes", type=int, default=0, help="pad each token to this many characters")
    add("--duration", type=float, default=30.0, help="measurement window (s)")
    add("--warmup", type=float, default=5.0, help="seconds before the window opens")
    add("--interval", type=float, default=0.0, help="a record every S s of the window (0: none)")
    add("--runs-per-socket", type=int, default=0, help="stop each socket after N runs (0: window)")
    add("--run-timeout-s", type=float, default=0.0, help="0: 5 s + 3 x the script's duration")
    add("--server-pid", default="",
        help="read its CPU and RSS from /proc (several comma-separated: summed)")
    add("--redis", default=None, help="HOST:PORT of the nodes' Redis: read its INFO")
    add("--no-ack", action="store_true", help="never ack: every event stays retained")
    add("--out", type=Path, required=True, help="JSON results file")
    return parser.parse_args(argv)


def plan_of(args: argparse.Namespace) -> Plan:
    """Build the plan from the command line."""
    urls = [urlsplit(part.strip()) for part in args.url.split(",") if part.strip()]
    url = urls[0]
    nodes = tuple((u.hostname or "127.0.0.1", u.port or 80) for u in urls)
    context = wire.scripted_context(args.tools, args.tokens, args.delay_ms)
    if args.token_bytes:
        context["token_bytes"] = args.token_bytes
    expected_s = len(wire.scripted_types(context)) * args.delay_ms / 1000
    return Plan(
        host=url.hostname or "127.0.0.1",
        port=url.port or 80,
        path=url.path or "/ws",
        nodes=nodes,
        secret=os.environ.get("REGISTRY_AUTH_SECRET", ""),
        flavor=args.flavor,
        sockets=args.sockets,
        idle=args.idle,
        context=context,
        warmup=args.warmup,
        duration=args.duration,
        interval=args.interval,
        runs_per_socket=args.runs_per_socket,
        run_timeout_s=args.run_timeout_s or 5 + 3 * expected_s,
        server_pids=tuple(int(pid) for pid in args.server_pid.split(",") if pid.strip()),
        redis=redisinfo.parse_address(args.redis) if args.redis else None,
        ack=not args.no_ack,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: run, write the JSON results, exit 0."""
    args = parse_args(argv)
    limit = genkit.raise_fd_limit()
    data = asyncio.run(drive(plan_of(args)))
    data["fd_limit"] = limit
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
