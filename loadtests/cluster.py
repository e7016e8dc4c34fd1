"""The service under test: one server, or a local Redis and N server nodes pointed at it.

:func:`start_service` starts what a test needs and :meth:`Service.stop` stops it cleanly: every
node gets SIGTERM (all at once, then each is waited for), then Redis gets SIGTERM. Redis runs
from a temporary folder with persistence off (``--save "" --appendonly no``) on a free port.
Imports neither trio nor locust.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import final

import attrs

from loadtests.serverproc import ServerProcess, ServerStartError, start_server

REDIS_BINARY = "redis-server"
INSTALL_HINT = "apt-get install redis-server"


class RedisNotInstalled(ServerStartError):
    """``redis-server`` is not on PATH."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now (another process may take it before it is used)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def redis_cmd(binary: str, port: int, folder: Path) -> list[str]:
    """The command line of a throw-away Redis: loopback only, no persistence, in ``folder``."""
    return [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(folder), "--daemonize", "no", "--logfile", "",
    ]


def _pong(port: int) -> bool:
    """True when a Redis on ``port`` answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@final
@attrs.define(eq=False)
class RedisProcess:
    """A running ``redis-server`` in a temporary folder."""

    proc: subprocess.Popen[bytes]
    port: int
    folder: Path
    exit_code: int | None = None

    @property
    def url(self) -> str:
        """The ``redis_url`` the nodes use."""
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait (kill after ``timeout``, reported as -9), remove the folder."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.exit_code = -9
        if self.exit_code is None:
            self.exit_code = self.proc.returncode
        shutil.rmtree(self.folder, ignore_errors=True)
        return self.exit_code


def start_redis(log_path: Path, binary: str = REDIS_BINARY, timeout: float = 10.0) -> RedisProcess:
    """Start a throw-away Redis on a free port and wait until it answers PING.

    Raises:
        RedisNotInstalled: ``binary`` is not on PATH.
        ServerStartError: it did not answer within ``timeout`` (three ports tried).
    """
    found = shutil.which(binary)
    if found is None:
        raise RedisNotInstalled(
            f"{binary} not found: --nodes needs a local Redis; install it ({INSTALL_HINT})"
        )
    log = log_path.open("ab")
    for _ in range(3):
        folder = Path(tempfile.mkdtemp(prefix="loadtest-redis-"))
        port = free_port()
        proc = subprocess.Popen(
            redis_cmd(found, port, folder), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        redis = RedisProcess(proc, port, folder)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if _pong(port):
                return redis
            time.sleep(0.05)  # polling another process's port; nothing to wait on
        redis.stop(1.0)
    raise ServerStartError(f"{binary} did not answer PING; see {log_path}")


@final
@attrs.define(eq=False)
class Service:
    """What a test runs against: one or more server nodes, and the Redis they share if any."""

    nodes: list[ServerProcess]
    redis: RedisProcess | None = None
    stop_signal: signal.Signals = signal.SIGINT

    @property
    def urls(self) -> list[str]:
        """The nodes' ws URLs, node 0 first."""
        return [node.url for node in self.nodes]

    def dead(self) -> list[int]:
        """Indexes of the nodes that exited on their own."""
        return [i for i, node in enumerate(self.nodes) if node.proc.poll() is not None]

    def stop(self) -> tuple[list[int], int | None]:
        """Stop every node (signal all, then wait for each), then Redis.

        Returns:
            The nodes' exit codes and Redis's (None without Redis).
        """
        for node in self.nodes:
            node.begin_stop(self.stop_signal)
        codes = [node.stop(sig=self.stop_signal) for node in self.nodes]
        redis_code = self.redis.stop() if self.redis is not None else None
        return codes, redis_code


def node_cmd(server_cmd: Sequence[str], redis_url: str | None) -> list[str]:
    """A node's command line: the server command, ``--port 0``, and ``--redis-url``."""
    cmd = [*server_cmd, "--port", "0"]
    return [*cmd, "--redis-url", redis_url] if redis_url else cmd


def start_service(
    server_cmd: Sequence[str], env: Mapping[str, str], out: Path, nodes: int | None
) -> Service:
    """Start one server (``nodes`` None: ``server.log``, stopped with SIGINT), or Redis and
    ``nodes`` nodes (``node<i>.log``, ``redis.log``, stopped with SIGTERM).

    Everything started is stopped again when a later part fails to start.

    Raises:
        ServerStartError: a node or Redis did not start (RedisNotInstalled: no redis-server).
    """
    if nodes is None:
        return Service([start_server(node_cmd(server_cmd, None), env, out / "server.log")])
    redis = start_redis(out / "redis.log")
    service = Service([], redis, signal.SIGTERM)
    try:
        for index in range(nodes):
            log = out / f"node{index}.log"
            service.nodes.append(start_server(node_cmd(server_cmd, redis.url), env, log))
    except BaseException:
        service.stop()
        raise
    return service
