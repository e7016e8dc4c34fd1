"""The handshake: endpoint path, JWT auth (header or query) and the per-user socket limit."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

import jwt as pyjwt
import pytest
import trio
from trio_websocket import ConnectionRejected

from tests.harness._support import (
    SECRET,
    TIMEOUT,
    Server,
    connect,
    handshake_status,
    open_server,
    token,
)

VIAS = ["header", "query"]


def _claims(user: str = "alice", ttl: float = 3600) -> dict[str, object]:
    now = int(time.time())
    return {"sub": user, "iat": now, "exp": now + int(ttl)}


BAD_TOKENS = {
    "expired": token("alice", ttl=-60),
    "badly_signed": token("alice", secret="not-the-server-secret-0123456789ab"),
    "alg_none": pyjwt.encode(_claims(), key=None, algorithm="none"),
    "hs512": pyjwt.encode(_claims(), SECRET, algorithm="HS512"),
    "malformed": "not-a-jwt",
    "three_garbage_parts": "abc.def.ghi",
    "no_exp": pyjwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"),
    "no_sub": pyjwt.encode({"exp": int(time.time()) + 3600}, SECRET, algorithm="HS256"),
    "empty_sub": pyjwt.encode(_claims(user=""), SECRET, algorithm="HS256"),
    "non_string_sub": pyjwt.encode({**_claims(), "sub": 42}, SECRET, algorithm="HS256"),
    "tampered": token("alice")[:-4] + "AAAA",
}


@pytest.mark.parametrize("via", VIAS)
async def test_valid_token_is_accepted(server: Server, via: str) -> None:
    async with connect(server, "alice", via=via) as client:
        await client.assert_quiet()


async def test_missing_token_is_401(server: Server) -> None:
    assert await handshake_status(server) == 401


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_bad_token_is_401(server: Server, kind: str, via: str) -> None:
    assert await handshake_status(server, jwt=BAD_TOKENS[kind], via=via) == 401


@pytest.mark.parametrize("value", [b"Basic YWxpY2U6cHc=", b"Bearer", b"Token x", b"bearer"])
async def test_authorization_header_that_is_not_bearer_is_401(server: Server, value: bytes) -> None:
    assert await handshake_status(server, headers=[(b"authorization", value)]) == 401


async def test_empty_query_token_is_401(server: Server) -> None:
    assert await handshake_status(server, path="/ws?token=") == 401


@pytest.mark.parametrize("path", ["/", "/wss", "/ws/", "/ws/extra", "/api/ws", "/WS"])
async def test_other_path_is_404(server: Server, path: str) -> None:
    assert await handshake_status(server, jwt=token("alice"), path=path) == 404


async def test_other_path_is_404_even_without_a_token(server: Server) -> None:
    assert await handshake_status(server, path="/chat") == 404


async def test_extra_query_parameters_do_not_matter(server: Server) -> None:
    async with connect(server, "alice", via="query", path="/ws?client=test&v=1") as client:
        await client.assert_quiet()


async def test_sixth_socket_of_a_user_is_429_and_accepted_after_one_closed(server: Server) -> None:
    async with AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(connect(server, "alice")) for _ in range(5)]
        assert await handshake_status(server, jwt=token("alice")) == 429
        assert await handshake_status(server, jwt=token("alice"), via="query") == 429
        async with connect(server, "bob") as other_user:
            await other_user.assert_quiet()
        await sockets[0].ws.aclose()
        # on a cluster another node learns of the close once its node has written it to Redis
        deadline = trio.current_time() + TIMEOUT
        while True:
            try:
                async with connect(server, "alice") as sixth:
                    await sixth.assert_quiet()
                break
            except ConnectionRejected as exc:  # a cluster's other node learns of the close late
                assert exc.status_code == 429 and server.ports, exc
                assert trio.current_time() < deadline
                await trio.sleep(0.05)
        for client in sockets[1:]:
            await client.assert_quiet()


async def test_max_connections_per_user_is_configurable(server_kind: str) -> None:
    async with (
        open_server(server_kind, max_connections_per_user=1) as server,
        connect(server, "alice"),
    ):
        assert await handshake_status(server, jwt=token("alice")) == 429


async def test_rejected_handshakes_do_not_take_a_connection_slot(server_kind: str) -> None:
    async with open_server(server_kind, max_connections_per_user=1) as server:
        for _ in range(3):
            assert await handshake_status(server, jwt=token("alice", ttl=-60)) == 401
            assert await handshake_status(server, jwt=token("alice"), path="/nope") == 404
        async with connect(server, "alice") as client:
            await client.assert_quiet()
