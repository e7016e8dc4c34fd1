"""``python -m harness`` at its edges: commands that need a secret and have none, a setting
that is not valid (exit 2, a message naming it), and a server on an IPv6 address, whose first
stdout line writes the address in brackets (a URL a client can use as it is)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from typing import Final

import pytest
import trio
import trio_websocket

from harness import mint_token
from harness._cli import main
from tests.harness._support import (
    LISTENING,
    REPO,
    SECRET,
    TIMEOUT,
    reap,
    serve_command,
    server_env,
    token,
)

KINDS: Final = ("trio", "fastapi")


@pytest.mark.parametrize("argv", [["token", "alice"], ["chat", "hello"]])
def test_a_command_that_needs_the_secret_exits_2_without_it(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("REGISTRY_AUTH_SECRET", raising=False)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: set REGISTRY_AUTH_SECRET")


@pytest.mark.parametrize("argv", [
    ["serve", "--max-connections-per-user", "0"],
    ["token", "alice", "--max-connections-per-user", "0"],
])
def test_an_invalid_setting_exits_2_naming_it(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("REGISTRY_AUTH_SECRET", SECRET)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and "max_connections_per_user" in err


@pytest.mark.parametrize("kind", KINDS)
async def test_a_server_on_ipv6_announces_a_bracketed_url_that_works(kind: str) -> None:
    command = [arg if arg != "127.0.0.1" else "::1" for arg in serve_command(kind=kind)]
    proc = await trio.lowlevel.open_process(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO,
        env=server_env(REGISTRY_AUTH_SECRET=SECRET))
    try:
        assert proc.stdout is not None
        with trio.fail_after(TIMEOUT):
            line = await _line(proc.stdout)
        match = LISTENING.fullmatch(line)
        assert match is not None and match["host"] == "[::1]", line
        await _ping_then_stop(proc, f"ws://[::1]:{match['port']}/ws?token={token('alice')}")
    finally:
        await reap(proc)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_port_in_use_stops_the_server_at_start_without_announcing_it(kind: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [*serve_command(kind=kind), "--port", str(port)]  # the last --port wins
        with trio.fail_after(TIMEOUT):
            done = await trio.run_process(command, capture_stdout=True, capture_stderr=True,
                                          check=False, cwd=REPO,
                                          env=server_env(REGISTRY_AUTH_SECRET=SECRET))
    assert done.returncode != 0
    assert done.stdout == b""  # never "listening on ..."
    assert b"Address already in use" in done.stderr


@pytest.mark.parametrize("kind", KINDS)
async def test_dev_mode_prints_the_random_secret_it_serves_with(kind: str) -> None:
    proc = await trio.lowlevel.open_process(
        [*serve_command(kind=kind), "--dev"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=REPO, env=server_env())
    try:
        assert proc.stdout is not None and proc.stderr is not None
        with trio.fail_after(TIMEOUT):
            printed = await _line(proc.stderr)
            listening = await _line(proc.stdout)
        assert printed.startswith("dev auth secret: ")
        secret = printed.removeprefix("dev auth secret: ")
        match = LISTENING.fullmatch(listening)
        assert match is not None, listening
        dev_token = mint_token(secret, "alice")
        await _ping_then_stop(proc, f"ws://127.0.0.1:{match['port']}/ws?token={dev_token}")
    finally:
        await reap(proc)


async def _line(stream: trio.abc.ReceiveStream) -> str:
    data = b""
    while not data.endswith(b"\n"):
        byte = await stream.receive_some(1)
        assert byte, data
        data += byte
    return data.decode().rstrip("\n")


async def _ping_then_stop(proc: trio.Process, url: str) -> None:
    """A ping over ``url`` gets its pong; then SIGTERM, and the server exits 0."""
    async with trio_websocket.open_websocket_url(url, connect_timeout=TIMEOUT) as ws:
        await ws.send_message(json.dumps({"type": "ping", "id": "p"}))
        assert json.loads(await ws.get_message()) == {"type": "pong", "id": "p"}
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(TIMEOUT):
        assert await proc.wait() == 0

