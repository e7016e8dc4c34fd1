"""A real ``redis-server`` for the tests of a multi-node service, and its pytest fixtures.

Each server runs on a free port of 127.0.0.1, in a temporary directory, without persistence
(``--save "" --appendonly no``). Without ``redis-server`` a test that needs one fails (it
does not skip), saying how to install it: CI has it.

A test module takes a fixture by binding it to its own name
(``redis_server = tests._redis.redis_server``: pytest finds it there, and ruff reads no unused
import).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import attrs
import pytest

__all__ = ["RedisServer", "free_port", "own_redis_server", "redis_server"]

START_S: Final = 5.0  # redis-server answers PING within this, else the fixture fails
INSTALL_HINT: Final = "redis-server is not installed: apt-get install redis-server"


@attrs.define
class RedisServer:
    """A ``redis-server`` process a test owns, which it may stop, pause and start again.

    ``start`` after ``stop`` serves on the same port again (with an empty data set: nothing
    is persisted).
    """

    directory: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Starts it and returns once it answers PING; fails the test if it cannot."""
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail(INSTALL_HINT)
        self.process = subprocess.Popen(
            [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_S
        while not self._answers():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                pytest.fail(f"redis-server did not start on port {self.port}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stops it (SIGTERM, then SIGKILL), resuming it first if it was paused."""
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=START_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open and commands hang unanswered (data is kept)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`: it answers again, with its data."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A server the module's tests share (each takes its own key prefix)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of the test's own: empty, and free to be stopped or paused."""
    server = RedisServer(tmp_path, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
