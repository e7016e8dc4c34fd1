"""Redis's counters for the node benchmark: the INFO reply parsed, the difference per event, and
the same read from a real redis-server around known commands."""

from __future__ import annotations

import asyncio
import socket

import pytest

from benchmarks import leangen, redisinfo
from tests import _redis
from tests._redis import RedisServer

redis_server = _redis.redis_server

INFO = """# Stats\r
total_connections_received:7\r
total_commands_processed:120\r
total_net_input_bytes:5000\r
total_net_output_bytes:900\r
total_reads_processed:40\r
\r
# CPU\r
used_cpu_sys:1.250000\r
used_cpu_user:0.750000\r
used_cpu_sys_children:0.000000\r
\r
# Commandstats\r
cmdstat_xadd:calls=60,usec=300,usec_per_call=5.00,rejected_calls=0,failed_calls=1\r
cmdstat_evalsha:calls=10,usec=500,usec_per_call=50.00,rejected_calls=0,failed_calls=0\r
cmdstat_exec:calls=5,usec=50,usec_per_call=10.00,rejected_calls=0,failed_calls=0\r
cmdstat_info:calls=3,usec=90,usec_per_call=30.00,rejected_calls=0,failed_calls=0\r
cmdstat_client|list:calls=2,usec=10,usec_per_call=5.00,rejected_calls=0,failed_calls=0\r
"""


def snap(commands: dict[str, int], reads: int, cpu_s: float, total: int | None = None) -> (
    redisinfo.Snapshot
):
    return redisinfo.Snapshot(commands, sum(commands.values()) if total is None else total,
                              reads, cpu_s)


def test_an_info_reply_gives_every_counter() -> None:
    got = redisinfo.snapshot(INFO)
    assert got.commands == {"xadd": 60, "evalsha": 10, "exec": 5, "info": 3, "client|list": 2}
    assert got.total_commands == 120
    assert got.reads == 40
    assert got.cpu_s == pytest.approx(2.0)
    assert (got.net_input_bytes, got.net_output_bytes) == (5000, 900)


def test_an_info_reply_without_the_stats_section_is_refused() -> None:
    with pytest.raises(KeyError):
        redisinfo.snapshot(INFO.split("# CPU")[1])


@pytest.mark.parametrize(("data", "text"), [
    (b"$5\r\nhello\r\n", "hello"),
    (b"$5\r\nhel", None),
    (b"$5", None),
    (b"$0\r\n\r\n", ""),
])
def test_a_bulk_reply_is_read_once_complete(data: bytes, text: str | None) -> None:
    assert redisinfo.parse_bulk(data) == text


@pytest.mark.parametrize("data", [b"-ERR unknown section\r\n", b"+OK\r\n", b"$-1\r\n"])
def test_anything_but_a_bulk_string_is_an_error(data: bytes) -> None:
    with pytest.raises(redisinfo.RedisReplyError):
        redisinfo.parse_bulk(data)


def test_the_difference_is_divided_by_the_events_without_the_benchmarks_own_info() -> None:
    before = snap({"xadd": 100, "exec": 10, "evalsha": 4, "info": 7}, reads=50, cpu_s=1.0)
    after = snap({"xadd": 300, "exec": 60, "evalsha": 24, "multi": 50, "info": 8}, reads=122,
                 cpu_s=1.5)
    got = redisinfo.delta(before, after, events=200, seconds=2.0)
    assert got["commands"] == 200 + 50 + 20 + 50  # the one INFO left out
    assert got["commands_counted_by_redis"] == got["commands"]
    assert got["commands_per_event"] == 1.6
    assert got["script_calls_per_event"] == 0.1
    assert got["transactions_per_event"] == 0.25
    assert got["reads"] == 70  # the INFO's own two reads (request, end) left out
    assert got["reads_per_event"] == 0.35
    assert got["cpu_us_per_event"] == 2500.0
    assert got["cpu_percent"] == 25.0
    assert got["commands_per_s"] == 160.0
    assert got["by_command_per_event"] == {"xadd": 1.0, "exec": 0.25, "multi": 0.25,
                                           "evalsha": 0.1}
    assert "info" not in got["calls"]


def test_beyond_the_most_called_commands_the_rest_is_summed() -> None:
    names = [f"c{i:02}" for i in range(redisinfo.TOP_COMMANDS + 3)]
    after = snap({name: 10 + i for i, name in enumerate(names)}, reads=0, cpu_s=0.0)
    got = redisinfo.delta(snap({}, 0, 0.0), after, events=10, seconds=1.0)
    shown = got["by_command_per_event"]
    assert len(shown) == redisinfo.TOP_COMMANDS + 1
    assert shown["(others)"] == (10 + 11 + 12) / 10
    assert next(iter(shown)) == names[-1]


def test_no_event_gives_no_per_event_figure() -> None:
    got = redisinfo.delta(snap({}, 0, 0.0), snap({"ping": 3}, 3, 0.1), events=0, seconds=1.0)
    assert got["commands"] == 3
    assert got["commands_per_event"] is None
    assert got["cpu_us_per_event"] is None


@pytest.mark.parametrize(("url", "address"), [
    ("redis://127.0.0.1:6379/0", ("127.0.0.1", 6379)),
    ("redis://user:pw@redis.internal:6380", ("redis.internal", 6380)),
    ("127.0.0.1:7000", ("127.0.0.1", 7000)),
])
def test_an_address_is_read_from_a_url_or_a_pair(url: str, address: tuple[str, int]) -> None:
    assert redisinfo.parse_address(url) == address


def test_an_address_needs_a_port() -> None:
    with pytest.raises(ValueError):
        redisinfo.parse_address("redis://localhost/0")


def resp(*args: str) -> bytes:
    """Encode one command as a RESP array."""
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(f"${len(data)}\r\n".encode() + data + b"\r\n")
    return b"".join(out)


def request(conn: socket.socket, data: bytes, replies: int) -> None:
    """Send ``data`` in one write and read until ``replies`` replies ended (one line each)."""
    conn.sendall(data)
    got = b""
    while got.count(b"\r\n") < replies:
        got += conn.recv(4096)


def test_a_real_redis_counts_script_and_transaction_bodies(redis_server: RedisServer) -> None:
    before = redisinfo.read_info("127.0.0.1", redis_server.port)
    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=5) as conn:
        script = "redis.call('SET', KEYS[1], '1'); redis.call('SET', KEYS[2], '2'); return 1"
        request(conn, resp("EVAL", script, "2", "bench:a", "bench:b"), 1)
        batch = resp("MULTI") + resp("SET", "bench:c", "3") + resp("SET", "bench:d", "4")
        request(conn, batch + resp("EXEC"), 6)  # +OK +QUEUED +QUEUED *2 +OK +OK
    after = redisinfo.read_info("127.0.0.1", redis_server.port)
    got = redisinfo.delta(before, after, events=2, seconds=1.0)
    assert got["calls"] == {"set": 4, "eval": 1, "multi": 1, "exec": 1}
    assert got["commands"] == 7
    assert got["commands_counted_by_redis"] == 7  # total_commands_processed agrees
    assert got["script_calls"] == 1
    assert got["transactions"] == 1
    assert 2 <= got["reads"] <= 3  # one per request (the close may add one)
    assert got["commands_per_event"] == 3.5


def test_the_generator_reads_the_same_counters(redis_server: RedisServer) -> None:
    read = asyncio.run(leangen.read_redis(("127.0.0.1", redis_server.port)))
    assert read is not None
    assert read.commands.get("info", 0) >= 1
    assert asyncio.run(leangen.read_redis(None)) is None


def test_the_generator_gives_up_on_a_redis_that_is_not_there() -> None:
    assert asyncio.run(leangen.read_redis(("127.0.0.1", _redis.free_port()))) is None
