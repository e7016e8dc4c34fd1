"""The asyncio port of the server: PROTOCOL.md as a FastAPI (ASGI) application, under uvicorn.

A backend mounts the registry into its own FastAPI application with two pieces, the lifespan
(which opens the registry on the running event loop) and the router (``/ws`` and the
operations routes)::

    from fastapi import FastAPI
    from harness.fastapi_app import registry_lifespan, router

    app = FastAPI(lifespan=registry_lifespan(config, agents=my_agents))
    app.include_router(router)

:func:`create_app` builds the whole application of ``python -m harness serve --server
fastapi``: the same, plus fixed-text 404 and 405 answers for every other path and method.
:func:`uvicorn_config` and :class:`DrainingServer` run it the way PROTOCOL.md asks (keepalive,
frame rules, handshake bounds, and SIGINT/SIGTERM draining the registry *before* uvicorn
closes anything); :func:`run_server` does both.

A backend with a lifespan of its own opens the service inside it and stores it where the
router looks for it::

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_chat_service(config, agents=my_agents) as chat, my_database():
            app.state.chat_service = chat
            yield

Shutting down: stock uvicorn, on SIGTERM, closes every WebSocket (1012) before it runs the
lifespan's shutdown, so the runs' terminal events would reach nobody. A backend that runs
uvicorn itself either uses :class:`DrainingServer`, or awaits
``app.state.chat_service.shut_down()`` before it lets uvicorn stop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final

from fastapi import APIRouter, FastAPI, Request, WebSocket
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from harness._asgi import (
    STATE_ATTRIBUTE,
    ChatService,
    first_values,
    open_chat_service,
    plain,
    service_of_app,
)
from harness._http import REFUSALS
from harness._ops import ROUTES
from harness._uvicorn import DrainingServer, listening_socket, uvicorn_config
from registry import AgentRegistry, Config, ToolDispatcher

__all__ = [
    "STATE_ATTRIBUTE",
    "ChatService",
    "DrainingServer",
    "create_app",
    "open_chat_service",
    "registry_lifespan",
    "router",
    "run_server",
    "uvicorn_config",
]

_JSON: Final = "application/json"
_NO_STORE: Final = {"cache-control": "no-store"}


def registry_lifespan(
    config: Config,
    *,
    agents: AgentRegistry | None = None,
    tools: ToolDispatcher | None = None,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """A FastAPI lifespan that opens the registry and the :class:`ChatService` on its loop.

    The service is kept on ``app.state.chat_service`` while the application runs; on
    shutdown it drains (see :meth:`ChatService.shut_down`), then the registry closes.

    Raises:
        ValueError: ``config`` has no ``auth_secret``.
    """
    if not config.auth_secret:
        raise ValueError("auth_secret is required (REGISTRY_AUTH_SECRET or --auth-secret)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_chat_service(config, agents=agents, tools=tools) as service:
            setattr(app.state, STATE_ATTRIBUTE, service)
            try:
                yield
            finally:
                setattr(app.state, STATE_ATTRIBUTE, None)

    return lifespan


def service_of(connection: HTTPConnection) -> ChatService:
    """The service of the application serving ``connection``.

    Raises:
        RuntimeError: the application was not started with the registry's lifespan.
    """
    service = service_of_app(connection.app)
    if service is None:
        raise RuntimeError("no ChatService on app.state: start the app with registry_lifespan")
    return service


# ==================================================================== routes
router = APIRouter()


@router.websocket("/ws")
async def chat_socket(websocket: WebSocket) -> None:
    """``/ws``: the chat protocol (refused before the upgrade with an HTTP status)."""
    await service_of(websocket).serve_websocket(websocket)


@router.get("/ws", include_in_schema=False)
async def chat_socket_without_upgrade() -> Response:
    """``GET /ws`` that is not a WebSocket upgrade."""
    return plain(426, REFUSALS[426])


def _operations_endpoint(path: str) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        ops = service_of(request).ops
        status, body, content_type = ops.answer(path, "GET", request.headers,
                                                first_values(request))
        return Response(body, status_code=status, media_type=content_type, headers=_NO_STORE)

    return endpoint


for _path in ROUTES:
    router.add_api_route(_path, _operations_endpoint(_path), methods=["GET"],
                         include_in_schema=False)


# =============================================================== application
def create_app(
    config: Config,
    *,
    agents: AgentRegistry | None = None,
    tools: ToolDispatcher | None = None,
) -> FastAPI:
    """The application of ``python -m harness serve --server fastapi``.

    The router and the lifespan, no generated documentation routes, and the trio server's
    answers elsewhere: 404 ``not found`` for any other path (a WebSocket handshake too) and
    405 for another method on a route, with fixed texts.

    Raises:
        ValueError: ``config`` has no ``auth_secret``.
    """
    app = FastAPI(lifespan=registry_lifespan(config, agents=agents, tools=tools),
                  docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.include_router(router)
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.router.default = _elsewhere
    return app


async def _http_error(request: Request, exc: HTTPException) -> Response:
    text = _FIXED_TEXTS.get(exc.status_code)
    if text is None:  # pragma: no cover - the routes raise no other HTTPException
        return await http_exception_handler(request, exc)
    answer = plain(exc.status_code, text)
    answer.headers.update(exc.headers or {})  # a 405 names the allowed methods
    return answer


_FIXED_TEXTS: Final = {404: REFUSALS[404], 405: REFUSALS[405]}


async def _elsewhere(scope: Scope, receive: Receive, send: Send) -> None:
    """Any other path: 404, for a WebSocket handshake as for an HTTP request."""
    answer = plain(404, REFUSALS[404])
    if scope["type"] == "websocket":
        await WebSocket(scope, receive, send).send_denial_response(answer)
    else:
        await answer(scope, receive, send)


def run_server(
    config: Config,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    agents: AgentRegistry | None = None,
    tools: ToolDispatcher | None = None,
    log_level: str = "warning",
    on_listening: Callable[[int], object] | None = None,
) -> None:
    """Serves :func:`create_app` under uvicorn until SIGINT or SIGTERM; blocks.

    The socket is bound before uvicorn starts, so ``port`` 0 takes a free port.

    Args:
        on_listening: Called with the bound port once the server accepts connections.
    """
    sock = listening_socket(host, port)
    bound: int = sock.getsockname()[1]
    app = create_app(config, agents=agents, tools=tools)
    server = DrainingServer(
        uvicorn_config(app, config, host=host, port=bound, log_level=log_level),
        grace_s=config.shutdown_grace_s,
        on_started=None if on_listening is None else lambda: on_listening(bound))
    server.run(sockets=[sock])
