"""A backend mounts the registry into its own FastAPI application (harness.fastapi_app).

Each test builds a backend app the way the module docstring says, serves it with uvicorn in a
thread (stock uvicorn with either of its WebSocket implementations, or with
``uvicorn_config``), and talks to it over real sockets.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import Any

import pytest
import trio
import uvicorn
from fastapi import FastAPI

from harness import demo_agents
from harness.fastapi_app import (
    STATE_ATTRIBUTE,
    ChatService,
    open_chat_service,
    registry_lifespan,
    router,
    uvicorn_config,
)
from registry import Config
from tests.harness._support import (
    HOST,
    SECRET,
    TIMEOUT,
    Server,
    assert_shut_down,
    check_run,
    connect,
    handshake_status,
    http_get,
    scripted,
    start_in_flight,
    token,
)

CONFIG = Config(auth_secret=SECRET, shutdown_grace_s=2.0, max_message_bytes=1024)
RUNNERS = [
    "wsproto",
    pytest.param("websockets-sansio", marks=pytest.mark.skipif(
        importlib.util.find_spec("websockets") is None, reason="websockets is not installed")),
    "uvicorn_config",
]


def backend(lifespan: Any = None) -> FastAPI:
    """A backend of its own: its route, plus the registry's router and lifespan."""
    app = FastAPI(lifespan=lifespan or registry_lifespan(CONFIG, agents=demo_agents()))
    app.include_router(router)

    @app.get("/api/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "backend"}

    return app


class _Uvicorn(uvicorn.Server):
    """uvicorn.Server that says when it accepts connections (the test waits for it)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[Any] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        self.ready.set()


@contextmanager
def _serving(app: FastAPI, runner: str) -> Iterator[tuple[_Uvicorn, int]]:
    """Serves ``app`` in a thread on a free port until the block ends."""
    sock = socket.socket()
    sock.bind((HOST, 0))
    port: int = sock.getsockname()[1]
    if runner == "uvicorn_config":
        config = uvicorn_config(app, CONFIG, host=HOST, port=port)
    else:
        config = uvicorn.Config(app, host=HOST, port=port, ws=runner, lifespan="on",
                                log_level="warning")
    server = _Uvicorn(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield server, port
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "uvicorn did not stop"


Mounted = tuple[_Uvicorn, Server]


@asynccontextmanager
async def mounted(runner: str, app: FastAPI | None = None) -> AsyncIterator[Mounted]:
    """The backend served by ``runner``, ready: its uvicorn and where it listens."""
    with _serving(app or backend(), runner) as (server, port):
        await trio.to_thread.run_sync(server.ready.wait, TIMEOUT)
        assert server.ready.is_set(), "uvicorn did not start"
        yield server, Server(port, CONFIG)


def service_of(server: _Uvicorn) -> ChatService:
    app: Any = server.config.app
    service = getattr(app.state, STATE_ATTRIBUTE)
    assert isinstance(service, ChatService)
    return service


@pytest.mark.parametrize("runner", RUNNERS)
async def test_a_chat_runs_through_the_backends_own_app(runner: str) -> None:
    async with mounted(runner) as (_, server), connect(server) as client:
        accepted = await client.start(context=scripted(tools=2, tokens=3))
        assert check_run(await client.run_events(accepted["run_id"]))["status"] == "succeeded"
        await client.assert_quiet()
        assert await http_get(server, "/api/hello") == (200, b'{"hello":"backend"}')
        assert await http_get(server, "/healthz") == (200, b'{"status":"ok"}')
        assert await http_get(server, "/readyz") == (200, b'{"status":"ready"}')
        status, metrics = await http_get(server, "/metrics")
        assert status == 200 and b"registry_runs_started_total 1.0" in metrics


@pytest.mark.parametrize("runner", RUNNERS)
async def test_handshakes_are_refused_before_the_upgrade(runner: str) -> None:
    async with mounted(runner) as (_, server):
        assert await handshake_status(server) == 401
        assert await handshake_status(server, jwt="not-a-jwt", via="query") == 401
        async with AsyncExitStack() as stack:
            for _ in range(CONFIG.max_connections_per_user):
                await stack.enter_async_context(connect(server, "alice"))
            assert await handshake_status(server, jwt=token("alice")) == 429
        assert await http_get(server, "/ws") == (
            426, b"upgrade required: this endpoint speaks WebSocket\n")


@pytest.mark.parametrize("runner", RUNNERS)
async def test_max_message_bytes_closes_1009_whatever_the_servers_own_limit(runner: str) -> None:
    async with mounted(runner) as (_, server), connect(server) as client:
        await client.send(client.start_frame("echo", "x" * 2000))
        code, frames = await client.until_closed()
    assert (code, frames) == (1009, [])


async def test_a_backend_with_a_lifespan_of_its_own_opens_the_service_inside_it() -> None:
    opened: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_chat_service(CONFIG, agents=demo_agents()) as chat:
            setattr(app.state, STATE_ATTRIBUTE, chat)
            opened.append("chat")
            yield

    async with mounted("wsproto", backend(lifespan)) as (_, server), connect(server) as client:
        accepted = await client.start("echo", "nested")
        assert check_run(await client.run_events(accepted["run_id"]))["result"] == "nested"
    assert opened == ["chat"]


@pytest.mark.parametrize("runner", RUNNERS)
async def test_draining_the_service_before_uvicorn_stops_delivers_cancelled_and_1001(
    runner: str,
) -> None:
    """The shutdown order a backend needs (stock uvicorn would close the sockets first)."""
    async with mounted(runner) as (uv, server), connect(server, "alice") as client:
        flight = await start_in_flight(client, scripted(tokens=100, delay_ms=100))
        assert uv.loop is not None
        drained = asyncio.run_coroutine_threadsafe(service_of(uv).shut_down(), uv.loop)
        await assert_shut_down([flight], [])
        await trio.to_thread.run_sync(drained.result, TIMEOUT)
        assert await handshake_status(server, jwt=token("bob")) == 503
        assert (await http_get(server, "/readyz"))[0] == 503
