"""A support-chat backend on FastAPI, wired to the agent execution registry.

Run it (from the repository root)::

    export REGISTRY_AUTH_SECRET=$(python -c "import secrets; print(secrets.token_urlsafe(32))")
    python -m examples.fastapi_backend --port 8000     # add --delivery-mode direct to roll back
    python -m harness token alice                      # a token for the user alice

The browser opens ``ws://HOST:PORT/ws`` with its token (the registry's router: the whole wire
protocol, resume and cancel included), then posts each message to ``POST /api/chat`` with
the same token. The run's events arrive on the socket as they happen; the POST answers with
the reply once the run has ended. ``/healthz``, ``/readyz``, ``/metrics`` and ``/dashboard``
come with the router.

Settings are the registry's ``REGISTRY_*`` variables, read once by ``Config.from_env()``
(the only code that reads the environment). ``REGISTRY_DELIVERY_MODE=direct`` (or
``--delivery-mode direct``) is the rollback flag: events are written straight to the
sockets, with no retained log, no retries and no resume.

What docs/MIGRATION.md counts as integration code is between ``# [glue]`` and ``# [/glue]``.
"""

from __future__ import annotations

import argparse
import logging
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Final

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request

from examples.fastapi_backend.agents import build_supervisor
from examples.fastapi_backend.domain import (
    ChatReply,
    ChatRequest,
    ConversationStore,
    Unauthorized,
    user_from_token,
)
from examples.fastapi_backend.service import AgentService
from harness.fastapi_app import DrainingServer, registry_lifespan, router, uvicorn_config
from registry import Config, RegistryError, Supervisor, get_agent_execution_registry

__all__ = ["api", "create_app", "main"]

log = logging.getLogger("examples.fastapi_backend")

#: How a run the registry refuses to start is answered over HTTP.
_HTTP_STATUS: Final = {"unknown_agent": 404, "invalid_field": 422, "rate_limited": 429,
                       "overloaded": 503}


def create_app(config: Config | None = None) -> FastAPI:
    """The backend: its own routes under ``/api``, and the registry's lifespan and router.

    Also a factory for stock uvicorn (``uvicorn --factory examples.fastapi_backend.app:
    create_app``), but stock uvicorn closes the sockets before the lifespan ends, so the
    runs' last events are lost on shutdown: prefer :func:`main`.

    Raises:
        ConfigError: a ``REGISTRY_*`` variable is invalid (``config`` omitted).
        ValueError: no ``auth_secret``.
    """
    config = config or Config.from_env()
    supervisor = build_supervisor()
    app = FastAPI(title="Support chat", lifespan=_lifespan(config, supervisor))
    app.state.config = config
    app.state.agent_service = AgentService(supervisor, ConversationStore())
    app.include_router(api)
    # [glue]
    app.include_router(router)  # /ws and the operations routes
    # [/glue]
    return app


def _lifespan(
    config: Config, supervisor: Supervisor,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Opens the registry on the app's event loop and hands it the backend's agents."""
    # [glue]
    open_registry_service = registry_lifespan(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_registry_service(app):
            orchestrator = await get_agent_execution_registry()
            await orchestrator.setup_agent_websocket_integration(
                supervisor, supervisor.agent_registry)
            log.info("support chat ready, delivery_mode=%s", config.delivery_mode)
            yield
    # [/glue]

    return lifespan


# ================================================================== /api
api = APIRouter(prefix="/api")


def current_user(
    request: Request, authorization: Annotated[str | None, Header()] = None,
) -> str:
    """The user of a request's ``Authorization: Bearer`` token (401 without a valid one)."""
    config: Config = request.app.state.config
    scheme, _, token = (authorization or "").partition(" ")
    try:
        return user_from_token(token if scheme.lower() == "bearer" else None,
                               config.auth_secret or "")
    except Unauthorized:
        raise HTTPException(401, "unauthorized", {"WWW-Authenticate": "Bearer"}) from None


def agent_service(request: Request) -> AgentService:
    service: AgentService = request.app.state.agent_service
    return service


User = Annotated[str, Depends(current_user)]
Service = Annotated[AgentService, Depends(agent_service)]


@api.post("/chat")
async def chat(message: ChatRequest, user_id: User, service: Service) -> ChatReply:
    """Runs an agent on the message; its events stream to the user's sockets meanwhile."""
    # [glue]
    try:
        return await service.execute_agent(user_id, message)
    except RegistryError as exc:
        raise HTTPException(_HTTP_STATUS.get(exc.code, 400), exc.code) from None
    # [/glue]


@api.get("/history")
async def history(user_id: User, service: Service) -> list[ChatReply]:
    """The user's past replies."""
    return service.history.replies(user_id)


# ================================================================== main
def main(argv: Sequence[str] | None = None) -> None:
    """Serves the backend under uvicorn until SIGINT or SIGTERM.

    On the first signal the registry drains before uvicorn stops: every run in flight ends
    ``cancelled`` and that event reaches its sockets, which then close with 1001. Prints
    ``listening on ws://HOST:PORT/ws`` once it accepts connections.
    """
    parser = argparse.ArgumentParser(prog="python -m examples.fastapi_backend")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--delivery-mode", choices=("registry", "direct"),
                        help="the rollback flag (wins over REGISTRY_DELIVERY_MODE)")
    args = parser.parse_args(argv)
    overrides = {"delivery_mode": args.delivery_mode} if args.delivery_mode else None
    try:
        config = Config.from_env(overrides=overrides)
        app = create_app(config)
    except ValueError as exc:  # ConfigError too: the message names the setting
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sock = socket.create_server((args.host, args.port))
    host, port = sock.getsockname()[:2]
    server = DrainingServer(
        uvicorn_config(app, config, host=host, port=port), grace_s=config.shutdown_grace_s,
        on_started=lambda: print(f"listening on ws://{host}:{port}/ws", flush=True))
    server.run(sockets=[sock])
