"""Pure helpers of a multi-node load test: which node a user starts on, where it resumes.

A multi-node test (``python -m loadtests.run --nodes N``) runs N server processes pointed at one
Redis. Each Locust user has a *home* node, where it opens its socket and starts its runs, and
the users are spread evenly over the nodes. A user whose socket drops (planned or not) resumes
its run on a *different* node than the one it dropped from: the cross-node replay is what the
test is about. No I/O, no clock, no locust, gevent or trio here.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def parse_node_urls(text: str, host: str) -> list[str]:
    """Return the nodes' ws URLs from a comma-separated list; just ``host`` when empty.

    Raises:
        ValueError: when ``text`` lists no URL and ``host`` is empty too.
    """
    urls = [part.strip() for part in text.split(",") if part.strip()]
    if not urls and not host:
        raise ValueError("no node URL and no host")
    return urls or [host]


def home_node(user_number: int, nodes: int) -> int:
    """The node user number ``user_number`` (0, 1, 2, ... in spawn order) starts on.

    Round robin, so any ``nodes`` consecutive users cover every node once.
    """
    if nodes < 1:
        raise ValueError(f"nodes must be at least 1, got {nodes}")
    return user_number % nodes


def resume_node(current: int, nodes: int, rng: random.Random) -> int:
    """Pick the node a socket that dropped from ``current`` resumes on: any *other* node, at
    random (the same node only when there is just one)."""
    if nodes < 1 or not 0 <= current < nodes:
        raise ValueError(f"node {current} is not one of {nodes}")
    if nodes == 1:
        return current
    return (current + rng.randint(1, nodes - 1)) % nodes


def spread(user_count: int, nodes: int, first_user: int = 0) -> list[int]:
    """How many of ``user_count`` users (numbered from ``first_user``) start on each node."""
    counts = [0] * nodes
    for number in range(first_user, first_user + user_count):
        counts[home_node(number, nodes)] += 1
    return counts


def node_label(index: int, urls: Sequence[str]) -> str:
    """A short label for node ``index``: ``node<i> (host:port)``."""
    url = urls[index]
    address = url.removeprefix("ws://").removeprefix("wss://").split("/", 1)[0]
    return f"node{index} ({address})"
