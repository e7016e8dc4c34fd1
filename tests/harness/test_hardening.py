"""What a hostile or broken peer cannot do: take the server down, or bend the protocol."""

from __future__ import annotations

import itertools
import json
import socket
import struct
import time

import jwt
import trio

from tests.harness._support import (
    HOST,
    SECRET,
    Server,
    check_run,
    connect,
    handshake_status,
    scripted,
    token,
    unique,
    wait_sockets_closed,
)

UPGRADE = (
    "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def _send_and_reset(server: Server, request: str) -> None:
    """Sends a raw request, then aborts the TCP connection (RST) without reading."""
    stream = await trio.open_tcp_stream(HOST, server.port)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.send_all(request.encode())
    await stream.aclose()


async def _assert_serving(server: Server) -> None:
    async with connect(server) as client:
        accepted = await client.start(context=scripted(tools=1, tokens=2))
        assert check_run(await client.run_events(accepted["run_id"]))["status"] == "succeeded"


async def test_peers_resetting_during_the_handshake_do_not_take_the_server_down(
    server: Server,
) -> None:
    host = f"{HOST}:{server.port}"
    requests = [
        UPGRADE.format(target="/ws", host=host),  # no token: its 401 meets a reset
        UPGRADE.format(target=f"/ws?token={token('alice')}", host=host),
        UPGRADE.format(target="/elsewhere", host=host),
        f"GET /ws HTTP/1.1\r\nHost: {host}\r\n\r\n",  # not an upgrade at all
    ]
    for _ in range(25):
        for request in requests:
            await _send_and_reset(server, request)
    await wait_sockets_closed(server)  # the accepted ones were reset: none is left open
    await _assert_serving(server)


async def test_a_request_target_that_is_not_a_url_gets_404(server: Server) -> None:
    stream = await trio.open_tcp_stream(HOST, server.port)
    await stream.send_all(UPGRADE.format(target="//[", host=HOST).encode())
    with trio.fail_after(10):
        head = await stream.receive_some(4096)
    await stream.aclose()
    assert head.startswith(b"HTTP/1.1 404")
    await _assert_serving(server)


async def test_a_ping_id_too_deep_to_echo_is_bad_json_and_the_socket_stays(
    server: Server,
) -> None:
    async with connect(server) as client:
        for depth in [*range(900, 1000, 2), 5000]:  # around where echoing it recurses too far
            await client.send_raw('{"type":"ping","id":' + "[" * depth + "]" * depth + "}")
            with trio.fail_after(10):
                answer = await client.ws.get_message()
            assert isinstance(answer, str)
            # a pong this deep may be too deep for this process's json to parse: match text
            if not answer.startswith('{"type":"pong","id":[[['):
                assert json.loads(answer)["code"] == "bad_json", answer[:80]
        await client.assert_usable()


async def test_scripted_failure_waits_delay_ms_before_agent_completed(server: Server) -> None:
    async with connect(server) as client:
        accepted = await client.start(context=scripted(tools=2, tokens=0, delay_ms=60,
                                                       fail_at_tool=2))
        events = await client.run_events(accepted["run_id"])
    assert check_run(events)["status"] == "failed"
    gaps = [later["ts"] - earlier["ts"] for earlier, later in itertools.pairwise(events)]
    assert len(events) == 7  # started, thinking, 2 tool pairs, completed
    assert all(gap >= 0.055 for gap in gaps), gaps


async def test_a_repeated_start_is_a_duplicate_whatever_agent_or_context_it_names(
    server: Server,
) -> None:
    async with connect(server) as client:
        request_id = unique()
        first = await client.start(context=scripted(tools=0, tokens=1), request_id=request_id)
        again = await client.request({"type": "start_agent", "request_id": request_id,
                                      "agent": "no-such-agent", "message": "m",
                                      "context": {"tools": -1}})
        assert again == {**first, "duplicate": True}


def _claims(**extra: object) -> dict[str, object]:
    return {"sub": "alice", "exp": int(time.time()) + 600, **extra}


async def test_tokens_with_extra_registered_claims_are_accepted(server: Server) -> None:
    for claims in (_claims(aud="chat"), _claims(iat=int(time.time()) + 30),
                   _claims(iss="someone", jti="x1")):
        async with connect(server, jwt=jwt.encode(claims, SECRET, algorithm="HS256")) as c:
            await c.assert_usable()


async def test_a_token_whose_exp_is_not_a_number_is_refused(server: Server) -> None:
    bad = jwt.encode({"sub": "alice", "exp": str(int(time.time()) + 600)}, SECRET,
                     algorithm="HS256")
    assert await handshake_status(server, jwt=bad) == 401
