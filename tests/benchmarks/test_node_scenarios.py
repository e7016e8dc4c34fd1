"""The node scenario's orchestration without servers (the measurements replaced by fakes): the
services it measures, the ramp's stop rule, the missing redis-server; and how the lean generator
spreads its sockets over the nodes."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from benchmarks import leangen, node_scenarios, redisinfo
from benchmarks.session import SMOKE, Bench, Load, ScenarioError


@pytest.fixture
def bench(tmp_path: Path) -> Bench:
    return Bench(SMOKE, tmp_path, tmp_path, {})


def step(offered: float, achieved: float, p99: float) -> dict[str, Any]:
    return {"offered_rate": offered, "achieved_rate": achieved,
            "latency_ms": {"p50": 1.0, "p99": p99}, "tally": {"violations": {}}, "errors": {}}


def test_without_redis_server_only_the_node_in_memory_is_measured(
    bench: Bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured: list[tuple[str, int, object]] = []

    def fake(bench: Bench, key: str, *, count: int, redis: object) -> dict[str, Any]:
        measured.append((key, count, redis))
        return {"nodes": count, "max_sustained_rate": 1.0}

    monkeypatch.setattr("benchmarks.node_scenarios.shutil.which", lambda name: None)
    monkeypatch.setattr(node_scenarios, "measure_service", fake)
    got = node_scenarios.nodes(bench)
    assert measured == [("memory-1", 1, None)]
    assert list(got["services"]) == ["memory-1"]
    assert got["skipped"] == {f"redis-{n}": node_scenarios.NO_REDIS for n in (1, 2, 3)}
    assert got["redis_version"] is None
    assert bench.failures == []


def test_with_redis_every_service_shares_one_redis_that_is_stopped_after(
    bench: Bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis = FakeRedis()
    measured: list[tuple[str, int, object]] = []

    def fake(bench: Bench, key: str, *, count: int, redis: object) -> dict[str, Any]:
        measured.append((key, count, redis))
        if key == "redis-2":
            raise ScenarioError("generator failed")
        return {"nodes": count}

    monkeypatch.setattr("benchmarks.node_scenarios.shutil.which",
                        lambda name: "/usr/bin/redis-server")
    monkeypatch.setattr(node_scenarios, "redis_version", lambda binary: "7.0")
    monkeypatch.setattr(node_scenarios, "start_redis", lambda log: redis)
    monkeypatch.setattr(node_scenarios, "measure_service", fake)
    got = node_scenarios.nodes(bench)
    assert measured == [("memory-1", 1, None), ("redis-1", 1, redis), ("redis-2", 2, redis),
                        ("redis-3", 3, redis)]
    assert list(got["services"]) == ["memory-1", "redis-1", "redis-3"]
    assert bench.failures == ["nodes redis-2: generator failed"]
    assert redis.stopped == 1


class FakeRedis:
    stopped = 0

    def stop(self) -> int:
        self.stopped += 1
        return 0


def fake_trials(monkeypatch: pytest.MonkeyPatch, results: list[dict[str, Any]]) -> list[Load]:
    """Make ``trial`` return ``results`` in turn; return the loads it was asked for."""
    asked: list[Load] = []
    feed: Iterator[dict[str, Any]] = iter(results)

    def trial(bench: Bench, servers: object, load: Load, address: object) -> dict[str, Any]:
        asked.append(load)
        return next(feed)

    monkeypatch.setattr(node_scenarios, "trial", trial)
    return asked


def test_the_ramp_stops_at_the_first_fall_measured_twice(
    bench: Bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench.scale = attrs.evolve(SMOKE, nodes=attrs.evolve(SMOKE.nodes,
                                                         rates=(1000, 2000, 3000, 4000)))
    asked = fake_trials(monkeypatch, [
        step(1000, 900, 5.0), step(2000, 1800, 70.0), step(2000, 1800, 90.0),
    ])
    steps = node_scenarios.ramp(bench, "redis-1", [], None)
    assert [s["latency_ms"]["p99"] for s in steps] == [5.0, 70.0]
    assert [load.sockets for load in asked] == [10, 20, 20]  # 10 ms runs: R / 100 sockets


def test_a_fall_that_the_second_trial_does_not_confirm_goes_on(
    bench: Bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_trials(monkeypatch, [
        step(1000, 900, 5.0), step(3000, 1000, 5.0), step(3000, 2700, 6.0),
    ])
    steps = node_scenarios.ramp(bench, "memory-1", [], None)
    assert [s["achieved_rate"] for s in steps] == [900, 2700]  # SMOKE ramps 1000, 3000


def test_a_trial_on_redis_adds_what_redis_did_over_the_whole_trial(
    bench: Bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    readings = iter([
        redisinfo.Snapshot({"xadd": 10, "info": 1}, 11, 10, 1.0),
        redisinfo.Snapshot({"xadd": 410, "evalsha": 100, "info": 2}, 512, 212, 1.2),
    ])
    asked: list[tuple[str, int]] = []

    def read_info(host: str, port: int) -> redisinfo.Snapshot:
        asked.append((host, port))
        return next(readings)

    def leangen_run(
        self: Bench, servers: object, load: Load, *, redis: str | None
    ) -> dict[str, Any]:
        assert redis == "127.0.0.1:6390"
        return {"events_received": 400}

    monkeypatch.setattr(redisinfo, "read_info", read_info)
    monkeypatch.setattr(Bench, "leangen", leangen_run)
    got = node_scenarios.trial(bench, [], SMOKE.nodes.load, "127.0.0.1:6390")
    assert asked == [("127.0.0.1", 6390)] * 2
    assert got["redis_trial"]["commands_per_event"] == 1.25
    assert got["redis_trial"]["reads_per_event"] == 0.5
    assert got["redis_trial"]["cpu_us_per_event"] == 500.0


def test_a_redis_that_does_not_answer_fails_the_trial(
    bench: Bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(host: str, port: int) -> redisinfo.Snapshot:
        raise ConnectionRefusedError(111, "refused")

    monkeypatch.setattr(redisinfo, "read_info", refused)
    with pytest.raises(ScenarioError, match="INFO from redis"):
        node_scenarios.trial(bench, [], SMOKE.nodes.load, "127.0.0.1:6390")


def test_the_sockets_go_round_robin_over_the_nodes(tmp_path: Path) -> None:
    args = leangen.parse_args([
        "--url", "ws://127.0.0.1:1001/ws,ws://127.0.0.1:1002/ws, ws://127.0.0.1:1003/ws",
        "--server-pid", "11,12,13", "--redis", "127.0.0.1:6379", "--out",
        str(tmp_path / "x.json"),
    ])
    plan = leangen.plan_of(args)
    assert (plan.host, plan.port, plan.path) == ("127.0.0.1", 1001, "/ws")
    assert [plan.node_for(i)[1] for i in range(7)] == [1001, 1002, 1003, 1001, 1002, 1003, 1001]
    assert plan.server_pids == (11, 12, 13)
    assert plan.redis == ("127.0.0.1", 6379)
    counts = [sum(1 for i in range(1000) if plan.node_for(i)[1] == port)
              for port in (1001, 1002, 1003)]
    assert max(counts) - min(counts) <= 1


def test_one_url_and_no_redis_is_the_single_server_plan(tmp_path: Path) -> None:
    args = leangen.parse_args(["--url", "ws://127.0.0.1:1001/ws", "--server-pid", "7",
                               "--out", str(tmp_path / "x.json")])
    plan = leangen.plan_of(args)
    assert set(itertools.islice((plan.node_for(i) for i in range(5)), 5)) == {("127.0.0.1", 1001)}
    assert plan.server_pids == (7,)
    assert plan.redis is None
