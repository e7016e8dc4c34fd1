"""Multi-node load tests: users spread over the nodes, every resume on another node, the
throw-away Redis, and the per-node counts of the tally."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loadtests import cluster
from loadtests.nodes import home_node, node_label, parse_node_urls, resume_node, spread
from loadtests.tally import Tally

URLS = ["ws://127.0.0.1:1001/ws", "ws://127.0.0.1:1002/ws", "ws://127.0.0.1:1003/ws"]


@given(st.integers(1, 9), st.integers(0, 1000), st.integers(0, 5000))
def test_users_are_spread_evenly_over_the_nodes(nodes: int, users: int, first: int) -> None:
    counts = spread(users, nodes, first)
    assert sum(counts) == users
    assert max(counts) - min(counts) <= 1


def test_consecutive_users_cover_every_node_once() -> None:
    assert [home_node(n, 3) for n in range(6)] == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError):
        home_node(0, 0)


@given(st.integers(2, 9), st.data(), st.integers(0, 2**32))
def test_a_resume_never_goes_back_to_the_node_it_dropped_from(
    nodes: int, data: st.DataObject, seed: int
) -> None:
    current = data.draw(st.integers(0, nodes - 1))
    target = resume_node(current, nodes, random.Random(seed))
    assert 0 <= target < nodes
    assert target != current


def test_resumes_reach_every_other_node() -> None:
    rng = random.Random(7)
    assert {resume_node(1, 4, rng) for _ in range(200)} == {0, 2, 3}


def test_one_node_resumes_where_it_was_and_bad_nodes_are_refused() -> None:
    assert resume_node(0, 1, random.Random()) == 0
    with pytest.raises(ValueError):
        resume_node(3, 3, random.Random())


def test_node_urls_default_to_the_host_and_are_labelled() -> None:
    assert parse_node_urls("", URLS[0]) == [URLS[0]]
    assert parse_node_urls(" , ".join(URLS), "ws://other/ws") == URLS
    with pytest.raises(ValueError):
        parse_node_urls(" ,", "")
    assert node_label(2, URLS) == "node2 (127.0.0.1:1003)"


def test_per_node_counts_travel_in_deltas_and_files() -> None:
    worker, master = Tally(), Tally()
    worker.add_node(0, "connections")
    worker.add_node(2, "events", 5)
    master.merge(worker.take_delta())
    worker.add_node(2, "events", 3)
    master.merge(worker.take_delta())
    assert master.by_node() == {
        0: {"connections": 1, "runs_started": 0, "events": 0, "resumes_in": 0},
        2: {"connections": 0, "runs_started": 0, "events": 8, "resumes_in": 0},
    }
    again = Tally()
    again.merge(master.to_dict())
    assert again.by_node() == master.by_node()


def test_a_single_node_tally_file_is_unchanged() -> None:
    assert set(Tally().to_dict()) == {"counts", "violations"}


def test_redis_missing_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(cluster.RedisNotInstalled, match="apt-get install redis-server"):
        cluster.start_redis(tmp_path / "redis.log", binary="no-such-redis-server")


def test_redis_runs_without_persistence_from_a_temporary_folder(tmp_path: Path) -> None:
    cmd = cluster.redis_cmd("redis-server", 7000, tmp_path)
    assert cmd[cmd.index("--save") + 1] == ""
    assert cmd[cmd.index("--appendonly") + 1] == "no"
    assert cmd[cmd.index("--dir") + 1] == str(tmp_path)
    assert cluster.node_cmd(["serve"], "redis://x:1/0") == [
        "serve", "--port", "0", "--redis-url", "redis://x:1/0",
    ]
    assert cluster.node_cmd(["serve"], None) == ["serve", "--port", "0"]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_a_real_redis_starts_answers_and_stops_cleanly(tmp_path: Path) -> None:
    redis = cluster.start_redis(tmp_path / "redis.log")
    try:
        assert cluster._pong(redis.port)
        assert redis.url == f"redis://127.0.0.1:{redis.port}/0"
    finally:
        code = redis.stop()
    assert code == 0
    assert not redis.folder.exists()
    assert not cluster._pong(redis.port)
