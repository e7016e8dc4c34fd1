"""BEFORE: the support backend's chat glue as it was before the registry. Do not copy it.

This is the code the migration deletes, made concrete and runnable: the same backend as
``examples/fastapi_backend`` (same domain module, same HTTP API, same events on the wire),
with the WebSocket/agent integration written by hand in the style the migration plan
describes. It runs against the library's legacy path only: ``AgentExecutionContext(...)``
built by hand, ``WebSocketNotifier(websocket_manager)`` and ``WebSocketManager`` — no
registry is opened. What it gets wrong on purpose, because backends like it do:

* contexts are created and tracked by hand (a module-level dict); nothing deduplicates a
  repeated ``request_id``, nothing bounds runs per user;
* every event is sent by hand from the agents, which therefore take a notifier;
* errors, cancellation and timeouts are each caught and reported ad hoc, with hard-coded
  timeouts, and a failure to report is only logged;
* stale contexts are swept by a loop of its own;
* no event is retained: a socket that drops loses the rest of the run, there is no resume.

Run it: ``CHAT_JWT_SECRET=... python -m examples.legacy_before --port 8001``.
What docs/MIGRATION.md counts as integration code is marked ``# [glue]``: a line with that
comment at its end, or the lines between ``# [glue]`` and ``# [/glue]``.
"""

# ruff: noqa: E501  (the "# [glue]" tags at the ends of lines, not the code, pass 100 columns)

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI, Header, HTTPException, WebSocket, WebSocketDisconnect

from examples.fastapi_backend import domain
from examples.fastapi_backend.domain import (
    ChatReply,
    ChatRequest,
    ConversationStore,
    Unauthorized,
    user_from_token,
)
from registry import (
    AgentExecutionContext,
    DeliveryError,
    Event,
    TooManyConnections,
    WebSocketManager,
    WebSocketNotifier,
)

logger = logging.getLogger("legacy_backend")

JWT_SECRET = os.environ.get("CHAT_JWT_SECRET", "")
AGENT_TIMEOUT_S = 120.0
STALE_CONTEXT_AGE_S = 600.0
SWEEP_INTERVAL_S = 30.0


# [glue]
_websocket_manager: WebSocketManager | None = None


def get_websocket_manager() -> WebSocketManager:
    global _websocket_manager
    if _websocket_manager is None:
        _websocket_manager = WebSocketManager(max_connections_per_user=5)
    return _websocket_manager


class LegacySocket:
    """One browser socket as the manager's subscriber: each event is written at once."""

    def __init__(self, websocket: WebSocket, user_id: str) -> None:
        self.websocket = websocket
        self._user_id = user_id
        self._sent: dict[str, int] = {}

    @property
    def user_id(self) -> str:
        return self._user_id

    def attach(self, run_id: str, after_seq: int, replay: list[Event]) -> None:
        self._sent[run_id] = after_seq

    async def send_event(self, event: Event) -> None:
        try:
            await self.websocket.send_text(event.json)
        except (RuntimeError, WebSocketDisconnect) as exc:
            raise DeliveryError(str(exc)) from exc
        self._sent[event.run_id] = event.seq

    def detach(self, run_id: str) -> None:
        self._sent.pop(run_id, None)

    def delivered_through(self, run_id: str) -> int:
        return self._sent.get(run_id, 0)


# run_id -> (context, the task running its agent): for cancel and the stale sweep
active_runs: dict[str, tuple[AgentExecutionContext, asyncio.Task[Any]]] = {}
# [/glue]


async def support_agent(
    context: AgentExecutionContext, notifier: WebSocketNotifier,
) -> dict[str, Any]:
    await notifier.send_agent_thinking("Reading your message", context=context)  # [glue]
    order_id = domain.order_number(context.message)
    order: dict[str, str] | None = None
    if order_id is not None:
        await notifier.send_tool_executing("lookup_order", {"order_id": order_id}, context=context)  # [glue]
        try:
            order = await domain.find_order(order_id)
        except LookupError as exc:
            await notifier.send_tool_completed("lookup_order", error=str(exc), context=context)  # [glue]
        else:  # [glue]
            await notifier.send_tool_completed("lookup_order", order, context=context)  # [glue]
    await notifier.send_tool_executing("search_help", {"query": context.message}, context=context)  # [glue]
    articles = await domain.search_help(context.message)
    await notifier.send_tool_completed("search_help", articles, context=context)  # [glue]
    answer = domain.compose_answer(order, order_id, articles)
    for word in domain.words(answer):
        await asyncio.sleep(domain.TYPING_DELAY_S)
        await notifier.send_partial_result(word, context=context)  # [glue]
    return {"answer": answer, "articles": articles}


async def smalltalk_agent(context: AgentExecutionContext, notifier: WebSocketNotifier) -> str:
    await notifier.send_agent_thinking("Just chatting", context=context)  # [glue]
    answer = domain.greeting(context.message)
    for word in domain.words(answer):
        await asyncio.sleep(domain.TYPING_DELAY_S)
        await notifier.send_partial_result(word, context=context)  # [glue]
    return answer


# [glue]
LegacyAgent = Callable[[AgentExecutionContext, WebSocketNotifier], Coroutine[Any, Any, Any]]
LEGACY_AGENTS: dict[str, LegacyAgent] = {"support": support_agent, "smalltalk": smalltalk_agent}
# [/glue]


class AgentService:
    """Runs an agent for each chat message and keeps the replies."""

    def __init__(self, history: ConversationStore) -> None:
        self.history = history

    async def execute_agent(self, user_id: str, request: ChatRequest) -> ChatReply:
        # [glue]
        agent = LEGACY_AGENTS.get(request.agent)
        if agent is None:
            raise HTTPException(404, "unknown_agent")
        status, result, error = "succeeded", None, None
        try:
            # Manual context creation
            websocket_context = AgentExecutionContext(
                run_id=uuid.uuid4().hex, user_id=user_id, agent=request.agent,
                request_id=request.request_id, message=request.message,
                thread_id=request.thread_id or f"thread_{uuid.uuid4().hex[:16]}",
                created_at=time.monotonic())
            websocket_manager = get_websocket_manager()
            websocket_notifier = WebSocketNotifier(websocket_manager)
            await websocket_notifier.send_agent_started(context=websocket_context)
            task = asyncio.create_task(agent(websocket_context, websocket_notifier))
            active_runs[websocket_context.run_id] = (websocket_context, task)
            result = await asyncio.wait_for(task, AGENT_TIMEOUT_S)
        except asyncio.CancelledError:
            status, error = "cancelled", "cancelled by the user"
        except TimeoutError:
            status, error = "timed_out", f"the agent took longer than {AGENT_TIMEOUT_S} s"
        except Exception as e:
            logger.error(f"Agent {request.agent} failed for user {user_id}: {e}")
            status, error = "failed", str(e)
        finally:
            if 'websocket_context' in locals():
                active_runs.pop(websocket_context.run_id, None)
        try:
            if 'websocket_context' in locals():
                if status == "succeeded":
                    await websocket_notifier.send_agent_completed(result, context=websocket_context)
                else:
                    await websocket_notifier.send_agent_completed(
                        error=error, status=status,  # type: ignore[arg-type]
                        context=websocket_context)
        except Exception as ws_error:
            logger.error(f"Failed to send WebSocket completion event: {ws_error}")
        reply = ChatReply(run_id=websocket_context.run_id, thread_id=websocket_context.thread_id,
                          status=status, result=result, error=error)
        # [/glue]
        self.history.record(user_id, reply)
        return reply


# [glue]
async def cleanup_stale_contexts() -> None:
    while True:
        await asyncio.sleep(SWEEP_INTERVAL_S)
        now = time.monotonic()
        for run_id, (context, task) in list(active_runs.items()):
            if now - context.created_at > STALE_CONTEXT_AGE_S:
                logger.warning(f"Cancelling stale run {run_id} of user {context.user_id}")
                task.cancel()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    sweeper = asyncio.create_task(cleanup_stale_contexts())
    try:
        yield
    finally:
        sweeper.cancel()
        for _, task in list(active_runs.values()):
            task.cancel()
# [/glue]


app = FastAPI(title="Support chat (legacy)", lifespan=lifespan)
agent_service = AgentService(ConversationStore())


def current_user(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    try:
        return user_from_token(token if scheme.lower() == "bearer" else None, JWT_SECRET)
    except Unauthorized:
        raise HTTPException(401, "unauthorized", {"WWW-Authenticate": "Bearer"}) from None


@app.post("/api/chat")
async def chat(
    message: ChatRequest, authorization: Annotated[str | None, Header()] = None,
) -> ChatReply:
    return await agent_service.execute_agent(current_user(authorization), message)


@app.get("/api/history")
async def history(authorization: Annotated[str | None, Header()] = None) -> list[ChatReply]:
    return agent_service.history.replies(current_user(authorization))


# [glue]
@app.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket) -> None:
    _, _, token = websocket.headers.get("authorization", "").partition(" ")
    try:
        user_id = user_from_token(token or websocket.query_params.get("token"), JWT_SECRET)
    except Unauthorized:
        await websocket.close(code=1008)
        return
    await websocket.accept()
    connection = LegacySocket(websocket, user_id)
    try:
        get_websocket_manager().connect(connection)
    except TooManyConnections:
        await websocket.close(code=1013)
        return
    try:
        while True:
            message = await websocket.receive_json()
            if message.get("type") == "cancel":
                entry = active_runs.get(str(message.get("run_id")))
                if entry is not None and entry[0].user_id == user_id:
                    entry[1].cancel()
            elif message.get("type") == "ping":
                await websocket.send_json({"type": "pong", "id": message.get("id")})
    except WebSocketDisconnect:
        pass
    except Exception as e:
        logger.error(f"WebSocket error for user {user_id}: {e}")
    finally:
        get_websocket_manager().disconnect(connection)
# [/glue]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.legacy_before")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    sock = socket.create_server((args.host, args.port))
    host, port = sock.getsockname()[:2]
    print(f"listening on ws://{host}:{port}/ws", flush=True)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run(
        sockets=[sock])
