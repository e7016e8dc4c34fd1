"""Run a server under test as a subprocess and sample its CPU and memory.

Used by the load-test runner and by the benchmarks. Imports neither trio nor locust: servers
and load generators always run in their own processes.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, final

import attrs
import psutil

from loadtests import wire


class ServerStartError(RuntimeError):
    """The server exited, or did not print its ``listening on`` line in time."""


@final
@attrs.define(eq=False)
class ServerProcess:
    """A running server subprocess and the ws URL it announced."""

    proc: subprocess.Popen[str]
    url: str
    log_path: Path
    exit_code: int | None = None
    _signalled: bool = False

    def begin_stop(self, sig: signal.Signals = signal.SIGINT) -> None:
        """Send ``sig`` once, without waiting (a later :meth:`stop` does not send it again)."""
        if self.proc.poll() is None and not self._signalled:
            self._signalled = True
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0, sig: signal.Signals = signal.SIGINT) -> int:
        """Send ``sig`` (SIGINT) and wait for the exit; kill after ``timeout``. Returns the
        exit code.

        A server killed because it did not exit in time is reported as -9.
        """
        if self.proc.poll() is None:
            self.begin_stop(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.exit_code = -9
        if self.exit_code is None:
            self.exit_code = self.proc.returncode
        return self.exit_code


def _pump(stream: IO[str], first: queue.Queue[str], log: IO[str]) -> None:
    """Hand the first stdout line over, then copy every line to ``log`` until EOF."""
    handed = False
    for line in stream:
        if not handed:
            first.put(line)
            handed = True
        log.write(line)
        log.flush()
    if not handed:
        first.put("")


def start_server(
    cmd: Sequence[str], env: Mapping[str, str], log_path: Path, timeout: float = 60.0
) -> ServerProcess:
    """Start ``cmd`` and wait for its first stdout line, ``listening on ws://HOST:PORT/ws``.

    Stdout and stderr go to ``log_path``.

    Raises:
        ServerStartError: when the line does not come within ``timeout`` or is not that line.
    """
    log = log_path.open("w")
    proc = subprocess.Popen(
        list(cmd),
        stdout=subprocess.PIPE,
        stderr=log,
        stdin=subprocess.DEVNULL,
        env=dict(env),
        text=True,
        bufsize=1,
    )
    first: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=_pump, args=(proc.stdout, first, log), daemon=True).start()
    try:
        line = first.get(timeout=timeout)
    except queue.Empty:
        line = ""
    url = wire.parse_listening(line)
    if url is None:
        proc.kill()
        proc.wait()
        raise ServerStartError(f"{' '.join(cmd)}: first line {line!r}; see {log_path}")
    return ServerProcess(proc, url, log_path)


@contextlib.contextmanager
def running_server(
    cmd: Sequence[str], env: Mapping[str, str], log_path: Path
) -> Iterator[ServerProcess]:
    """Start a server for the duration of the ``with`` block; it is always stopped after."""
    server = start_server(cmd, env, log_path)
    try:
        yield server
    finally:
        server.stop()


@attrs.frozen
class Sample:
    """One reading of a process tree: wall time, CPU % (of one core) and resident memory."""

    t: float
    cpu_percent: float
    rss_bytes: int


@final
@attrs.define(eq=False)
class ResourceSampler:
    """Samples the CPU and RSS of a process (and its children) every ``interval`` seconds."""

    pid: int
    interval: float = 1.0
    samples: list[Sample] = attrs.field(factory=list)
    _stop: threading.Event = attrs.field(factory=threading.Event)
    _thread: threading.Thread | None = None
    _procs: dict[int, psutil.Process] = attrs.field(factory=dict)

    def start(self) -> None:
        """Start sampling in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def read(self) -> Sample | None:
        """Take one sample now (None when the process is gone)."""
        try:
            procs = self._tree()
            cpu = sum(p.cpu_percent(None) for p in procs)
            rss = sum(p.memory_info().rss for p in procs)
        except psutil.Error:
            return None
        return Sample(time.time(), cpu, rss)

    def _loop(self) -> None:
        """Sample until stopped or the process is gone."""
        self.read()
        while not self._stop.wait(self.interval):
            sample = self.read()
            if sample is None:
                return
            self.samples.append(sample)

    def _tree(self) -> list[psutil.Process]:
        """Return the process and its children, reusing Process objects for cpu_percent."""
        root = self._procs.setdefault(self.pid, psutil.Process(self.pid))
        found = [root]
        for child in root.children(recursive=True):
            found.append(self._procs.setdefault(child.pid, child))
        return found

    @property
    def peak_rss(self) -> int:
        """The highest RSS seen, in bytes (0 before any sample)."""
        return max((s.rss_bytes for s in self.samples), default=0)

    @property
    def mean_cpu(self) -> float:
        """The mean CPU % over the samples (100 = one core busy)."""
        return sum(s.cpu_percent for s in self.samples) / max(1, len(self.samples))


@contextlib.contextmanager
def sampling(pid: int, interval: float = 1.0) -> Iterator[ResourceSampler]:
    """Sample ``pid`` for the duration of the ``with`` block."""
    sampler = ResourceSampler(pid, interval)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()


def rss_of(pid: int) -> int:
    """Return the resident memory of ``pid`` in bytes, now."""
    return int(psutil.Process(pid).memory_info().rss)
