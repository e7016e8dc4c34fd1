"""Wire-level helpers of the end-to-end tests: either server (trio in-process, or FastAPI as a
subprocess), tokens, a JSON client over trio-websocket, a raw wsproto client, and the per-run
checks of PROTOCOL.md.

Nothing here sleeps to synchronise: every wait is on a real network event, or polls what the
server reports over HTTP (``/dashboard/data``, each poll a real request), bounded by
:data:`TIMEOUT` only as a guard against hangs.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs
import coredis
import trio
import trio_websocket
import wsproto
import wsproto.events as wse
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection

from harness import demo_agents, mint_token, serve
from registry import Config
from tests._redis import RedisServer, free_port

SECRET: Final = "e2e-test-secret-" + "0123456789abcdef" * 4
HOST: Final = "127.0.0.1"
#: Hang guard for every wait on the network; a passing test never gets near it.
TIMEOUT: Final = 15.0
REPO: Final = Path(__file__).resolve().parents[2]

Frame = dict[str, Any]
T = TypeVar("T")

EVENT_TYPES: Final = frozenset({
    "agent_started", "agent_thinking", "tool_executing", "tool_completed", "partial_result",
    "agent_completed",
})
ENVELOPE: Final = frozenset({"type", "run_id", "thread_id", "seq", "ts", "payload"})
RUN_STATUSES: Final = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
TOOL_STATUSES: Final = frozenset({"ok", "error", "cancelled"})

_counter = itertools.count(1)


def unique(prefix: str = "req") -> str:
    """A fresh request id (or any other label) for this test session."""
    return f"{prefix}-{next(_counter)}"


def token(user: str, ttl: float = 3600.0, secret: str = SECRET) -> str:
    return mint_token(secret, user, ttl)


def scripted(tools: int = 1, tokens: int = 3, delay_ms: float = 0, **extra: Any) -> Frame:
    """A ``context`` object for the ``scripted`` agent."""
    return {"tools": tools, "tokens": tokens, "delay_ms": delay_ms, **extra}


def _not_json(constant: str) -> Any:
    raise AssertionError(f"the server sent {constant}, which is not JSON")


def strict_json(text: str | bytes) -> Any:
    """Parses JSON as RFC 8259 defines it: no NaN, Infinity or -Infinity."""
    return json.loads(text, parse_constant=_not_json)


def is_event(frame: Mapping[str, Any]) -> bool:
    return frame.get("type") in EVENT_TYPES


# ================================================================== servers
#: The servers every protocol test runs against: ``serve`` (``--server trio``), ``serve
#: --server fastapi``, and ``cluster``: three trio nodes on one Redis, each new socket on the
#: next node (so a socket that resumes a run is on another node than the one that started
#: it). ``E2E_SERVER_KINDS`` (comma-separated) picks a subset.
ALL_SERVER_KINDS: Final = ("trio", "fastapi", "cluster")
SERVER_KINDS: Final = tuple(
    os.environ.get("E2E_SERVER_KINDS", ",".join(ALL_SERVER_KINDS)).split(","))
#: The kinds that are one server process of their own (``python -m harness serve``).
PROCESS_KINDS: Final = tuple(kind for kind in SERVER_KINDS if kind != "cluster")
#: Nodes of a ``cluster`` server.
CLUSTER_NODES: Final = 3
#: The settings every test server gets unless the test says otherwise.
DEFAULTS: Final[Mapping[str, Any]] = {"shutdown_grace_s": 2.0}


@attrs.frozen(eq=False)
class Server:
    """Where a running server listens."""

    port: int
    config: Config = attrs.field(factory=lambda: Config(auth_secret=SECRET))
    #: Set it to shut an in-process server down (None for a subprocess).
    stop: trio.Event | None = None
    #: The server's process, when it runs in one.
    process: trio.Process | subprocess.Popen[bytes] | None = None
    #: Every node's port, for a service of several nodes (``port`` is the first).
    ports: tuple[int, ...] = ()
    _turn: itertools.count[int] = attrs.field(factory=itertools.count)

    def url(self, path: str = "/ws") -> str:
        """The URL of ``path``; on a service of several nodes, each call the next node."""
        port = self.ports[next(self._turn) % len(self.ports)] if self.ports else self.port
        return f"ws://{HOST}:{port}{path}"

    def shut_down(self) -> None:
        """Starts the graceful shutdown: the stop event in-process, SIGTERM to a process."""
        if self.stop is not None:
            self.stop.set()
        else:
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)


@asynccontextmanager
async def open_server(kind: str = "trio", /, **settings: Any) -> AsyncIterator[Server]:
    """Runs a server of ``kind`` with ``Config(auth_secret=SECRET, **settings)``.

    ``trio`` runs ``harness.serve`` in this trio run; ``fastapi`` runs ``python -m harness
    serve --server fastapi`` with the settings as flags. Either is fresh (no run, no count
    yet). ``shutdown_grace_s`` defaults to 2 so that a test that fails mid-way still ends
    quickly.
    """
    settings = {**DEFAULTS, **settings}
    config = Config(auth_secret=SECRET, **settings)
    if kind == "trio":
        async with _in_process(config) as server:
            yield server
    elif kind == "fastapi":
        async with _fastapi_process(config, settings) as server:
            yield server
    elif kind == "cluster":
        async with _in_process(config, nodes=CLUSTER_NODES) as server:
            yield server
    else:
        raise ValueError(f"unknown server kind {kind!r}")


@asynccontextmanager
async def default_server(kind: str) -> AsyncIterator[Server]:
    """A server with the default settings, handed over idle: no socket open, no run in flight.

    ``trio``: a fresh one in this trio run. ``fastapi``: the session's shared subprocess
    (see :class:`_Shared`), which saves a process start per test; its counters and retained
    runs carry over from earlier tests, so a test that reads them takes :func:`open_server`.
    """
    if kind == "fastapi":
        yield await SHARED.acquire()
    else:
        async with open_server(kind) as server:
            yield server


@asynccontextmanager
async def _in_process(config: Config, nodes: int = 1) -> AsyncIterator[Server]:
    """``nodes`` trio servers in this trio run; several share the session's Redis (emptied
    first, so each test starts from a fresh service)."""
    if nodes > 1:
        config = attrs.evolve(config, redis_url=await SHARED_REDIS.fresh())
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        ports = [await nursery.start(functools.partial(
            serve, config, host=HOST, port=0, agents=demo_agents(), stop=stop))
            for _ in range(nodes)]
        try:
            yield Server(ports[0], config, stop, ports=tuple(ports) if nodes > 1 else ())
        finally:
            stop.set()


class _SharedRedis:
    """The session's ``redis-server`` for ``cluster`` servers, started on first use."""

    def __init__(self) -> None:
        self.server: RedisServer | None = None

    async def fresh(self) -> str:
        """Its URL, with every key deleted."""
        if self.server is None:
            self.server = RedisServer(Path(tempfile.mkdtemp(prefix="e2e-redis-")), free_port())
            self.server.start()
        async with coredis.Redis.from_url(self.server.url) as client:
            await client.flushall()
        return self.server.url

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            shutil.rmtree(self.server.directory, ignore_errors=True)
            self.server = None


SHARED_REDIS: Final = _SharedRedis()


def setting_flags(settings: Mapping[str, Any]) -> list[str]:
    """The command-line flags that give a server ``settings`` (Config field name -> value)."""
    flags = []
    for name, value in settings.items():
        if isinstance(value, bool):
            text = "1" if value else "0"
        elif isinstance(value, tuple | list):
            text = ",".join(value)
        else:
            text = str(value)
        flags += ["--" + name.replace("_", "-"), text]
    return flags


@asynccontextmanager
async def _fastapi_process(config: Config, settings: Mapping[str, Any]) -> AsyncIterator[Server]:
    """A fastapi server of this test's own; SIGTERM (a graceful shutdown) when it is done."""
    async with server_process(*setting_flags(settings), kind="fastapi") as (proc, server):
        try:
            yield attrs.evolve(server, config=config, process=proc)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(config.shutdown_grace_s + TIMEOUT / 5):
                await proc.wait()


class _Shared:
    """The session's fastapi server with the default settings (one start, ~1 s, for many tests).

    Each test gets it idle, as a fresh server would be: no socket open and no run in flight.
    One that is not idle soon (a test left a run going) or has stopped is started again.
    It outlives each test's trio run, so it is a plain :class:`subprocess.Popen`.
    """

    def __init__(self) -> None:
        self.server: Server | None = None

    async def acquire(self) -> Server:
        if self.server is not None and await _is_idle(self.server):
            return self.server
        self.close()
        process = subprocess.Popen(
            serve_command(*setting_flags(DEFAULTS), kind="fastapi"), stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, cwd=REPO, env=server_env(REGISTRY_AUTH_SECRET=SECRET))
        self.server = Server(0, Config(auth_secret=SECRET, **DEFAULTS), process=process)
        assert process.stdout is not None
        try:
            with trio.fail_after(TIMEOUT):
                line = await trio.to_thread.run_sync(process.stdout.readline,
                                                     abandon_on_cancel=True)
            self.server = attrs.evolve(self.server, port=_listening_port(line.decode()))
        except BaseException:
            self.close()  # which ends the read too
            raise
        return self.server

    def close(self) -> None:
        """Stops the server (SIGTERM, then SIGKILL if it does not exit in time)."""
        if self.server is None:
            return
        process, self.server = self.server.process, None
        assert isinstance(process, subprocess.Popen)
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()


SHARED: Final = _Shared()


async def _is_idle(server: Server) -> bool:
    """Whether the server runs and soon has no socket open and no run in flight."""
    assert isinstance(server.process, subprocess.Popen)
    if server.process.poll() is not None:
        return False
    with trio.move_on_after(2.0):  # a closing socket is gone in milliseconds
        await _until_none(server, "connections_active")
        with trio.move_on_after(0.5):  # a run in flight may be ending; a left-over one is not
            await _until_none(server, "runs_active")
            return True
    return False


async def http_get(server: Server, target: str, headers: Mapping[str, str] | None = None,
                   *, port: int | None = None) -> tuple[int, bytes]:
    """One HTTP/1.1 GET on its own connection (to ``port``, default the first node's): the
    status and the body."""
    port = server.port if port is None else port
    lines = [f"GET {target} HTTP/1.1", f"Host: {HOST}:{port}", "Connection: close",
             *(f"{name}: {value}" for name, value in (headers or {}).items()), "", ""]
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream(HOST, port)
        async with stream:
            await stream.send_all("\r\n".join(lines).encode())
            data = b""
            while chunk := await stream.receive_some():
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(maxsplit=2)[1]), body


async def dashboard_data(server: Server, port: int | None = None) -> dict[str, Any]:
    """``/dashboard/data`` of one node (default the first): the live figures (runs in
    flight, open sockets, ...)."""
    token = server.config.metrics_token
    status, body = await http_get(server, "/dashboard/data",
                                  {"Authorization": f"Bearer {token}"} if token else None,
                                  port=port)
    assert status == 200, (status, body)
    data: dict[str, Any] = strict_json(body)
    return data


async def wait_sockets_closed(server: Server) -> None:
    """Waits until the server has no WebSocket open, as ``/dashboard/data`` reports it.

    A server in another process learns of a connection reset when its event loop gets to
    it: this is the wire-observable end of that.
    """
    with trio.fail_after(TIMEOUT):
        await _until_none(server, "connections_active")


async def wait_runs_ended(server: Server) -> None:
    """Waits until the server has no run in flight, as ``/dashboard/data`` reports it.

    For effects that have no event on the wire of their own (a run ending with no socket
    subscribed); a test using it has no other run in flight.
    """
    with trio.fail_after(TIMEOUT):
        await _until_none(server, "runs_active")


async def _until_none(server: Server, figure: str) -> None:
    """Polls ``/dashboard/data`` until ``figure`` (a count) is 0 on every node."""
    for port in server.ports or (server.port,):
        while (await dashboard_data(server, port))[figure]:
            await trio.sleep(0.01)


# ================================================================== clients
class Client:
    """A JSON client over one trio-websocket connection.

    Run events read while waiting for a control frame (answer, error, pong) are kept in
    ``backlog`` and handed out first by :meth:`next_event`, so no frame is ever lost.
    """

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.backlog: deque[Frame] = deque()

    async def send(self, frame: Mapping[str, Any]) -> None:
        await self.ws.send_message(json.dumps(frame))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send_message(data)

    async def recv(self) -> Frame:
        """The next frame off the wire (ignores the backlog)."""
        with trio.fail_after(TIMEOUT):
            text = await self.ws.get_message()
        assert isinstance(text, str), f"the server sent a binary frame: {text!r}"
        frame = strict_json(text)
        assert isinstance(frame, dict), f"the server sent a non-object frame: {text}"
        return frame

    async def control(self) -> Frame:
        """The next frame that is not a run event; run events read meanwhile go to the backlog."""
        while True:
            frame = await self.recv()
            if not is_event(frame):
                return frame
            self.backlog.append(frame)

    async def request(self, frame: Mapping[str, Any]) -> Frame:
        """Sends ``frame`` and returns the next control frame (the answer)."""
        await self.send(frame)
        return await self.control()

    async def next_event(self) -> Frame:
        if self.backlog:
            return self.backlog.popleft()
        frame = await self.recv()
        assert is_event(frame), f"expected a run event, got {frame}"
        return frame

    def start_frame(
        self, agent: str = "scripted", message: str = "hello", *,
        request_id: str | None = None, **fields: Any,
    ) -> Frame:
        return {"type": "start_agent", "request_id": request_id or unique(), "agent": agent,
                "message": message, **fields}

    async def start(
        self, agent: str = "scripted", message: str = "hello", *,
        request_id: str | None = None, **fields: Any,
    ) -> Frame:
        """Sends ``start_agent`` and returns its ``run_accepted`` (fails on an error)."""
        frame = self.start_frame(agent, message, request_id=request_id, **fields)
        answer = await self.request(frame)
        assert answer["type"] == "run_accepted", answer
        assert answer["request_id"] == frame["request_id"]
        return answer

    async def events_until(self, run_id: str, predicate: Callable[[Frame], bool]) -> list[Frame]:
        """Events of ``run_id`` up to and including the first one ``predicate`` accepts."""
        events: list[Frame] = []
        while True:
            event = await self.next_event()
            assert event["run_id"] == run_id, f"foreign event on this socket: {event}"
            events.append(event)
            if predicate(event):
                return events

    async def run_events(self, run_id: str) -> list[Frame]:
        """Events of ``run_id`` up to its ``agent_completed``; any other frame fails."""
        return await self.events_until(run_id, lambda e: e["type"] == "agent_completed")

    async def collect(self, *run_ids: str) -> dict[str, list[Frame]]:
        """Events of several runs on this socket until each has completed."""
        out: dict[str, list[Frame]] = {run_id: [] for run_id in run_ids}
        open_runs = set(run_ids)
        while open_runs:
            event = await self.next_event()
            assert event["run_id"] in out, f"foreign event on this socket: {event}"
            out[event["run_id"]].append(event)
            if event["type"] == "agent_completed":
                open_runs.discard(event["run_id"])
        return out

    async def ping(self, ping_id: Any = None) -> Frame:
        """Sends ``ping`` and returns the very next frame off the wire."""
        ping_id = unique("ping") if ping_id is None else ping_id
        await self.send({"type": "ping", "id": ping_id})
        return await self.recv()

    async def assert_usable(self) -> None:
        """The socket still answers: a ping's pong is the next control frame."""
        ping_id = unique("ping")
        assert await self.request({"type": "ping", "id": ping_id}) == {"type": "pong",
                                                                         "id": ping_id}

    async def assert_quiet(self) -> None:
        """The socket is open, usable, and nothing is queued for it: a ping's pong comes next."""
        ping_id = unique("ping")
        assert not self.backlog, f"unexpected events: {list(self.backlog)}"
        assert await self.ping(ping_id) == {"type": "pong", "id": ping_id}

    async def until_closed(self) -> tuple[int | None, list[Frame]]:
        """Reads until the server closes; returns the close code and the frames read before."""
        frames = list(self.backlog)
        self.backlog.clear()
        try:
            while True:
                frames.append(await self.recv())
        except ConnectionClosed as exc:
            return (exc.reason.code if exc.reason is not None else None), frames


def _target(server: Server, path: str, jwt: str | None, via: str) -> tuple[str, list[Any]]:
    if jwt is None:
        return server.url(path), []
    if via == "query":
        sep = "&" if "?" in path else "?"
        return server.url(f"{path}{sep}token={jwt}"), []
    return server.url(path), [(b"authorization", f"Bearer {jwt}".encode())]


@asynccontextmanager
async def connect(
    server: Server, user: str = "alice", *, jwt: str | None = None, via: str = "header",
    path: str = "/ws", **options: Any,
) -> AsyncIterator[Client]:
    """Opens an authenticated socket (token for ``user`` unless ``jwt`` is given)."""
    url, headers = _target(server, path, jwt if jwt is not None else token(user), via)
    async with trio_websocket.open_websocket_url(
        url, extra_headers=headers, connect_timeout=TIMEOUT, disconnect_timeout=TIMEOUT,
        **options,
    ) as ws:
        yield Client(ws)


async def handshake_status(
    server: Server, *, jwt: str | None = None, via: str = "header", path: str = "/ws",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> int:
    """Attempts a handshake that must be rejected; returns the HTTP status."""
    url, auth = _target(server, path, jwt, via)
    try:
        async with trio_websocket.open_websocket_url(
            url, extra_headers=auth + (headers or []), connect_timeout=TIMEOUT,
            disconnect_timeout=TIMEOUT,
        ):
            pass
    except ConnectionRejected as exc:
        return exc.status_code
    raise AssertionError(f"handshake to {url} was accepted")


async def gather(*thunks: Callable[[], Awaitable[T]]) -> list[T]:
    """Runs the thunks concurrently; returns their results in order."""
    results: dict[int, T] = {}

    async def one(index: int, thunk: Callable[[], Awaitable[T]]) -> None:
        results[index] = await thunk()

    async with trio.open_nursery() as nursery:
        for index, thunk in enumerate(thunks):
            nursery.start_soon(one, index, thunk)
    return [results[i] for i in range(len(thunks))]


# ================================================================ raw client
class RawClient:
    """A bare wsproto client: it answers nothing by itself (no automatic pongs)."""

    def __init__(self, stream: trio.SocketStream, ws: wsproto.WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self._events: deque[wse.Event] = deque()

    async def send(self, event: wse.Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next_event(self) -> wse.Event | None:
        """The next wsproto event from the server; None once the TCP connection ended."""
        while not self._events:
            with trio.fail_after(TIMEOUT):
                data = await self.stream.receive_some()
            if not data:
                return None
            self.ws.receive_data(data)
            self._events.extend(self.ws.events())
        return self._events.popleft()

    async def next_text(self) -> Frame:
        event = await self.next_event()
        assert isinstance(event, wse.TextMessage), event
        frame: Frame = strict_json(event.data)
        return frame


@asynccontextmanager
async def raw_connect(server: Server, user: str = "alice") -> AsyncIterator[RawClient]:
    stream = await trio.open_tcp_stream(HOST, server.port)
    async with stream:
        client = RawClient(stream, wsproto.WSConnection(wsproto.ConnectionType.CLIENT))
        auth = [(b"authorization", f"Bearer {token(user)}".encode())]
        await client.send(wse.Request(host=f"{HOST}:{server.port}", target="/ws",
                                      extra_headers=auth))
        accepted = await client.next_event()
        assert isinstance(accepted, wse.AcceptConnection), accepted
        yield client


# =================================================================== checks
def check_run(events: Sequence[Frame], *, run_id: str | None = None,
              thread_id: str | None = None) -> Frame:
    """Asserts PROTOCOL.md's per-run guarantees 1-3 and the envelope and payload of every event.

    Returns:
        The ``agent_completed`` payload.
    """
    assert events, "no events"
    run_id = run_id or events[0]["run_id"]
    thread_id = thread_id or events[0]["thread_id"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    for event in events:
        check_envelope(event, run_id, thread_id)
    assert events[0]["type"] == "agent_started"
    assert [e["type"] for e in events].count("agent_completed") == 1
    assert events[-1]["type"] == "agent_completed"
    check_tool_pairs(events)
    return dict(events[-1]["payload"])


def check_envelope(event: Frame, run_id: str, thread_id: str) -> None:
    assert event.keys() >= ENVELOPE, event
    assert event["type"] in EVENT_TYPES
    assert event["run_id"] == run_id
    assert event["thread_id"] == thread_id
    assert isinstance(event["seq"], int) and not isinstance(event["seq"], bool)
    assert isinstance(event["ts"], float), f"ts must be a float: {event}"
    assert abs(event["ts"] - time.time()) < 60
    assert isinstance(event["payload"], dict)
    _check_payload(event["type"], event["payload"])


_PAYLOADS: Final[Mapping[str, Mapping[str, type]]] = {
    "agent_started": {"agent": str},
    "agent_thinking": {"thought": str},
    "tool_executing": {"tool": str, "call_id": str, "args": dict},
    "tool_completed": {"tool": str, "call_id": str, "status": str},
    "partial_result": {"text": str},
    "agent_completed": {"status": str},
}


def _check_payload(kind: str, payload: Frame) -> None:
    for name, typ in _PAYLOADS[kind].items():
        assert isinstance(payload.get(name), typ), f"{kind} payload needs {name}: {payload}"
    if kind == "tool_completed":
        assert payload["status"] in TOOL_STATUSES, payload
        assert ("result" if payload["status"] == "ok" else "error") in payload, payload
    if kind == "agent_completed":
        assert payload["status"] in RUN_STATUSES, payload
        assert ("result" if payload["status"] == "succeeded" else "error") in payload, payload


def check_tool_pairs(events: Sequence[Frame]) -> None:
    """Every ``tool_executing`` is closed by exactly one ``tool_completed`` of its call_id."""
    open_calls: dict[str, str] = {}
    seen: set[str] = set()
    for event in events:
        payload = event["payload"]
        if event["type"] == "tool_executing":
            assert payload["call_id"] not in seen, f"call_id reused: {event}"
            seen.add(payload["call_id"])
            open_calls[payload["call_id"]] = payload["tool"]
        elif event["type"] == "tool_completed":
            assert open_calls.pop(payload["call_id"], None) == payload["tool"], event
    assert not open_calls, f"tools never completed: {open_calls}"


def types(events: Sequence[Frame]) -> list[str]:
    return [e["type"] for e in events]


def scripted_types(tools: int, tokens: int) -> list[str]:
    """The exact event types of a successful ``scripted`` run."""
    return (["agent_started", "agent_thinking"] + ["tool_executing", "tool_completed"] * tools
            + ["partial_result"] * tokens + ["agent_completed"])


# =============================================================== subprocess
def server_env(**variables: str) -> dict[str, str]:
    """This process's environment without any ``REGISTRY_*`` variable, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env.update(variables)
    return env


LISTENING: Final = re.compile(r"listening on ws://(?P<host>[^\s/]+):(?P<port>\d+)/ws")


def serve_command(*flags: str, kind: str = "trio") -> list[str]:
    """``python -m harness serve --port 0 FLAGS`` on HOST; ``--server fastapi`` for that kind."""
    choice = ["--server", kind] if kind != "trio" else []
    return [sys.executable, "-m", "harness", "serve", *choice, "--host", HOST, "--port", "0",
            *flags]


def _listening_port(line: str) -> int:
    """The port of the server's first stdout line (which must be the contract's)."""
    match = LISTENING.fullmatch(line.rstrip("\r\n"))
    assert match is not None, f"first stdout line is {line!r}"
    assert match["host"] == HOST and int(match["port"]) > 0
    return int(match["port"])


@asynccontextmanager
async def server_process(
    *flags: str, env: Mapping[str, str] | None = None, kind: str = "trio",
) -> AsyncIterator[tuple[trio.Process, Server]]:
    """Runs ``python -m harness serve --port 0 FLAGS`` until its first stdout line.

    ``kind`` ``fastapi`` adds ``--server fastapi``; ``trio`` adds nothing (it is the default).
    Kills the process on exit if it is still running.
    """
    proc = await trio.lowlevel.open_process(
        serve_command(*flags, kind=kind), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        cwd=REPO, env=dict(env) if env is not None else server_env(REGISTRY_AUTH_SECRET=SECRET))
    try:
        port = _listening_port(await first_line(proc))
        yield proc, Server(port, process=proc)
    finally:
        await reap(proc)


async def first_line(proc: trio.Process) -> str:
    """The process's first stdout line (without its end), within :data:`TIMEOUT`."""
    assert proc.stdout is not None
    data = b""
    with trio.fail_after(TIMEOUT):
        while b"\n" not in data:
            chunk = await proc.stdout.receive_some()
            assert chunk, f"the process exited before printing a line (got {data!r})"
            data += chunk
    return data.split(b"\n", 1)[0].decode().rstrip("\r")


async def reap(proc: trio.Process) -> None:
    """Kills a process a test left running, and waits (bounded) for it to go."""
    if proc.returncode is None:
        proc.kill()
    with trio.move_on_after(TIMEOUT):
        await proc.wait()


async def run_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[
        bytes]:
    """Runs ``python -m harness ARGS`` to completion and captures its output."""
    with trio.fail_after(TIMEOUT):
        return await trio.run_process(
            [sys.executable, "-m", "harness", *args], cwd=REPO, check=False,
            capture_stdout=True, capture_stderr=True,
            env=dict(env) if env is not None else server_env(REGISTRY_AUTH_SECRET=SECRET))


# ================================================================= shutdown
@attrs.define
class InFlight:
    """A socket with one run in flight, and the events it has read of it so far."""

    client: Client
    run_id: str
    held: list[Frame]


async def start_in_flight(client: Client, context: Frame, until: str = "agent_started") -> InFlight:
    """Starts a ``scripted`` run and reads until an event of type ``until`` arrived."""
    run_id = (await client.start(context=context))["run_id"]
    held = await client.events_until(run_id, lambda e: e["type"] == until)
    return InFlight(client, run_id, held)


async def assert_shut_down(in_flight: Sequence[InFlight], idle: Sequence[Client]) -> None:
    """Every run ends ``cancelled`` on its socket (tools closed), then every socket gets 1001."""
    clients = [f.client for f in in_flight] + list(idle)
    outcomes = await gather(*(c.until_closed for c in clients))
    for flight, (code, frames) in zip(in_flight, outcomes, strict=False):
        assert check_run(flight.held + frames, run_id=flight.run_id)["status"] == "cancelled"
        assert code == 1001
    for code, frames in outcomes[len(in_flight):]:
        assert (code, frames) == (1001, [])
