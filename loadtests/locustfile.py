"""Locust users for the agent execution registry: chat runs, delivery latency and guarantees.

Each :class:`ChatUser` is one chat user (its own JWT ``sub``) on one WebSocket at a time
(websocket-client, read by a gevent greenlet). It starts ``scripted`` and ``research`` runs with
think time in between, and for every run it starts checks every per-run guarantee of PROTOCOL.md
with the pure :class:`loadtests.checker.ClientChecker`. A fraction of users drop their socket
mid-run, reconnect and ``resume`` from the last seq they hold; clients ``ack`` as they go.

What Locust shows:

* ``WS <event type>``: one request per received run event, response time = delivery latency
  (receive wall time - the event's ``ts``), size = frame bytes.
* ``RUN <agent>``: one request per run followed to its end, response time = run duration.
* ``CONN connect``: each WebSocket handshake (failures: 401/429/refused...).
* ``TOKEN refresh``: each ``refresh`` a user sent before its token expired, response time = until
  ``refreshed``; a refused refresh is a failure.
* ``VIOLATION <kind>``: one failure per broken guarantee (lost, duplicate, reordered, foreign,
  unterminated, unpaired_tool, malformed); ``START <agent>`` failures for refused starts;
  ``ERROR <code>`` failures for any other ``error`` frame about the run in flight.
* ``CUT <agent>`` (``--delivery-mode direct`` only): a run whose ``resume`` the server declined
  (``resume_unavailable``: the legacy path keeps nothing), response time = until the refusal,
  size = the events lost by design. Not a failure: it is what the legacy path does.

Pass/fail (``environment.process_exit_code``, decided on the master or local runner at quit):
any failure at all, a delivery ratio below 100 %, or the p95/p99 delivery latency of all ``WS``
requests above ``--p95-ms`` / ``--p99-ms`` fails the run. With ``--delivery-mode direct``,
losses (``VIOLATION lost`` / ``unterminated`` and the runs cut) do not fail it: only the other
violations do.

Several nodes (``--node-urls ws://a/ws,ws://b/ws,...``; ``--host`` is then only Locust's
default): users are spread round robin over the nodes and open their socket and start their
runs on their *home* node; a user whose socket drops resumes on another node, chosen at random
(:mod:`loadtests.nodes`), and goes back to its home node before its next run.

Options (also env ``LOCUST_<NAME>``): ``--p95-ms`` (500), ``--p99-ms`` (1000),
``--drop-fraction`` (0.1), ``--agent-mix`` (``scripted:3,research:1``), ``--run-timeout-s`` (60),
``--think-min-s``/``--think-max-s`` (1/4), ``--delivery-mode`` (``registry``: the server's
mode, see above), ``--node-urls`` (empty: just the host), ``--seed`` (-1: random; a seed makes
the droppers, agents and plans of the users the same in two tests), ``--token-ttl-s`` (3600:
each user's JWT lifetime; users send ``refresh`` with a new token before it expires),
``--events-out`` (a directory: each process writes
``events-<pid>.json`` with its tally and raw latency samples at test stop; env
``LOADTEST_EVENTS_OUT`` works too). The host is the server's ``ws://HOST:PORT/ws`` URL and the
JWT secret comes from env ``REGISTRY_AUTH_SECRET``.

Never import this module in a process that imports trio: ``import locust`` monkey-patches the
standard library with gevent.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import jwt
import websocket
from locust import User, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner
from locust.stats import StatsEntry

from loadtests import wire
from loadtests.checker import ClientChecker, Violation
from loadtests.nodes import home_node, parse_node_urls, resume_node
from loadtests.tally import LatencySamples, Tally

log = logging.getLogger("loadtests")

ACK_EVERY = 5
"""A client acks (cumulatively) every this many events of a run, and at its end."""

TALLY = Tally()
"""This process's run/event/violation counts (one Locust process = one test at a time)."""
SAMPLES = LatencySamples()
"""This process's raw latency samples, written to ``--events-out`` at test stop (with several
nodes: those received on the user's home node)."""
OTHER_NODE_SAMPLES = LatencySamples(cap=1_000_000)
"""With several nodes, the samples of events received on a socket that resumed on another node
than the user's home node (delivered through that node's mirror of the run)."""
MASTER_TALLY = Tally()
"""On a master, the sum of what the workers reported."""
USER_NUMBERS = itertools.count()
"""Numbers this process's users in spawn order (their home node is picked from it)."""
DECLINED_RESUME = frozenset({"resume_unavailable", "not_found"})
"""The answers of a ``delivery_mode`` direct server to ``resume``: nothing was kept (not_found
once the run has ended and is gone)."""
TOLERATED_IN_DIRECT_MODE = frozenset({"lost", "unterminated"})
"""Violation kinds that do not fail a ``--delivery-mode direct`` test: losses are what the
legacy path does."""


class ViolationError(Exception):
    """A broken guarantee, reported to Locust as a failure."""


class StartRefused(Exception):
    """The server answered ``start_agent`` with an error, or not at all."""


class RefreshRefused(Exception):
    """The server answered ``refresh`` with an error."""


OPTIONS: tuple[tuple[str, type, Any, str], ...] = (
    ("--p95-ms", float, 500.0, "fail when the p95 delivery latency of WS events exceeds this (ms)"),
    (
        "--p99-ms",
        float,
        1000.0,
        "fail when the p99 delivery latency of WS events exceeds this (ms)",
    ),
    ("--drop-fraction", float, 0.1, "fraction of users that drop their socket mid-run and resume"),
    ("--agent-mix", str, "scripted:3,research:1", "agent weights, e.g. scripted:3,research:1"),
    ("--run-timeout-s", float, 60.0, "a run not ended after this long is unterminated"),
    ("--think-min-s", float, 1.0, "shortest think time between two messages (s)"),
    ("--think-max-s", float, 4.0, "longest think time between two messages (s)"),
    ("--seed", int, -1, "seed of the users' choices (droppers, agents, plans); -1: random"),
    ("--token-ttl-s", float, 3600.0, "lifetime of each user's JWT (s); users refresh it"),
    (
        "--delivery-mode",
        str,
        "registry",
        "the server's delivery_mode: registry, or direct (a declined resume cuts the run)",
    ),
    (
        "--node-urls",
        str,
        "",
        "comma-separated ws URLs of the service's nodes (empty: the host only)",
    ),
    (
        "--events-out",
        str,
        os.environ.get("LOADTEST_EVENTS_OUT", ""),
        "directory where each process writes events-<pid>.json at test stop",
    ),
)
"""The load test's own options: flag, type, default, help (env ``LOCUST_<FLAG>`` too)."""


def _add_options(parser: Any, **_: Any) -> None:
    """Register the load test's own command-line options."""
    group = parser.add_argument_group("registry load test")
    for flag, kind, default, text in OPTIONS:
        env_var = "LOCUST_" + flag.lstrip("-").replace("-", "_").upper()
        group.add_argument(flag, type=kind, default=default, env_var=env_var, help=text)


def parse_mix(text: str) -> list[tuple[str, float]]:
    """Parse ``scripted:3,research:1`` into (agent, weight) pairs."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        agent, _, weight = item.partition(":")
        pairs.append((agent.strip(), float(weight or 1)))
    if not pairs or sum(weight for _, weight in pairs) <= 0:
        raise ValueError(f"bad --agent-mix {text!r}")
    return pairs


def pick_plan(rng: random.Random, mix: list[tuple[str, float]]) -> tuple[str, dict[str, Any]]:
    """Pick an agent by weight and a realistic context for it."""
    agent = rng.choices([a for a, _ in mix], weights=[w for _, w in mix])[0]
    if agent != "scripted":
        return agent, {}
    tools, tokens = rng.randint(0, 3), rng.randint(5, 40)
    return agent, wire.scripted_context(tools, tokens, rng.choice((10, 20, 50)))


def user_rng(seed: int, worker: int, number: int) -> random.Random:
    """The random choices of user ``number`` of worker ``worker``: reproducible for a seed >= 0
    (the same users drop, with the same agents and plans, in two tests), else unseeded."""
    return random.Random(f"{seed}:{worker}:{number}") if seed >= 0 else random.Random()


def refresh_margin(lifetime_s: float) -> float:
    """How long before ``exp`` a token is replaced, as harness.client does by default: 10 % of
    its lifetime, 1 s to 60 s, never more than half the lifetime."""
    return min(max(0.1 * lifetime_s, 1.0), 60.0, max(0.0, lifetime_s / 2))


def fire(
    env: Environment, kind: str, name: str, ms: float, size: int = 0, exc: Exception | None = None
) -> None:
    """Report one request (or failure) to Locust's statistics."""
    env.events.request.fire(  # type: ignore[no-untyped-call]
        request_type=kind,
        name=name,
        response_time=ms,
        response_length=size,
        exception=exc,
        context={},
    )


def options(environment: Environment) -> Any:
    """Return the parsed command-line options (present in every Locust process)."""
    assert environment.parsed_options is not None
    return environment.parsed_options


class Connection:
    """One WebSocket and the greenlet reading it, handing each frame to ``on_frame``.

    ``on_frame(frame, received_at, size)`` runs in the reader greenlet; returning False stops
    the reader (used for a planned drop). ``on_close()`` runs when the socket ends on its own.
    """

    def __init__(
        self,
        url: str,
        on_frame: Callable[[dict[str, Any], float, int], bool],
        on_close: Callable[[], None],
    ) -> None:
        self.ws = websocket.create_connection(url, timeout=10, enable_multithread=True)
        self.ws.settimeout(None)
        self.on_frame, self.on_close = on_frame, on_close
        self.alive = True
        self.reader = gevent.spawn(self._read)

    def _read(self) -> None:
        """Read until the socket ends or ``on_frame`` asks to stop."""
        while True:
            try:
                raw = self.ws.recv()
            except (websocket.WebSocketException, OSError):
                raw = ""
            received_at = time.time()
            if not raw:
                self.alive = False
                self.on_close()
                return
            try:
                frame = json.loads(raw)
            except ValueError:
                frame = None
            if not isinstance(frame, dict):
                log.warning("frame that is not a JSON object: %.80r", raw)
                continue
            if not self.on_frame(frame, received_at, len(raw)):
                return

    def send(self, frame: dict[str, Any]) -> None:
        """Send one frame (safe from any greenlet)."""
        self.ws.send(json.dumps(frame))

    def drop(self) -> None:
        """Kill the socket abruptly (no close handshake), as a network loss would."""
        self.alive = False
        if gevent.getcurrent() is not self.reader:
            self.reader.kill(block=True)
        self.ws.shutdown()  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Close the socket politely and stop the reader."""
        self.alive = False
        self.reader.kill(block=True)
        try:
            self.ws.close(timeout=1)
        except (websocket.WebSocketException, OSError):
            self.ws.shutdown()  # type: ignore[no-untyped-call]


class RunState:
    """What the task greenlet and the reader greenlet share about the run in flight."""

    def __init__(self, request_id: str, agent: str, drop_at: int | None) -> None:
        self.request_id, self.agent, self.drop_at = request_id, agent, drop_at
        self.run_id: str | None = None
        self.error: dict[str, Any] | None = None
        self.received = 0
        self.resuming = False
        """A ``resume`` was sent on the current socket and no event came since: an ``error``
        about the run is its answer."""
        self.accepted = gevent.event.Event()
        self.done = gevent.event.Event()
        self.broken = gevent.event.Event()


class ChatUser(User):
    """A chat user: sends a message, follows the agent's run to its end, thinks, repeats."""

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        opts = options(environment)
        offset = int(getattr(environment.runner, "worker_index", 0) or 0)
        number = next(USER_NUMBERS)
        self.rng = user_rng(opts.seed, offset, number)
        self.mix = parse_mix(opts.agent_mix)
        self.user_id = f"locust-{uuid.uuid4().hex[:16]}"
        self.checker = ClientChecker()
        self.conn: Connection | None = None
        self.current: RunState | None = None
        self.dropper = self.rng.random() < opts.drop_fraction
        self.refresh_at = 0.0
        self.refresh_sent_at: float | None = None
        self.refresher: gevent.Greenlet[Any, None] | None = None
        self.direct = opts.delivery_mode == "direct"
        self.urls = parse_node_urls(opts.node_urls, str(self.host or ""))
        self.per_node = bool(opts.node_urls)
        self.home = self.node = home_node(number + offset, len(self.urls))

    def wait_time(self) -> float:
        """Think time between two messages."""
        opts = options(self.environment)
        return self.rng.uniform(opts.think_min_s, opts.think_max_s)

    def on_start(self) -> None:
        """Connect the user's socket (to its home node)."""
        self._connect(self.home)

    def on_stop(self) -> None:
        """Close the socket; a run still in flight is abandoned, not judged."""
        if self.current is not None and self.current.run_id is not None:
            TALLY.counts["runs_abandoned"] += 1
        self.current = None
        self._stop_refreshing()
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    @task
    def chat(self) -> None:
        """Start one run and follow it to its end, checking every guarantee."""
        if self.conn is not None and self.conn.alive and self.node != self.home:
            self.conn.close()  # resumed elsewhere: back to the home node to start
            self._report(self.checker.socket_replaced())
            self.conn = None
        if self.conn is None or not self.conn.alive:
            self._connect(self.home)
        agent, context = pick_plan(self.rng, self.mix)
        script = wire.scripted_types(context) if agent == "scripted" else None
        limit = len(script) - 1 if script else 8
        drop_at = self.rng.randint(1, max(1, limit)) if self.dropper else None
        run = self.current = RunState(uuid.uuid4().hex, agent, drop_at)
        started = time.time()
        self.checker.start_sent(run.request_id, script)
        self._send(wire.start_agent(run.request_id, agent, "hello from locust", context))
        if self._await_accept(run):
            TALLY.counts["runs_started"] += 1
            if self.per_node:
                TALLY.add_node(self.node, "runs_started")
            self._follow(run, started + options(self.environment).run_timeout_s)
            self._judge(run, started)
        self.current = None

    def _await_accept(self, run: RunState) -> bool:
        """Wait for ``run_accepted``; report a refused or unanswered start."""
        run.accepted.wait(timeout=10)
        if run.run_id is not None:
            return True
        TALLY.counts["runs_failed_to_start"] += 1
        reason = run.error or {"code": "no run_accepted within 10 s"}
        fire(self.environment, "START", run.agent, 0, exc=StartRefused(str(reason.get("code"))))
        return False

    def _follow(self, run: RunState, deadline: float) -> None:
        """Wait for the run's end, reconnecting and resuming whenever the socket drops."""
        while not run.done.is_set() and time.time() < deadline:
            gevent.wait([run.done, run.broken], timeout=deadline - time.time(), count=1)
            if run.broken.is_set() and not run.done.is_set():
                run.broken.clear()
                self._resume(run)

    def _resume(self, run: RunState) -> None:
        """Replace the socket, on another node when there are several, and ``resume`` the run
        after the last seq held."""
        dropped_from = self.node
        if self.conn is not None:
            self.conn.drop()
        self._report(self.checker.socket_replaced())
        target = resume_node(dropped_from, len(self.urls), self.rng)
        self._connect(target)
        TALLY.counts["resumes"] += 1
        if len(self.urls) > 1:
            moved = "resumes_other_node" if target != dropped_from else "resumes_same_node"
            TALLY.counts[moved] += 1
        if self.per_node:
            TALLY.add_node(target, "resumes_in")
        assert run.run_id is not None
        after = self.checker.runs[run.run_id].last_seq
        self.checker.resume_sent(run.run_id, after)
        run.resuming = True
        self._send(wire.resume(run.run_id, after))

    def _judge(self, run: RunState, started: float) -> None:
        """Finish the run's checks, count it, and report it as a ``RUN`` request (or ``CUT``
        when a direct-mode server declined its resume)."""
        assert run.run_id is not None
        checked = self.checker.runs[run.run_id]
        if self._declined(run):
            checked.cut()
        self._report(self.checker.finish_run(run.run_id))
        TALLY.add_finished_run(checked)
        elapsed_ms = (time.time() - started) * 1000
        if checked.cut_after is not None:
            fire(self.environment, "CUT", run.agent, elapsed_ms, checked.lost_by_design)
        elif run.done.is_set():
            fire(self.environment, "RUN", run.agent, elapsed_ms)
        if checked.terminal_seen and self.conn is not None:
            self._send(wire.ack(run.run_id, checked.contiguous_seq))

    def _declined(self, run: RunState) -> bool:
        """True when a ``delivery_mode`` direct server declined the run's ``resume``."""
        code = run.error.get("code") if run.error is not None else None
        return self.direct and code in DECLINED_RESUME

    def _connect(self, node: int) -> None:
        """Open a socket for this user on ``node`` (token as query parameter), reported as
        ``CONN``."""
        url = wire.url_with_token(self.urls[node], self._mint())
        began = time.perf_counter()
        try:
            self.conn = Connection(url, self._on_frame, self._on_close)
        except (websocket.WebSocketException, OSError) as exc:
            fire(self.environment, "CONN", "connect", (time.perf_counter() - began) * 1000, exc=exc)
            self.conn = None
            raise
        fire(self.environment, "CONN", "connect", (time.perf_counter() - began) * 1000)
        self.node = node
        if self.per_node:
            TALLY.add_node(node, "connections")
        self._stop_refreshing()
        self.refresher = gevent.spawn(self._keep_token_fresh, self.conn)

    def _mint(self) -> str:
        """A new token for this user (``--token-ttl-s``); notes when to replace it."""
        ttl = options(self.environment).token_ttl_s
        token = wire.mint_token(os.environ.get("REGISTRY_AUTH_SECRET", ""), self.user_id, ttl)
        exp = float(jwt.decode(token, options={"verify_signature": False})["exp"])
        self.refresh_at = exp - refresh_margin(exp - time.time())
        return token

    def _keep_token_fresh(self, conn: Connection) -> None:
        """Greenlet of one socket: send ``refresh`` with a new token before the token expires
        (the server closes the socket at ``exp`` with 4001 otherwise)."""
        while conn.alive:
            gevent.sleep(max(0.0, self.refresh_at - time.time()))
            if conn.alive:
                self.refresh_sent_at = time.time()
                self._send({"type": "refresh", "token": self._mint()})

    def _stop_refreshing(self) -> None:
        if self.refresher is not None:
            self.refresher.kill(block=False)
            self.refresher = None

    def _send(self, frame: dict[str, Any]) -> None:
        """Send a frame; a dead socket is noticed by the reader."""
        try:
            if self.conn is not None:
                self.conn.send(frame)
        except (websocket.WebSocketException, OSError):
            log.debug("send failed on %s", self.user_id)

    def _on_close(self) -> None:
        """The socket ended on its own (server close, reset): resume if a run is in flight."""
        TALLY.counts["unexpected_closes"] += 1
        if self.current is not None:
            self.current.broken.set()

    def _on_frame(self, frame: dict[str, Any], received_at: float, size: int) -> bool:
        """Handle one frame in the reader greenlet; False stops reading (planned drop)."""
        if wire.is_event(frame) and isinstance(frame.get("ts"), int | float):
            latency_ms = (received_at - frame["ts"]) * 1000
            fire(self.environment, "WS", frame["type"], latency_ms, size)
            away = self.node != self.home
            (OTHER_NODE_SAMPLES if away else SAMPLES).record(frame["type"], received_at, latency_ms)
            if self.per_node:
                TALLY.add_node(self.node, "events")
        self._report(self.checker.on_frame(frame))
        if frame.get("type") == "refreshed" or frame.get("field") == "token":
            self._refreshed(frame)
        run = self.current
        return True if run is None else self._track(run, frame)

    def _track(self, run: RunState, frame: dict[str, Any]) -> bool:
        """Update the run in flight from one frame; False asks for a planned drop."""
        ftype = frame.get("type")
        if ftype == "run_accepted" and frame.get("request_id") == run.request_id:
            run.run_id = frame.get("run_id")
            run.accepted.set()
        elif ftype == "error" and frame.get("request_id") == run.request_id:
            run.error = frame
            run.accepted.set()
        elif ftype == "error" and run.run_id is not None and frame.get("run_id") == run.run_id:
            self._run_error(run, frame)
        elif wire.is_event(frame) and run.run_id is not None and frame.get("run_id") == run.run_id:
            return self._on_run_event(run)
        return True

    def _run_error(self, run: RunState, frame: dict[str, Any]) -> None:
        """An ``error`` about the run in flight: the answer to its ``resume`` ends the wait
        (the run is lost, or cut in direct mode); any other is reported as ``ERROR <code>``."""
        if run.resuming:
            run.error = frame
            run.done.set()
            if not self._declined(run):
                fire(self.environment, "ERROR", str(frame.get("code")), 0,
                     exc=RuntimeError(f"resume answered {frame.get('code')}"))
        else:
            fire(self.environment, "ERROR", str(frame.get("code")), 0,
                 exc=RuntimeError(str(frame.get("message"))[:200]))

    def _refreshed(self, frame: dict[str, Any]) -> None:
        """Report the answer to a ``refresh`` as a ``TOKEN refresh`` request."""
        sent, self.refresh_sent_at = self.refresh_sent_at, None
        ms = 0.0 if sent is None else (time.time() - sent) * 1000
        refused = RefreshRefused(str(frame.get("message"))) if frame["type"] == "error" else None
        fire(self.environment, "TOKEN", "refresh", ms, exc=refused)

    def _on_run_event(self, run: RunState) -> bool:
        """Count an event of the run in flight: ack, end, or a planned drop."""
        assert run.run_id is not None
        checked = self.checker.runs[run.run_id]
        run.received += 1
        run.resuming = False
        if checked.terminal_seen:
            run.done.set()
        elif run.received % ACK_EVERY == 0:
            self._send(wire.ack(run.run_id, checked.contiguous_seq))
        if run.drop_at is not None and run.received >= run.drop_at and not run.done.is_set():
            run.drop_at = None
            TALLY.counts["drops"] += 1
            run.broken.set()
            return False
        return True

    def _report(self, found: list[Violation]) -> None:
        """Report each violation as a Locust failure named by its kind."""
        TALLY.add_violations(found)
        for violation in found:
            detail = f"run {violation.run_id[:12]} seq {violation.seq}: {violation.detail}"
            fire(self.environment, "VIOLATION", violation.kind.value, 0, exc=ViolationError(detail))


def _send_tally(client_id: str, data: dict[str, Any], **_: Any) -> None:
    """On a worker: piggyback what changed in the tally on the periodic stats report."""
    data["loadtest_tally"] = TALLY.take_delta()


def _sum_tally(client_id: str, data: dict[str, Any], **_: Any) -> None:
    """On the master: add a worker's tally delta."""
    MASTER_TALLY.merge(data.get("loadtest_tally", {}))


def _write_on_stop(environment: Environment, **_: Any) -> None:
    """Write this process's tally and samples when a test stops."""
    write_events(environment)


def _judge_on_quit(environment: Environment, **_: Any) -> None:
    """Set the exit code from the SLOs (master or local runner only)."""
    if isinstance(environment.runner, WorkerRunner):
        write_events(environment)
        return
    if not isinstance(environment.runner, MasterRunner):
        write_events(environment)
    tally = MASTER_TALLY if isinstance(environment.runner, MasterRunner) else TALLY
    problems = slo_problems(environment, tally)
    for problem in problems:
        log.error("SLO failed: %s", problem)
    if not problems:
        log.info("SLOs met: no violation, every event delivered, latency within thresholds")
    environment.process_exit_code = 1 if problems else 0


def write_events(environment: Environment) -> None:
    """Write ``events-<pid>.json`` into ``--events-out`` when this process ran users."""
    out = environment.parsed_options.events_out if environment.parsed_options else ""
    if not out or isinstance(environment.runner, MasterRunner):
        return
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "pid": os.getpid(),
        "written_at": time.time(),
        "tally": TALLY.to_dict(),
        "samples": SAMPLES.to_dict(),
        "samples_other_node": OTHER_NODE_SAMPLES.to_dict(),
    }
    tmp = folder / f".events-{os.getpid()}.json.tmp"
    tmp.write_text(json.dumps(data))
    tmp.replace(folder / f"events-{os.getpid()}.json")


def ws_latency(environment: Environment) -> StatsEntry:
    """Return one stats entry merging every ``WS`` (event delivery) entry."""
    merged = StatsEntry(environment.stats, "all events", "WS", use_response_times_cache=False)
    for entry in environment.stats.entries.values():
        if entry.method == "WS":
            merged.extend(entry)
    return merged


def slo_problems(environment: Environment, tally: Tally) -> list[str]:
    """Return why the test failed its SLOs (empty when it passed)."""
    opts = options(environment)
    problems = []
    failures = environment.stats.total.num_failures
    if opts.delivery_mode == "direct":
        failures -= sum(
            entry.num_failures
            for entry in environment.stats.entries.values()
            if entry.method == "VIOLATION" and entry.name in TOLERATED_IN_DIRECT_MODE
        )
    if failures:
        problems.append(f"{failures} failures (see Failures)")
    expected, delivered = tally.counts["events_expected"], tally.counts["events_delivered"]
    if delivered < expected and opts.delivery_mode != "direct":
        problems.append(f"delivery {delivered}/{expected} = {delivered / expected:.4%} < 100%")
    latency = ws_latency(environment)
    if latency.num_requests == 0:
        return [*problems, "no run event was delivered"]
    for name, fraction, limit in (("p95", 0.95, opts.p95_ms), ("p99", 0.99, opts.p99_ms)):
        value = latency.get_response_time_percentile(fraction)
        if value > limit:
            problems.append(f"{name} delivery latency {value:.0f} ms > {limit:.0f} ms")
    return problems


# locust's EventHook.add_listener is unannotated; register explicitly, without decorators.
for _hook, _listener in (
    (events.init_command_line_parser, _add_options),
    (events.report_to_master, _send_tally),
    (events.worker_report, _sum_tally),
    (events.test_stop, _write_on_stop),
    (events.quitting, _judge_on_quit),
):
    _hook.add_listener(_listener)  # type: ignore[no-untyped-call]
