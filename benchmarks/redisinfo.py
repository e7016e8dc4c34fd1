"""What Redis did for a benchmark: ``INFO stats cpu commandstats`` read before and after, and
the difference per event delivered.

Redis counts every command it executes in ``commandstats``: those a client sends, those queued
in a ``MULTI`` (counted when ``EXEC`` runs them) and those a Lua script calls
(``redis.call``). ``total_commands_processed`` counts the same. So *commands per event* is all
the work Redis did, while the *requests* a node waits for are fewer: one ``EVALSHA`` runs a
whole script, one ``MULTI`` ... ``EXEC`` batch is written at once. ``total_reads_processed``
(the reads Redis made from client sockets) is the closest figure to round trips, and a lower
bound of them: a pipelined batch, or concurrent requests a client multiplexes on one
connection (coredis does), usually arrive in one read. The ``INFO`` commands the benchmark
sends itself are left out of every figure (with the reads they cost: :data:`OWN_READS` each).

Pure parsing and arithmetic, plus :func:`read_info` (a blocking socket, for the orchestrator);
the asyncio generator sends :data:`INFO_REQUEST` on its own connection.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any, Final

import attrs

INFO_REQUEST: Final = b"INFO stats cpu commandstats\r\n"
"""The inline command the readings send (Redis >= 7 takes several sections)."""
OWN_COMMANDS: Final = frozenset({"info"})
"""Commands the benchmark itself sends, left out of the figures."""
OWN_READS: Final = 2
"""Socket reads Redis makes for one of the benchmark's readings: its request, and the end of
its connection (each reading opens a connection of its own)."""
SCRIPT_CALLS: Final = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall")
TRANSACTIONS: Final = ("exec",)
TOP_COMMANDS: Final = 8
"""Commands listed one by one in a delta (the most called); the rest are summed."""


class RedisReplyError(ValueError):
    """The bytes are not a complete RESP bulk-string reply."""


@attrs.frozen
class Snapshot:
    """One reading of a Redis server's counters."""

    commands: Mapping[str, int]
    """Calls by command name (``cmdstat_xadd`` -> ``xadd``; subcommands as ``client|list``)."""
    total_commands: int
    reads: int
    """``total_reads_processed``: reads from client sockets (at most one per round trip)."""
    cpu_s: float
    """``used_cpu_sys + used_cpu_user``: every thread of the server."""
    net_input_bytes: int = 0
    net_output_bytes: int = 0


def parse_bulk(data: bytes) -> str | None:
    """Return the text of a RESP bulk-string reply (``$<n>\\r\\n<n bytes>\\r\\n``), or None while
    ``data`` is incomplete.

    Raises:
        RedisReplyError: an error reply (``-ERR ...``) or anything but a bulk string.
    """
    head, sep, rest = data.partition(b"\r\n")
    if not sep:
        return None
    if head.startswith(b"-"):
        raise RedisReplyError(head[1:].decode("utf-8", "replace"))
    if not head.startswith(b"$"):
        raise RedisReplyError(f"not a bulk string: {head[:40]!r}")
    size = int(head[1:])
    if size < 0:
        raise RedisReplyError("nil reply")
    if len(rest) < size + 2:
        return None
    return rest[:size].decode("utf-8", "replace")


def parse_info(text: str) -> dict[str, str]:
    """Return the ``field: value`` lines of an ``INFO`` reply (section headers skipped)."""
    fields = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip()] = value.strip()
    return fields


def command_calls(fields: Mapping[str, str]) -> dict[str, int]:
    """Return the calls of each command from the ``cmdstat_<name>`` fields of ``INFO``
    (``calls=4,usec=30,...``)."""
    calls = {}
    for name, value in fields.items():
        if not name.startswith("cmdstat_"):
            continue
        stats = dict(part.split("=", 1) for part in value.split(",") if "=" in part)
        calls[name.removeprefix("cmdstat_")] = int(stats.get("calls", 0))
    return calls


def snapshot(text: str) -> Snapshot:
    """Return the counters of an ``INFO stats cpu commandstats`` reply.

    Raises:
        KeyError: a section is missing (an older Redis that takes one section per ``INFO``).
    """
    fields = parse_info(text)
    return Snapshot(
        commands=command_calls(fields),
        total_commands=int(fields["total_commands_processed"]),
        reads=int(fields.get("total_reads_processed", 0)),
        cpu_s=float(fields["used_cpu_sys"]) + float(fields["used_cpu_user"]),
        net_input_bytes=int(fields.get("total_net_input_bytes", 0)),
        net_output_bytes=int(fields.get("total_net_output_bytes", 0)),
    )


def _per(value: float, events: int) -> float | None:
    return round(value / events, 3) if events else None


def delta(before: Snapshot, after: Snapshot, events: int, seconds: float) -> dict[str, Any]:
    """Return what Redis did between two readings, in all and per event delivered.

    ``commands`` is every command executed (script and transaction bodies included) but the
    benchmark's own ``INFO``; ``script_calls`` the ``EVALSHA``/``EVAL`` calls, ``transactions``
    the ``EXEC`` calls; ``reads`` the socket reads (about the round trips); ``by_command`` the
    most called commands, per event.
    """
    names = set(before.commands) | set(after.commands)
    calls = {
        name: after.commands.get(name, 0) - before.commands.get(name, 0)
        for name in names
        if name not in OWN_COMMANDS
    }
    calls = {name: count for name, count in calls.items() if count > 0}
    own = sum(after.commands.get(n, 0) - before.commands.get(n, 0) for n in OWN_COMMANDS)
    commands = sum(calls.values())
    scripts = sum(calls.get(name, 0) for name in SCRIPT_CALLS)
    transactions = sum(calls.get(name, 0) for name in TRANSACTIONS)
    reads = max(after.reads - before.reads - OWN_READS * own, 0)
    cpu_s = max(after.cpu_s - before.cpu_s, 0.0)
    ranked = sorted(calls.items(), key=lambda item: (-item[1], item[0]))
    by_command = {name: _per(count, events) for name, count in ranked[:TOP_COMMANDS]}
    rest = sum(count for _, count in ranked[TOP_COMMANDS:])
    if rest:
        by_command["(others)"] = _per(rest, events)
    return {
        "events": events,
        "seconds": round(seconds, 3),
        "commands": commands,
        "commands_counted_by_redis": after.total_commands - before.total_commands - own,
        "script_calls": scripts,
        "transactions": transactions,
        "reads": reads,
        "cpu_s": round(cpu_s, 4),
        "cpu_percent": round(cpu_s / seconds * 100, 1) if seconds > 0 else None,
        "commands_per_s": round(commands / seconds, 1) if seconds > 0 else None,
        "commands_per_event": _per(commands, events),
        "script_calls_per_event": _per(scripts, events),
        "transactions_per_event": _per(transactions, events),
        "reads_per_event": _per(reads, events),
        "cpu_us_per_event": round(cpu_s / events * 1e6, 2) if events else None,
        "net_in_bytes_per_event": _per(after.net_input_bytes - before.net_input_bytes, events),
        "net_out_bytes_per_event": _per(after.net_output_bytes - before.net_output_bytes, events),
        "by_command_per_event": by_command,
        "calls": dict(ranked),
    }


def parse_address(url: str) -> tuple[str, int]:
    """Return (host, port) of a ``redis://HOST:PORT/DB`` URL or a ``HOST:PORT`` pair.

    Raises:
        ValueError: no port.
    """
    rest = url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"no port in {url!r}")
    return host or "127.0.0.1", int(port)


def read_info(host: str, port: int, timeout: float = 5.0) -> Snapshot:
    """Read a :class:`Snapshot` from the Redis at ``host:port`` (blocking).

    Raises:
        OSError: Redis cannot be reached; RedisReplyError: it answered with an error.
    """
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.sendall(INFO_REQUEST)
        data = b""
        while (text := parse_bulk(data)) is None:
            chunk = conn.recv(65536)
            if not chunk:
                raise RedisReplyError("connection closed mid-reply")
            data += chunk
    return snapshot(text)
