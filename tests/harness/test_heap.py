"""Serving creates no reference cycles: what justifies freezing long-lived objects.

The server moves objects that lived a second out of the cyclic collector's sight
(``HeapKeeper``). Frozen objects are still freed by reference counting, so that is safe
exactly when serving creates no cyclic garbage. This runs the paths a server takes (runs,
drops and resumes, cancels, failures, timeouts, detached runs, slow readers, bad frames,
refused handshakes) against a server that keeps what the collector finds
(``gc.DEBUG_SAVEALL``), and checks that it found nothing.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import trio
import trio_websocket
import wsproto.events as wse

from registry import Config
from tests.harness._support import (
    REPO,
    SECRET,
    TIMEOUT,
    Server,
    connect,
    handshake_status,
    raw_connect,
    scripted,
    token,
)


async def _traffic(server: Server) -> None:
    async with connect(server, "ann") as ann:
        for context in (scripted(2, 5), scripted(1, 2, fail_at_tool=1)):
            accepted = await ann.start(context=context)
            await ann.run_events(accepted["run_id"])
        await ann.send({"type": "start_agent", "request_id": "x", "agent": "nope",
                        "message": "m"})
        await ann.send({"type": "ping", "id": [1, {"a": 2}]})
        await ann.send_raw("{not json")
        answers = [await ann.control() for _ in range(3)]
        assert [a.get("code", a["type"]) for a in answers] == ["unknown_agent", "pong",
                                                                  "bad_json"]
        slow = await ann.start(context=scripted(1, 50, delay_ms=20))
        await ann.send({"type": "cancel", "run_id": slow["run_id"]})
        await ann.run_events(slow["run_id"])
        forever = await ann.start(context=scripted(0, 1, delay_ms=60000))
    async with connect(server, "ann") as again:  # the last run timed out meanwhile
        await again.send({"type": "resume", "run_id": forever["run_id"], "after_seq": 0})
        await again.run_events(forever["run_id"])
    async with raw_connect(server, "bob") as raw:  # never reads: closed 4008
        for _ in range(200):
            await raw.send(wse.TextMessage(data=json.dumps({"type": "ping", "id": "p" * 500})))
    assert await handshake_status(server, jwt="garbage") == 401
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(server.config.max_connections_per_user):
            await stack.enter_async_context(connect(server, "cid"))
        assert await handshake_status(server, jwt=token("cid")) == 429


async def test_serving_leaves_no_cyclic_garbage() -> None:
    with trio.fail_after(4 * TIMEOUT):
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tests.harness._heap_probe", "0", SECRET], cwd=REPO,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdin is not None
        lines = proc.stdout
        first = json.loads(await _line(lines))
        server = Server(first["port"], Config(auth_secret=SECRET))
        with contextlib.suppress(trio_websocket.ConnectionClosed):  # bob's 4008
            await _traffic(server)
        await proc.stdin.aclose()  # the probe stops, collects and reports
        report = json.loads(await _line(lines))
        assert await proc.wait() == 0
    assert report["garbage"] == {}


async def _line(stream: trio.abc.ReceiveStream) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        assert chunk, "the probe server ended without a report"
        data += chunk
    return data.decode()
