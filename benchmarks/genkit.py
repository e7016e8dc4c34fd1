"""Pure helpers both load generators share: user naming, the fd limit, /proc and /metrics readings.

No trio and no asyncio here: the readings are plain file reads and text parsing, so the trio
generator (:mod:`benchmarks.loadgen`), the asyncio one (:mod:`benchmarks.leangen`) and the
orchestrator can all use them.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Mapping
from typing import Any, Final

SOCKETS_PER_USER: Final = 4
"""Sockets sharing one user id: below the server's max_connections_per_user (5) with room for
a reconnect while the server has not yet noticed the dropped socket."""
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
PAGE: Final = os.sysconf("SC_PAGE_SIZE")
GC_PREFIX: Final = "registry_gc_"
"""The garbage-collector figures every benchmarked server serves on ``/metrics``: the registry's
own (``harness._ops``) and the same names from the peers (:mod:`benchmarks.gcwatch`)."""
GC_PAUSE_LIMIT_S: Final = 0.025
"""A collector pause longer than this (seconds) is a stall: counted per interval from the
servers' pause histogram (one of its bounds)."""


def user_name(prefix: str, index: int) -> str:
    """Return the user id of socket ``index`` (SOCKETS_PER_USER sockets per user)."""
    return f"{prefix}-{index // SOCKETS_PER_USER}"


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1_048_576
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_ticks(pid: int | str = "self") -> int:
    """Return the user + system CPU time of process ``pid`` (all its threads) in clock ticks.

    Raises:
        OSError: the process is gone.
    """
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def rss_bytes(pid: int | str = "self") -> int:
    """Return the resident memory of process ``pid`` in bytes.

    Raises:
        OSError: the process is gone.
    """
    with open(f"/proc/{pid}/statm", "rb") as statm:
        return int(statm.read().split()[1]) * PAGE


def machine_busy_ticks() -> int:
    """Return the clock ticks every CPU of the machine spent busy so far (``/proc/stat``:
    user, nice, system, irq, softirq and steal)."""
    with open("/proc/stat", "rb") as stat:
        fields = [int(x) for x in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal


def parse_prometheus(text: str) -> dict[str, float]:
    """Return ``{'name{labels}': value}`` for every sample line of a Prometheus text page."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            samples[name.strip()] = float(value)
        except ValueError:
            continue
    return samples


def gc_figures(samples: Mapping[str, float]) -> dict[str, Any] | None:
    """Return the collector figures of a /metrics page: collections by generation, total and
    longest pause (seconds) and the pause histogram (``{upper bound: pauses at or below}``,
    empty from a server without it); None when the page has none."""
    total = samples.get(f"{GC_PREFIX}pause_seconds_total")
    if total is None:
        return None
    out: dict[str, Any] = {
        "pause_total_s": total, "longest_s": samples.get(f"{GC_PREFIX}pause_longest_seconds", 0)}
    for generation in range(3):
        key = f'{GC_PREFIX}collections_total{{generation="{generation}"}}'
        out[f"gen{generation}"] = samples.get(key, 0.0)
    prefix = f'{GC_PREFIX}pause_duration_seconds_bucket{{le="'
    out["buckets"] = {float(name[len(prefix):-2]): value for name, value in samples.items()
                      if name.startswith(prefix) and not name.endswith('"+Inf"}')}
    return out


def gc_delta(
    before: Mapping[str, Any] | None, after: Mapping[str, Any] | None
) -> dict[str, float | None] | None:
    """Return what the collector did between two :func:`gc_figures` readings (None if either is
    missing).

    The longest pause of the interval is known exactly (``longest_ms``) only when the server's
    longest-since-start figure grew in it; otherwise ``longest_ms`` is None and the interval's
    longest pause is at most ``longest_bound_ms``: the smallest of the earlier record, the
    interval's pause total and the lowest histogram bound that every pause of the interval
    fell under. ``over_limit`` counts the interval's pauses longer than ``GC_PAUSE_LIMIT_S``
    (None from a server without the histogram).
    """
    if before is None or after is None:
        return None
    gens = {f"gen{g}": after[f"gen{g}"] - before[f"gen{g}"] for g in range(3)}
    count = sum(gens.values())
    total_ms = (after["pause_total_s"] - before["pause_total_s"]) * 1000
    grew = after["longest_s"] > before["longest_s"]
    under = {bound: after["buckets"][bound] - before.get("buckets", {}).get(bound, 0.0)
             for bound in after.get("buckets", {})}
    bounds = [before["longest_s"] * 1000, total_ms]
    bounds += [bound * 1000 for bound, n in under.items() if n >= count]
    return {
        **gens,
        "collections": count,
        "pause_total_ms": round(total_ms, 3),
        "pause_mean_ms": round(total_ms / count, 3) if count else 0.0,
        "longest_ms": round(after["longest_s"] * 1000, 3) if grew else None,
        "longest_bound_ms": None if grew else round(min(bounds), 3),
        "longest_since_start_ms": round(after["longest_s"] * 1000, 3),
        "over_limit": count - under[GC_PAUSE_LIMIT_S] if GC_PAUSE_LIMIT_S in under else None,
    }
