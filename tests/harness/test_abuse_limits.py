"""The server as a subprocess with little memory or few descriptors, under attack.

Each test runs ``python -m harness serve`` under a resource limit (``RLIMIT_AS`` 512 MiB or
``RLIMIT_NOFILE`` 256), plays one attack against it, then checks what the users see: the
process is alive and another user still completes a run, promptly. The peak resident size
(``VmHWM``) of every memory attack is printed (``pytest -s``) and kept as a test property.
"""

from __future__ import annotations

import resource
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import IO, Final

import attrs
import pytest
import trio
import trio_websocket

from tests.harness._support import (
    HOST,
    LISTENING,
    REPO,
    SECRET,
    Client,
    Server,
    check_run,
    connect,
    first_line,
    reap,
    scripted,
    server_env,
    token,
    unique,
)
from tests.harness.test_abuse import (
    open_fds,
    poll,
    raw_websocket,
    text_frame,
    upgrade_request,
)

MIB: Final = 1024 * 1024
MEMORY_LIMIT: Final = 512 * MIB
FILE_LIMIT: Final = 256
#: What the memory attacks run with: bounds small enough to show, well under the limit.
MEMORY_FLAGS: Final = ("--max-retained-mib", "16", "--max-queued-mib", "2")
#: Peak resident size a bounded server stays under in these attacks (the limit is 512 MiB).
RSS_BUDGET_MIB: Final = 256


# ================================================================ the limited server
@attrs.define
class Limited:
    """A server subprocess under resource limits."""

    proc: trio.Process
    server: Server
    stderr: IO[bytes]

    def peak_rss_mib(self) -> float:
        """``VmHWM``: the highest resident size the process has had."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM: the process has exited")

    def stderr_tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-3000:]

    async def assert_survived(self) -> None:
        """After a failed attack: whether the server died of it (it may be dying right now)."""
        with trio.move_on_after(2.0):
            await self.proc.wait()
        self.assert_alive()

    def assert_alive(self) -> None:
        code = self.proc.poll()
        assert code is None, f"the server exited ({code}); stderr ends:\n{self.stderr_tail()}"


@asynccontextmanager
async def limited_server(limit: int, value: int, *flags: str) -> AsyncIterator[Limited]:
    """``python -m harness serve`` with resource ``limit`` set to ``value`` (soft and hard)."""

    def apply_limit() -> None:
        resource.setrlimit(limit, (value, value))

    command = [sys.executable, "-m", "harness", "serve", "--host", HOST, "--port", "0", *flags]
    with tempfile.TemporaryFile() as stderr:
        proc = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=stderr, cwd=REPO,
            env=server_env(REGISTRY_AUTH_SECRET=SECRET), preexec_fn=apply_limit)
        limited = None
        try:
            line = await first_line(proc)
            match = LISTENING.fullmatch(line)
            assert match is not None, f"first stdout line is {line!r}; stderr: {stderr.read()!r}"
            limited = Limited(proc, Server(int(match["port"])), stderr)
            yield limited
        finally:
            await reap(proc)


async def victim_run(server: Server, user: str = "victim") -> float:
    """One connection, one run to its end; returns the seconds from the connect to the end.

    The connect is tried once: a refused or reset connection fails the test.
    """
    started = trio.current_time()
    async with connect(server, user) as client:
        accepted = await client.start(context=scripted(tools=1, tokens=5))
        events = await client.run_events(accepted["run_id"])
    assert check_run(events)["status"] == "succeeded"
    return trio.current_time() - started


async def in_parallel(*thunks: Callable[[], Awaitable[object]]) -> None:
    async with trio.open_nursery() as nursery:
        for thunk in thunks:
            nursery.start_soon(thunk)


# =================================================================== memory attacks
async def _huge_thread_ids(server: Server) -> None:
    """Three users ask for runs with 60 KB thread ids, one after another, 300 times each."""
    huge = "T" * 60_000

    async def one(user: str) -> None:
        async with connect(server, user) as client:
            for _ in range(300):
                answer = await client.request(client.start_frame(
                    context=scripted(tools=0, tokens=50), thread_id=huge))
                assert (answer["type"], answer.get("field")) == ("error", "thread_id"), \
                    str(answer)[:200]

    await in_parallel(*(lambda u=u: one(u) for u in ("ann", "ben", "cid")))


async def _many_big_ended_runs(server: Server) -> None:
    """Ten users each end 250 echo runs of a 60 KB message (150 MB of results in all)."""
    message = "M" * 60_000

    async def one(user: str) -> None:
        async with connect(server, user) as client:
            first = None
            for _ in range(250):
                accepted = await client.start("echo", message)
                first = first or accepted["run_id"]
                events = await client.run_events(accepted["run_id"])
                assert events[-1]["payload"]["result"] == message
            answer = await client.request({"type": "resume", "run_id": first, "after_seq": 0})
            assert (answer["type"], answer["code"]) == ("error", "not_found")  # dropped

    await in_parallel(*(lambda u=u: one(u) for u in (f"user{i}" for i in range(10))))


async def _big_ping_flood(server: Server) -> None:
    """Four users, five sockets each, send 200 pings of 60 KB each and never read."""
    flood = text_frame({"type": "ping", "id": "p" * 60_000})

    async def one(user: str) -> None:
        async with raw_websocket(server, user, rcvbuf=4096) as raw:
            for _ in range(200):
                await raw.send(flood)
            code, _ = await raw.until_close()
            assert code == 4008

    users = [f"flooder{i}" for i in range(4)]
    await in_parallel(*(lambda u=u: one(u) for u in users for _ in range(5)))


async def _endless_big_tokens(server: Server) -> None:
    """Four users run scripted with 100000 tokens of 64 KB: two read, two never read.

    A reader closed with 4008 does what a client should: it reconnects and resumes, until it
    has read 1000 events (64 MB) or the server says the events it missed are gone. A sink
    reads nothing until both readers are done (its run never stops, so by then its queue is
    long over its bounds), then reads up to the close frame, which must be 4008.
    """
    context = scripted(tools=0, tokens=100_000, token_bytes=65_536)
    readers_done = [trio.Event(), trio.Event()]

    async def reader(user: str, done: trio.Event) -> None:
        try:
            await read_1000(user)
        finally:
            done.set()

    async def read_1000(user: str) -> None:
        run_id, held = None, 0
        while held < 1000:
            async with connect(server, user) as client:
                if run_id is None:
                    run_id = (await client.start(context=context))["run_id"]
                else:
                    await client.send({"type": "resume", "run_id": run_id, "after_seq": held})
                try:
                    while held < 1000:
                        frame = client.backlog.popleft() if client.backlog else await client.recv()
                        if frame["type"] == "error":  # the missed events were given up
                            assert frame["code"] in ("resume_unavailable", "not_found"), frame
                            return
                        assert (frame["run_id"], frame["seq"]) == (run_id, held + 1)
                        held += 1
                except trio_websocket.ConnectionClosed as exc:
                    assert exc.reason is not None and exc.reason.code == 4008, exc.reason
                    continue
                await client.send({"type": "cancel", "run_id": run_id})

    async def non_reader(user: str) -> None:
        async with raw_websocket(server, user, rcvbuf=4096) as raw:
            await raw.send_json({"type": "start_agent", "request_id": unique(),
                                 "agent": "scripted", "message": "m", "context": context})
            for done in readers_done:
                await done.wait()
            code, _ = await raw.until_close()
            assert code == 4008

    await in_parallel(lambda: reader("reader1", readers_done[0]),
                      lambda: reader("reader2", readers_done[1]),
                      lambda: non_reader("sink1"), lambda: non_reader("sink2"))


MEMORY_ATTACKS: Final = {
    "huge thread_id": _huge_thread_ids,
    "many big ended runs": _many_big_ended_runs,
    "big-ping flood": _big_ping_flood,
    "100000 big tokens": _endless_big_tokens,
}


async def test_python_and_trio_start_under_512_mib() -> None:
    async with limited_server(resource.RLIMIT_AS, MEMORY_LIMIT, *MEMORY_FLAGS) as limited:
        await victim_run(limited.server)
        limited.assert_alive()
        print(f"\nidle server after one run: peak RSS {limited.peak_rss_mib():.1f} MiB")


@pytest.mark.parametrize("attack", list(MEMORY_ATTACKS), ids=list(MEMORY_ATTACKS))
async def test_a_memory_attack_leaves_the_server_serving_within_512_mib(
    attack: str, record_property: Callable[[str, object], None],
) -> None:
    async with limited_server(resource.RLIMIT_AS, MEMORY_LIMIT, *MEMORY_FLAGS) as limited:
        try:
            with trio.fail_after(90):  # a hang guard: CI machines are slow and shared
                await MEMORY_ATTACKS[attack](limited.server)
        except BaseException:
            await limited.assert_survived()  # a dead server explains the failure
            raise
        elapsed = await victim_run(limited.server)
        limited.assert_alive()
        peak = limited.peak_rss_mib()
    record_property("peak_rss_mib", round(peak, 1))
    print(f"\n{attack}: peak RSS {peak:.1f} MiB; victim run in {elapsed:.3f} s")
    assert peak < RSS_BUDGET_MIB
    assert elapsed < 1.0


# ===================================================================== descriptors
async def _connect_and_close(server: Server, kind: int) -> None:
    stream = await trio.open_tcp_stream(HOST, server.port)
    if kind % 3 == 1:  # RST instead of FIN
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    elif kind % 3 == 2:
        await stream.send_all(upgrade_request(server.port, jwt=token("ghost"))[:60])
    await stream.aclose()


@asynccontextmanager
async def flood(server: Server, workers: int = 8) -> AsyncIterator[Callable[[], int]]:
    """Connect-and-close loops running while the block runs; yields the count so far."""
    done = 0

    async def worker(index: int) -> None:
        nonlocal done
        while True:
            await _connect_and_close(server, done + index)
            done += 1

    async with trio.open_nursery() as nursery:
        for index in range(workers):
            nursery.start_soon(worker, index)
        yield lambda: done
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def slowloris(server: Server, count: int = 500) -> AsyncIterator[list[trio.SocketStream]]:
    """``count`` connections, each holding a partial request head, held open for the block."""
    streams = []
    try:
        for _ in range(count):
            stream = await trio.open_tcp_stream(HOST, server.port)
            streams.append(stream)
            await stream.send_all(upgrade_request(server.port, jwt=token("loris"))[:50])
        yield streams
    finally:
        for stream in streams:
            await stream.aclose()


async def test_a_connect_and_close_flood_under_256_descriptors() -> None:
    async with limited_server(resource.RLIMIT_NOFILE, FILE_LIMIT) as limited:
        server = limited.server
        await victim_run(server, "warm-up")
        baseline = open_fds(limited.proc.pid)
        async with flood(server) as done:
            await poll(lambda: done() >= 1000, 20, "1000 connect-and-close")
            elapsed = await victim_run(server)
            await poll(lambda: done() >= 3000, 20, "3000 connect-and-close")
        limited.assert_alive()
        await poll(lambda: open_fds(limited.proc.pid) <= baseline, 2.0, "descriptors freed")
    print(f"\nflood of {done()} connections: victim run in {elapsed:.3f} s")
    assert elapsed < 1.0


async def test_a_slowloris_of_500_connections_under_256_descriptors() -> None:
    async with limited_server(resource.RLIMIT_NOFILE, FILE_LIMIT) as limited:
        server = limited.server
        await victim_run(server, "warm-up")
        async with slowloris(server) as held:
            elapsed = await victim_run(server)
            limited.assert_alive()
            assert open_fds(limited.proc.pid) <= FILE_LIMIT
        second = await victim_run(server, "after")
    print(f"\nslowloris of {len(held)}: victim run in {elapsed:.3f} s, then {second:.3f} s")
    assert elapsed < 1.0


async def test_a_slowloris_and_a_flood_together_under_256_descriptors() -> None:
    async with limited_server(resource.RLIMIT_NOFILE, FILE_LIMIT) as limited:
        server = limited.server
        await victim_run(server, "warm-up")
        async with slowloris(server) as held, flood(server) as done:
            await poll(lambda: done() >= 500, 20, "500 connect-and-close")
            elapsed = await victim_run(server)
        limited.assert_alive()
    print(f"\nslowloris of {len(held)} and flood of {done()}: victim run in {elapsed:.3f} s")
    assert elapsed < 1.0


async def test_an_established_socket_keeps_working_through_the_descriptor_attacks() -> None:
    async with limited_server(resource.RLIMIT_NOFILE, FILE_LIMIT) as limited:
        server = limited.server
        async with connect(server, "resident") as resident:
            async with slowloris(server), flood(server) as done:
                await poll(lambda: done() >= 500, 20, "500 connect-and-close")
                await _assert_runs(resident)
            await _assert_runs(resident)
        limited.assert_alive()


async def _assert_runs(client: Client) -> None:
    accepted = await client.start(context=scripted(tools=1, tokens=5))
    assert check_run(await client.run_events(accepted["run_id"]))["status"] == "succeeded"

