"""PROTOCOL.md v2, "Operations over HTTP": /healthz, /readyz, /metrics, /dashboard on the /ws port.

Every request goes over a real socket to a server running in the test's trio run. The HTTP
client is a few lines of h11 (the server's own dependency). Waits on server-side effects poll
``/metrics`` or ``/readyz`` (each poll is a real request), bounded by ``fail_after``; nothing
sleeps to wait.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final

import attrs
import h11
import pytest
import trio
import wsproto.events as wse
from prometheus_client.parser import text_string_to_metric_families

from tests.harness._support import (
    HOST,
    TIMEOUT,
    Client,
    Server,
    check_run,
    connect,
    open_server,
    raw_connect,
    scripted,
    strict_json,
    token,
)

METRICS_TOKEN: Final = "ops-" + uuid.uuid4().hex
ROUTES: Final = ("/healthz", "/readyz", "/metrics", "/dashboard", "/dashboard/data")
GUARDED: Final = ("/metrics", "/dashboard", "/dashboard/data")
#: The figures PROTOCOL.md v2 requires the dashboard to show, each in a ``data-metric`` element.
DASHBOARD_FIGURES: Final = ("runs_active", "connections_active", "events_per_second",
                            "delivery_p95_ms", "events_failed")
#: The contract's table: family name -> (type, label names).
FAMILIES: Final[Mapping[str, tuple[str, frozenset[str]]]] = {
    "registry_runs_started_total": ("counter", frozenset()),
    "registry_runs_completed_total": ("counter", frozenset({"status"})),
    "registry_runs_active": ("gauge", frozenset()),
    "registry_retained_runs": ("gauge", frozenset()),
    "registry_connections_active": ("gauge", frozenset()),
    "registry_connections_closed_total": ("counter", frozenset({"code"})),
    "registry_events_emitted_total": ("counter", frozenset()),
    "registry_events_delivered_total": ("counter", frozenset()),
    "registry_events_retried_total": ("counter", frozenset()),
    "registry_events_failed_total": ("counter", frozenset()),
    "registry_event_delivery_seconds": ("histogram", frozenset()),
    "registry_resumes_total": ("counter", frozenset({"outcome"})),
    "registry_dedup_hits_total": ("counter", frozenset()),
    "registry_errors_total": ("counter", frozenset({"code"})),
}
LONG: Final = scripted(tools=1, tokens=1, delay_ms=60000)  # agent_started, then a minute's wait


# ================================================================ HTTP client
@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def json(self) -> Any:
        assert self.content_type.startswith("application/json"), self
        return strict_json(self.body)


async def http(server: Server, target: str, method: str = "GET",
               headers: Iterable[tuple[str, str]] = ()) -> Answer:
    """One request on a fresh connection (the server answers and closes)."""
    conn = h11.Connection(h11.CLIENT)
    head = [("host", f"{HOST}:{server.port}"), *headers]
    if not any(name == "connection" for name, _ in head):
        head.append(("connection", "close"))
    if method != "GET":
        head.append(("content-length", "0"))
    with trio.fail_after(TIMEOUT):
        async with await trio.open_tcp_stream(HOST, server.port) as stream:
            await stream.send_all(conn.send(h11.Request(method=method, target=target,
                                                        headers=head)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            response, body = None, bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some())
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
    assert response is not None
    return Answer(response.status_code,
                  {k.decode(): v.decode() for k, v in response.headers}, bytes(body))


def bearer(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


async def poll(probe: Callable[[], Awaitable[Any]], done: Callable[[Any], bool]) -> Any:
    """Repeats ``probe`` (a real request each time) until ``done`` accepts its answer."""
    with trio.fail_after(TIMEOUT):
        while not done(answer := await probe()):
            pass
    return answer


# ============================================================ Prometheus text
@attrs.frozen
class Scrape:
    text: str
    #: ``# TYPE`` lines: family name -> type.
    types: dict[str, str]
    #: (sample name, sorted labels) -> value.
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]

    def value(self, name: str, **labels: str) -> float:
        """A sample's value; 0 for a labelled counter child that does not exist yet."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def label_names(self, family: str) -> set[str]:
        suffixes = ("", "_bucket", "_count", "_sum") if self.types[family] == "histogram" else ("",)
        names = {family + s for s in suffixes}
        return {label for (name, labels) in self.samples if name in names
                for label, _ in labels if label != "le"}

    def children(self, family: str) -> list[dict[str, str]]:
        return [dict(labels) for (name, labels) in self.samples if name == family]


def parse(text: str) -> Scrape:
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE))
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return Scrape(text, types, samples)


async def scrape(server: Server) -> Scrape:
    answer = await http(server, "/metrics")
    assert answer.status == 200, answer
    return parse(answer.body.decode())


async def dashboard_data(server: Server) -> dict[str, Any]:
    answer = await http(server, "/dashboard/data")
    assert answer.status == 200, answer
    data: dict[str, Any] = answer.json()
    return data


def data_metrics(html: str) -> list[str]:
    return re.findall(r'data-metric="([^"]+)"', html)


# ================================================================ the routes
async def test_healthz_answers_ok() -> None:
    async with open_server() as server:
        answer = await http(server, "/healthz")
    assert answer.status == 200
    assert answer.json() == {"status": "ok"}


async def test_readyz_answers_ready_when_runs_are_accepted() -> None:
    async with open_server() as server:
        answer = await http(server, "/readyz")
    assert answer.status == 200
    assert answer.json() == {"status": "ready"}


async def test_readyz_is_degraded_at_max_active_runs_and_ready_again_after() -> None:
    async with open_server(max_active_runs=3) as server, connect(server) as client:
        runs = [(await client.start(context=LONG))["run_id"]]
        runs += [(await client.start(context=LONG))["run_id"]]
        below = await http(server, "/readyz")
        runs += [(await client.start(context=LONG))["run_id"]]
        at_limit = await http(server, "/readyz")
        refused = await client.request(client.start_frame(context=LONG))
        for run_id in runs:
            await client.send({"type": "cancel", "run_id": run_id})
        ready = await poll(lambda: http(server, "/readyz"), lambda a: a.status == 200)
    assert (below.status, below.json()) == (200, {"status": "ready"})
    assert at_limit.status == 503
    body = at_limit.json()
    assert body.keys() == {"status", "reasons"}
    assert body["status"] == "degraded"
    assert body["reasons"] and all(isinstance(r, str) and r for r in body["reasons"])
    assert refused["type"] == "error" and refused["code"] == "overloaded"
    assert ready.json() == {"status": "ready"}


async def test_readyz_is_draining_once_shutdown_starts_while_health_stays_ok() -> None:
    async with open_server(shutdown_grace_s=3.0) as server, raw_connect(server) as raw:
        await raw.send(wse.TextMessage(json.dumps({
            "type": "start_agent", "request_id": "drain-1", "agent": "scripted",
            "message": "hi", "context": LONG})))
        assert (await raw.next_text())["type"] == "run_accepted"
        assert (await raw.next_text())["type"] == "agent_started"
        assert (await http(server, "/readyz")).status == 200
        assert server.stop is not None
        server.stop.set()
        # ``raw`` does not read, so it never answers the 1001: the grace lasts its 3 s.
        draining = await poll(lambda: http(server, "/readyz"), lambda a: a.status != 200)
        health = await http(server, "/healthz")
        upgrade = await http(server, "/ws", headers=_upgrade_headers())
    assert draining.status == 503
    body = draining.json()
    assert body["status"] == "draining"
    assert body["reasons"] and all(isinstance(r, str) and r for r in body["reasons"])
    assert (health.status, health.json()) == (200, {"status": "ok"})
    assert upgrade.status == 503


def _upgrade_headers() -> list[tuple[str, str]]:
    return [("upgrade", "websocket"), ("connection", "Upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="), ("sec-websocket-version", "13"),
            *bearer(token("alice"))]


async def test_metrics_is_prometheus_text_format_0_0_4() -> None:
    async with open_server() as server:
        answer = await http(server, "/metrics")
    assert answer.status == 200
    assert re.fullmatch(r"text/plain; ?version=0\.0\.4(; ?charset=utf-8)?", answer.content_type)
    families = {f.name: f for f in text_string_to_metric_families(answer.body.decode())}
    collections = sum(s.value for s in families["registry_gc_collections"].samples)
    pauses = {s.name: s.value for s in families["registry_gc_pause_duration_seconds"].samples
              if s.labels.get("le") in (None, "+Inf")}
    # start-up's own collection at least; every one in the pause histogram too
    assert collections >= 1
    assert pauses["registry_gc_pause_duration_seconds_count"] == collections
    assert pauses["registry_gc_pause_duration_seconds_bucket"] == collections


async def test_dashboard_is_html_with_every_required_figure() -> None:
    async with open_server() as server:
        answer = await http(server, "/dashboard")
    assert answer.status == 200
    assert answer.content_type.startswith("text/html")
    html = answer.body.decode()
    names = data_metrics(html)
    assert len(names) == len(set(names)), f"a data-metric appears twice: {names}"
    for name in DASHBOARD_FIGURES:
        assert name in names, f"no element with data-metric={name!r}"


async def test_dashboard_is_self_contained() -> None:
    async with open_server() as server:
        html = (await http(server, "/dashboard")).body.decode()
    lowered = html.lower()
    for needle in ("http://", "https://", "//cdn", "ws://", "wss://", "@import"):
        assert needle not in lowered, f"the page refers to {needle!r}"
    for attribute in re.findall(r"""\b(?:src|href|action)\s*=\s*["']?([^"'\s>]*)""", lowered):
        assert not re.match(r"[a-z][a-z0-9+.-]*:|//", attribute) or attribute.startswith(
            ("data:", "#")), f"the page loads {attribute!r} from elsewhere"


async def test_dashboard_data_has_every_figure_of_the_page_as_a_number_or_null() -> None:
    async with open_server() as server:
        html = (await http(server, "/dashboard")).body.decode()
        data = await dashboard_data(server)
    for name in data_metrics(html):
        assert name in data, f"/dashboard/data lacks {name!r} shown by the page"
        value = data[name]
        assert value is None or (isinstance(value, int | float) and not isinstance(value, bool)), (
            name, value)
    assert data["status"] == "ready"
    assert data["reasons"] == []
    assert isinstance(data["history"], list)
    for point in data["history"]:
        assert isinstance(point, dict) and isinstance(point.get("ts"), int | float), point


@pytest.mark.parametrize("path", ["/", "/nope", "/metrics/x", "/healthz/extra", "/ws/x",
                                  "/dashboard.html", "/favicon.ico"])
async def test_an_unknown_path_is_404(path: str) -> None:
    async with open_server(metrics_token=METRICS_TOKEN) as server:
        answer = await http(server, path, headers=bearer(METRICS_TOKEN))
    assert answer.status == 404


async def test_another_method_on_every_route_is_405() -> None:
    async with open_server() as server:
        statuses = {(path, method): (await http(server, path, method)).status
                    for path in (*ROUTES, "/ws") for method in ("POST", "PUT", "DELETE")}
    assert statuses == dict.fromkeys(statuses, 405)


async def test_get_ws_without_an_upgrade_is_426() -> None:
    async with open_server() as server:
        answer = await http(server, "/ws", headers=bearer(token("alice")))
    assert answer.status == 426


# ============================================================ metrics_token
async def test_metrics_token_guards_metrics_and_dashboard_but_not_health() -> None:
    wrong = METRICS_TOKEN + "x"
    async with open_server(metrics_token=METRICS_TOKEN) as server:
        got = {}
        for path in GUARDED:
            got[path, "none"] = await http(server, path)
            got[path, "wrong header"] = await http(server, path, headers=bearer(wrong))
            got[path, "wrong query"] = await http(server, f"{path}?token={wrong}")
            got[path, "user jwt"] = await http(server, path, headers=bearer(token("alice")))
            got[path, "header"] = await http(server, path, headers=bearer(METRICS_TOKEN))
            got[path, "query"] = await http(server, f"{path}?token={METRICS_TOKEN}")
        for path in ("/healthz", "/readyz"):
            got[path, "none"] = await http(server, path)
    statuses = {key: answer.status for key, answer in got.items()}
    expected = {key: 200 if key[1] in ("header", "query", ) or key[0] in ("/healthz", "/readyz")
                else 401 for key in got}
    assert statuses == expected
    for key, answer in got.items():
        assert METRICS_TOKEN.encode() not in answer.body, key


# ============================================================ metric families
async def test_every_metric_family_of_the_contract_has_its_name_type_and_labels() -> None:
    async with open_server() as server:
        async with connect(server) as client:  # an error frame and a close: labelled children
            await client.request({"type": "bogus"})
            run_id = (await client.start(context=scripted()))["run_id"]
            await client.run_events(run_id)
        metrics = await poll(lambda: scrape(server),
                             lambda s: s.value("registry_connections_active") == 0)
    for family, (kind, labels) in FAMILIES.items():
        assert metrics.types.get(family) == kind, f"{family}: # TYPE {metrics.types.get(family)}"
        assert metrics.label_names(family) == labels, family
    assert {c["status"] for c in metrics.children("registry_runs_completed_total")} >= {
        "succeeded"}
    bucket = "registry_event_delivery_seconds_bucket"
    buckets = sorted((float(dict(labels)["le"]), value)
                     for (name, labels), value in metrics.samples.items() if name == bucket)
    assert buckets[-1] == (float("inf"), metrics.value("registry_event_delivery_seconds_count"))
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)


async def test_no_label_and_no_dashboard_figure_carries_an_id_or_message_text() -> None:
    tag = uuid.uuid4().hex[:12]
    user, request_id, thread_id, message = (f"user{tag}", f"req{tag}", f"thread{tag}",
                                            f"secret message {tag}")
    async with open_server() as server, connect(server, user) as client:
        accepted = await client.start(message=message, request_id=request_id,
                                      thread_id=thread_id, context=scripted())
        await client.run_events(accepted["run_id"])
        await client.request(client.start_frame("no-such-agent", message,
                                                request_id=f"{request_id}b"))
        await client.request({"type": "resume", "run_id": f"run{tag}", "after_seq": 0})
        exposition = (await scrape(server)).text
        data = (await http(server, "/dashboard/data")).body.decode()
    for secret in (user, request_id, thread_id, message, tag, accepted["run_id"]):
        assert secret not in exposition, f"/metrics carries {secret!r}"
        assert secret not in data, f"/dashboard/data carries {secret!r}"


# ============================================================ exact accounting
COUNTED: Final[tuple[tuple[str, dict[str, str]], ...]] = (
    ("registry_runs_started_total", {}),
    ("registry_runs_completed_total", {"status": "succeeded"}),
    ("registry_runs_completed_total", {"status": "failed"}),
    ("registry_runs_completed_total", {"status": "cancelled"}),
    ("registry_events_emitted_total", {}),
    ("registry_events_delivered_total", {}),
    ("registry_event_delivery_seconds_count", {}),
    ("registry_events_failed_total", {}),
    ("registry_dedup_hits_total", {}),
    ("registry_resumes_total", {"outcome": "ok"}),
    ("registry_resumes_total", {"outcome": "not_found"}),
    ("registry_resumes_total", {"outcome": "resume_unavailable"}),
    ("registry_errors_total", {"code": "unknown_type"}),
    ("registry_errors_total", {"code": "not_found"}),
    ("registry_errors_total", {"code": "resume_unavailable"}),
    ("registry_errors_total", {"code": "invalid_field"}),
    ("registry_connections_closed_total", {"code": "1000"}),
    ("registry_connections_closed_total", {"code": "4008"}),
    ("registry_connections_closed_total", {"code": "1001"}),
    ("registry_connections_active", {}),
    ("registry_runs_active", {}),
)


def deltas(before: Scrape, after: Scrape) -> dict[str, float]:
    return {f"{name}{labels or ''}": after.value(name, **labels) - before.value(name, **labels)
            for name, labels in COUNTED}


@attrs.define
class Traffic:
    """What the clients of :func:`known_traffic` did and saw."""

    runs: int = 0
    emitted: int = 0
    delivered: int = 0  # event frames the clients received
    closed_1000: int = 0


async def _chat(client: Client, traffic: Traffic, tools: int, tokens: int) -> tuple[str, str, int]:
    frame = client.start_frame(context=scripted(tools=tools, tokens=tokens))
    accepted = await client.request(frame)
    assert accepted["type"] == "run_accepted" and accepted["duplicate"] is False, accepted
    events = await client.run_events(accepted["run_id"])
    assert check_run(events)["status"] == "succeeded"
    assert len(events) == 3 + 2 * tools + tokens
    traffic.runs += 1
    traffic.emitted += len(events)
    traffic.delivered += len(events)
    return accepted["run_id"], frame["request_id"], len(events)


async def known_traffic(server: Server, traffic: Traffic) -> None:
    """N runs, D duplicates, one resume of each outcome, one unknown_type, closes 1000 and 4008."""
    async with connect(server, "ann") as ann, connect(server, "bob") as bob:
        traffic.closed_1000 += 2
        chats = [await _chat(ann, traffic, 2, 5), await _chat(ann, traffic, 0, 0),
                 await _chat(bob, traffic, 1, 7)]
        for run_id, request_id, _ in chats[:2]:  # D = 2 duplicates
            again = await ann.request(ann.start_frame(request_id=request_id, context=scripted()))
            assert (again["run_id"], again["duplicate"]) == (run_id, True), again
        (first, _, n_first), (second, _, _), _ = chats
        # resume ok on a new socket: replays the last two events
        async with connect(server, "ann") as late:
            traffic.closed_1000 += 1
            await late.send({"type": "resume", "run_id": first, "after_seq": n_first - 2})
            replay = await late.run_events(first)
            assert [e["seq"] for e in replay] == [n_first - 1, n_first]
            traffic.delivered += len(replay)
            await late.assert_quiet()
        # resume of a run that does not exist (for bob: it is ann's)
        missing = await bob.request({"type": "resume", "run_id": first, "after_seq": 0})
        assert (missing["type"], missing["code"]) == ("error", "not_found"), missing
        # ack trims the first 3 events of ``second``; a resume from 1 is then unavailable
        await ann.send({"type": "ack", "run_id": second, "seq": 3})
        gone = await ann.request({"type": "resume", "run_id": second, "after_seq": 1})
        assert (gone["type"], gone["code"]) == ("error", "resume_unavailable"), gone
        unknown = await ann.request({"type": "no-such-type"})
        assert (unknown["type"], unknown["code"]) == ("error", "unknown_type"), unknown
        await ann.assert_quiet()
        await bob.assert_quiet()
    await _overflow(server)


async def _overflow(server: Server) -> None:
    """A socket that sends pings and never reads its pongs: closed with 4008."""
    async with connect(server, "cat") as flooder:
        big_id = "p" * 3000
        for _ in range(1500):
            await flooder.send({"type": "ping", "id": big_id})
        code, frames = await flooder.until_closed()
    assert code == 4008
    assert frames and all(f == {"type": "pong", "id": big_id} for f in frames)


async def test_metrics_follow_a_known_traffic_exactly() -> None:
    async with open_server(max_queued_messages=40) as server:
        before = await scrape(server)
        traffic = Traffic()
        await known_traffic(server, traffic)
        after = await poll(lambda: scrape(server), lambda s: (
            s.value("registry_connections_active") == before.value("registry_connections_active")
            and s.value("registry_runs_active") == before.value("registry_runs_active")))
        data = await dashboard_data(server)
    expected = {
        "registry_runs_started_total": traffic.runs,
        "registry_runs_completed_total{'status': 'succeeded'}": traffic.runs,
        "registry_runs_completed_total{'status': 'failed'}": 0,
        "registry_runs_completed_total{'status': 'cancelled'}": 0,
        "registry_events_emitted_total": traffic.emitted,
        "registry_events_delivered_total": traffic.delivered,
        "registry_event_delivery_seconds_count": traffic.delivered,
        "registry_events_failed_total": 0,
        "registry_dedup_hits_total": 2,
        "registry_resumes_total{'outcome': 'ok'}": 1,
        "registry_resumes_total{'outcome': 'not_found'}": 1,
        "registry_resumes_total{'outcome': 'resume_unavailable'}": 1,
        "registry_errors_total{'code': 'unknown_type'}": 1,
        "registry_errors_total{'code': 'not_found'}": 1,
        "registry_errors_total{'code': 'resume_unavailable'}": 1,
        "registry_errors_total{'code': 'invalid_field'}": 0,
        "registry_connections_closed_total{'code': '1000'}": traffic.closed_1000,
        "registry_connections_closed_total{'code': '4008'}": 1,
        "registry_connections_closed_total{'code': '1001'}": 0,
        "registry_connections_active": 0,
        "registry_runs_active": 0,
    }
    assert deltas(before, after) == expected
    assert after.value("registry_retained_runs") - before.value("registry_retained_runs") == 3
    assert after.value("registry_event_delivery_seconds_sum") > before.value(
        "registry_event_delivery_seconds_sum")
    assert (data["runs_active"], data["connections_active"], data["events_failed"]) == (0, 0, 0)
    assert data["closes_4008"] == 1
    assert data["runs_started"] == after.value("registry_runs_started_total")


async def test_dashboard_figures_agree_with_the_metrics_while_runs_are_in_flight() -> None:
    async with open_server() as server, connect(server) as one, connect(server) as two:
        ended = (await one.start(context=scripted()))["run_id"]
        await one.run_events(ended)
        for client in (one, two):
            await client.start(context=LONG)
        metrics = await scrape(server)
        data = await dashboard_data(server)
    assert data["runs_active"] == metrics.value("registry_runs_active") == 2
    assert data["connections_active"] == metrics.value("registry_connections_active") == 2
    assert data["runs_started"] == metrics.value("registry_runs_started_total") == 3
    assert data["events_failed"] == metrics.value("registry_events_failed_total") == 0
    # "Retained runs" on the page is the registry_retained_runs gauge: ended runs kept for resume
    assert data["retained_runs"] == metrics.value("registry_retained_runs") == 1


async def test_resume_outcomes_are_only_the_three_of_the_contract() -> None:
    """A resume refused as ``invalid_field`` is an error frame, not a fourth resume outcome."""
    async with open_server() as server, connect(server) as client:
        run_id = (await client.start(context=scripted()))["run_id"]
        await client.run_events(run_id)
        beyond = await client.request({"type": "resume", "run_id": run_id, "after_seq": 99})
        metrics = await scrape(server)
    assert (beyond["code"], beyond["field"]) == ("invalid_field", "after_seq")
    assert metrics.value("registry_errors_total", code="invalid_field") == 1
    outcomes = {child["outcome"] for child in metrics.children("registry_resumes_total")}
    assert outcomes <= {"ok", "not_found", "resume_unavailable"}, outcomes
