"""The asyncio port's chat service (``harness._asgi``) driven in-process through ASGI.

:class:`FakeSocket` plays the ASGI server's side of one ``/ws`` connection (the messages
uvicorn would exchange with the application), so what no real client can arrange on demand
can be: a client gone before its 101, a shutdown that begins during the accept, a peer that
never takes a frame, the application cancelled by its server, a handler that fails. The
service runs on anyio, here on trio; what each test checks is what the ASGI server is told.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any, Final

import pytest
import trio
from fastapi import FastAPI
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket

from harness import demo_agents
from harness._asgi import ChatService, open_chat_service
from harness._session import ChatSession
from harness._uvicorn import _redact_tokens
from harness.fastapi_app import create_app, registry_lifespan, service_of
from registry import Config
from tests.harness._support import SECRET, TIMEOUT, token

Message = dict[str, Any]
SETTINGS: Final = {"shutdown_grace_s": 2.0}


class FakeSocket:
    """One ``/ws`` connection as the ASGI server sees it.

    ``hold`` names a message type whose send blocks until :attr:`release` is set (a client
    that has not taken it yet); ``fail`` one whose send raises OSError (the client is gone).
    """

    def __init__(self, user: str = "alice", *, hold: str | None = None,
                 fail: str | None = None) -> None:
        self._to_app, self._inbox = trio.open_memory_channel[Message](math.inf)
        self._to_test, self.sent = trio.open_memory_channel[Message](math.inf)
        self.hold, self.fail = hold, fail
        self.release = trio.Event()
        self.held = trio.Event()  # the held message is being sent
        self._to_app.send_nowait({"type": "websocket.connect"})
        scope = {
            "type": "websocket", "path": "/ws", "raw_path": b"/ws", "query_string": b"",
            "headers": [(b"authorization", f"Bearer {token(user)}".encode())],
            "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8765), "scheme": "ws",
            "subprotocols": [], "extensions": {"websocket.http.response": {}},
        }
        self.websocket = WebSocket(scope, self._receive, self._send)

    async def _receive(self) -> Message:
        return await self._inbox.receive()

    async def _send(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == self.fail:
            raise OSError("the client went away")
        if message["type"] == self.hold:
            self.held.set()
            await self.release.wait()
        self._to_test.send_nowait(dict(message))

    def client_sends(self, frame: Message) -> None:
        self._to_app.send_nowait({"type": "websocket.receive", "text": json.dumps(frame)})

    def client_leaves(self, code: int = 1000) -> None:
        self._to_app.send_nowait({"type": "websocket.disconnect", "code": code})

    async def next(self) -> Message:
        with trio.fail_after(TIMEOUT):
            return await self.sent.receive()

    async def until(self, kind: str) -> list[Message]:
        """What the application sends up to and including a message of type ``kind``."""
        messages = [await self.next()]
        while messages[-1]["type"] != kind:
            messages.append(await self.next())
        return messages


@asynccontextmanager
async def chat_service(**settings: Any) -> AsyncIterator[tuple[ChatService, trio.Nursery]]:
    config = Config(auth_secret=SECRET, **{**SETTINGS, **settings})
    async with open_chat_service(config, agents=demo_agents()) as service, \
            trio.open_nursery() as nursery:
        yield service, nursery


async def accepted(service: ChatService, nursery: trio.Nursery, socket: FakeSocket) -> None:
    nursery.start_soon(service.serve_websocket, socket.websocket)
    assert (await socket.next())["type"] == "websocket.accept"


def refused_with(messages: list[Message]) -> int:
    assert messages[0]["type"] == "websocket.http.response.start", messages
    status: int = messages[0]["status"]
    return status


# ================================================================== set-up errors
async def test_the_service_does_not_open_without_an_auth_secret() -> None:
    with pytest.raises(ValueError, match="auth_secret"):
        async with open_chat_service(Config()):
            pass  # pragma: no cover - not reached


def test_the_application_and_its_lifespan_need_an_auth_secret() -> None:
    with pytest.raises(ValueError, match="auth_secret"):
        registry_lifespan(Config())
    with pytest.raises(ValueError, match="auth_secret"):
        create_app(Config())


def test_a_route_of_an_app_started_without_the_lifespan_says_what_is_missing() -> None:
    app = FastAPI()
    with pytest.raises(RuntimeError, match="registry_lifespan"):
        service_of(HTTPConnection({"type": "http", "app": app, "headers": []}))


# ====================================================================== accepting
async def test_a_client_gone_before_its_101_gives_its_connection_slot_back() -> None:
    async with chat_service(max_connections_per_user=1) as (service, nursery):
        gone = FakeSocket(fail="websocket.accept")
        with trio.fail_after(TIMEOUT):
            await service.serve_websocket(gone.websocket)  # returns: nothing to serve
        await accepted(service, nursery, FakeSocket())  # the user's one slot is free
        nursery.cancel_scope.cancel()


async def test_a_socket_accepted_as_the_shutdown_begins_is_closed_1001() -> None:
    async with chat_service() as (service, nursery):
        late = FakeSocket(hold="websocket.accept")
        nursery.start_soon(service.serve_websocket, late.websocket)
        await late.held.wait()  # admitted; its 101 is on its way
        nursery.start_soon(service.shut_down)
        while service.ops.state == "ready":
            await trio.lowlevel.checkpoint()
        late.release.set()
        messages = await late.until("websocket.close")
        assert [m["type"] for m in messages] == ["websocket.accept", "websocket.close"]
        assert messages[-1]["code"] == 1001


async def test_an_upgrade_during_the_shutdown_is_refused_503() -> None:
    async with chat_service() as (service, nursery):
        await service.shut_down()
        refused = FakeSocket()
        nursery.start_soon(service.serve_websocket, refused.websocket)
        assert refused_with([await refused.next()]) == 503


# ====================================================================== closing
async def test_a_socket_that_takes_nothing_is_given_up_at_the_shutdown_deadline() -> None:
    async with chat_service() as (service, nursery):
        stuck = FakeSocket(hold="websocket.send")
        served = trio.Event()

        async def serve() -> None:
            await service.serve_websocket(stuck.websocket)
            served.set()

        nursery.start_soon(serve)
        assert (await stuck.next())["type"] == "websocket.accept"
        stuck.client_sends({"type": "ping", "id": 1})
        await stuck.held.wait()  # the pong is never taken
        started = trio.current_time()
        with trio.fail_after(TIMEOUT):
            await service.shut_down(grace_s=0.5)
            await served.wait()
        assert trio.current_time() - started < 0.5 + 0.5
        assert service.ops.connections == 0


async def test_an_application_cancelled_by_its_server_gives_the_slot_back() -> None:
    async with chat_service(max_connections_per_user=1) as (service, nursery):
        first = FakeSocket()
        async with trio.open_nursery() as own:
            await accepted(service, own, first)
            first.client_sends({"type": "ping", "id": 1})
            assert (await first.next())["text"] == '{"type":"pong","id":1}'
            own.cancel_scope.cancel()  # the ASGI server cancels the application
        assert service.ops.connections == 0
        second = FakeSocket()
        await accepted(service, nursery, second)
        nursery.cancel_scope.cancel()


@pytest.fixture
def broken_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client message containing ``boom`` makes the session raise (a bug in one socket)."""
    handle: Callable[[ChatSession, str | None], Awaitable[None]] = ChatSession.handle

    async def failing(self: ChatSession, text: str | None) -> None:
        if text is not None and "boom" in text:
            raise RuntimeError("a bug in one socket's handling")
        await handle(self, text)

    monkeypatch.setattr(ChatSession, "handle", failing)


@pytest.mark.usefixtures("broken_session")
async def test_a_socket_whose_handling_fails_is_closed_1011() -> None:
    async with chat_service(max_connections_per_user=1) as (service, nursery):
        victim = FakeSocket()
        await accepted(service, nursery, victim)
        victim.client_sends({"type": "ping", "id": "boom"})
        close = await victim.next()
        assert (close["type"], close["code"]) == ("websocket.close", 1011)
        await accepted(service, nursery, FakeSocket())  # its slot is free again
        nursery.cancel_scope.cancel()


# ======================================================================= logging
def test_uvicorn_log_records_carry_no_token() -> None:
    """uvicorn logs each handshake's path with its query string; the filter the port adds
    to ``uvicorn.error`` blanks a ``token`` parameter and leaves the rest of the record."""
    jwt = token("alice")
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1,
                               '%s - "WebSocket %s" %d', ("127.0.0.1:5", f"/ws?a=1&token={jwt}",
                                                         403), None)
    assert _redact_tokens(record)
    assert jwt not in record.getMessage()
    assert record.getMessage() == '127.0.0.1:5 - "WebSocket /ws?a=1&token=<redacted>" 403'
    mapping = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "%(path)s",
                                ({"path": "/ws"},), None)
    assert _redact_tokens(mapping)
    assert mapping.getMessage() == "/ws"
