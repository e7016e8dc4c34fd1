"""The reference client (``harness.client``) at its edges: settings it refuses, a server that
breaks the protocol in ways the real ones never do (a :class:`ScriptedServer` plays it), a
TLS endpoint that is not TLS, a token provider that fails once, and ``cancel``.

Against the scripted server the checks are on what the client yields (each event once, in
order) and on what it sends back (its resume after a gap, its acks).
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import pytest
import trio
import trio_websocket
from trio_websocket import WebSocketConnection, WebSocketRequest

from harness.client import Backoff, ChatUnavailable, _Reconnect, open_chat
from tests.harness._support import (
    HOST,
    TIMEOUT,
    Server,
    check_run,
    open_server,
    scripted,
    token,
)

Frame = dict[str, Any]
Script = Callable[[WebSocketConnection, list[Frame]], Awaitable[None]]


# ====================================================================== settings
@pytest.mark.parametrize(("url", "options", "problem"), [
    ("ws://127.0.0.1:9/ws", {"ack_every": 0}, "ack_every"),
    ("ws://127.0.0.1:9/ws", {"reconnect_budget_s": 0}, "reconnect_budget_s"),
    ("ws://127.0.0.1:9/ws", {"connect_timeout_s": -1}, "connect_timeout_s"),
    ("ws://127.0.0.1:9/ws", {"refresh_margin_s": -0.5}, "refresh_margin_s"),
    ("http://127.0.0.1:9/ws", {}, "not a ws:// or wss:// URL"),
    ("ws:///ws", {}, "not a ws:// or wss:// URL"),
])
async def test_settings_out_of_range_are_refused_before_connecting(
    url: str, options: dict[str, Any], problem: str,
) -> None:
    with pytest.raises(ValueError, match=problem):
        async with open_chat(url, token("alice"), **options):
            pytest.fail("connected")


def test_a_disconnect_without_a_connection_changes_neither_budget_nor_backoff() -> None:
    policy = _Reconnect(Backoff(), budget_s=10.0, now=100.0)
    assert policy.next_delay(100.0, 0.5) is not None
    policy.disconnected(101.0)
    assert (policy.retry, policy.deadline) == (1, 110.0)


async def test_a_wss_url_to_a_plain_server_is_retried_then_given_up(server: Server) -> None:
    url = f"wss://{HOST}:{server.port}/ws"
    with trio.fail_after(TIMEOUT), pytest.raises(ChatUnavailable, match="no connection for"):
        async with open_chat(url, token("alice"), reconnect_budget_s=0.5):
            pytest.fail("connected")


# ================================================================ real servers
async def test_cancel_ends_the_run_cancelled(server: Server) -> None:
    async with open_chat(server.url(), token("alice")) as chat:
        events = []
        with trio.fail_after(TIMEOUT):
            async for event in chat.run("scripted", "long", context=scripted(
                    tools=0, tokens=1000, delay_ms=20)):
                events.append(event)
                if event["type"] == "agent_started":
                    await chat.cancel(event["run_id"])
    assert check_run(events)["status"] == "cancelled"
    assert len(events) < 1003


async def test_a_token_provider_that_fails_once_costs_one_reconnect_and_no_event() -> None:
    """The refresh before ``exp`` fails (the provider raises): the server closes the socket
    at ``exp`` (4001), and the reconnect asks the provider again, which now works. (A client
    behaviour: one server kind is enough; the run takes 4 s of a 1 to 2 s token.)"""
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("the token service is down")
        return token("alice", ttl=60)

    async with (
        open_server() as server,
        open_chat(server.url(), token("alice", ttl=2.0), token_provider=flaky) as chat,
    ):
        with trio.fail_after(TIMEOUT):
            events = [e async for e in chat.run("scripted", "long", context=scripted(
                tools=1, tokens=40, delay_ms=100))]
    assert check_run(events)["status"] == "succeeded"
    assert len(events) == 3 + 2 + 40
    assert (calls, chat.reconnects) == (2, 1)


# ============================================================== scripted server
@asynccontextmanager
async def scripted_server(script: Script) -> AsyncIterator[tuple[str, list[Frame]]]:
    """A WebSocket server that runs ``script`` on each connection; yields its URL and the
    frames clients sent (JSON-decoded), as they arrive."""
    received: list[Frame] = []

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        with suppress(trio_websocket.ConnectionClosed):
            await script(ws, received)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio_websocket.serve_websocket, handler, HOST, 0, None)
        yield f"ws://{HOST}:{listeners.port}/ws", received
        nursery.cancel_scope.cancel()


async def read(ws: WebSocketConnection, received: list[Frame]) -> Frame:
    frame: Frame = json.loads(await ws.get_message())
    received.append(frame)
    return frame


def event(seq: int, kind: str, payload: Frame, run_id: str = "run-1") -> str:
    return json.dumps({"type": kind, "run_id": run_id, "thread_id": "t-1", "seq": seq,
                       "ts": 1.0, "payload": payload})


def accepted(request_id: str, run_id: str) -> str:
    return json.dumps({"type": "run_accepted", "request_id": request_id, "run_id": run_id,
                       "thread_id": "t-1", "duplicate": False})


STARTED = {"agent": "echo"}
DONE = {"status": "succeeded", "result": "hi"}


def untidy_server(acked: trio.Event) -> Script:
    """Everything a client may meet that the protocol allows or a broken server sends;
    ``acked`` is set once the client acked the end."""

    async def script(ws: WebSocketConnection, received: list[Frame]) -> None:
        start = await read(ws, received)
        await ws.send_message(json.dumps({"type": "pong", "id": None}))  # not asked for
        await ws.send_message(accepted("someone-else", "run-0"))  # not asked by this client
        await ws.send_message(accepted(start["request_id"], "run-1"))
        await ws.send_message(event(1, "agent_started", STARTED))
        await ws.send_message(event(1, "agent_started", STARTED))  # a repeat
        await ws.send_message(event(1, "agent_started", STARTED, run_id="run-0"))  # not followed
        await ws.send_message(event(3, "partial_result", {"text": "b"}))  # a gap: 2 is missing
        resume = await read(ws, received)
        assert resume == {"type": "resume", "run_id": "run-1", "after_seq": 1}
        await ws.send_message(json.dumps({"type": "error", "code": "invalid_field",
                                          "field": "token", "message": "not that token"}))
        await ws.send_message(json.dumps({"type": "error", "code": "not_found",
                                          "run_id": "run-0", "message": "no run"}))
        await ws.send_message(event(2, "partial_result", {"text": "a"}))
        await ws.send_message(event(3, "partial_result", {"text": "b"}))
        await ws.send_message(event(4, "agent_completed", DONE))
        await read(ws, received)  # the ack of the end
        acked.set()
        await trio.sleep_forever()

    return script


async def test_the_client_yields_each_event_once_in_order_whatever_the_server_repeats() -> None:
    acked = trio.Event()
    async with (
        scripted_server(untidy_server(acked)) as (url, received),
        open_chat(url, token("alice")) as chat,
    ):
        with trio.fail_after(TIMEOUT):
            events = [e async for e in chat.run("echo", "hi")]
            await acked.wait()
    assert [(e["seq"], e["type"]) for e in events] == [
        (1, "agent_started"), (2, "partial_result"), (3, "partial_result"),
        (4, "agent_completed")]
    assert [f["type"] for f in received] == ["start_agent", "resume", "ack"]
    assert received[-1] == {"type": "ack", "run_id": "run-1", "seq": 4}


async def garbling_server(ws: WebSocketConnection, received: list[Frame]) -> None:
    await read(ws, received)
    await ws.send_message("this is not JSON")
    await trio.sleep_forever()


async def test_a_frame_that_is_not_json_fails_the_chat_instead_of_reconnecting() -> None:
    async with scripted_server(garbling_server) as (url, received):
        with trio.fail_after(TIMEOUT), pytest.raises(json.JSONDecodeError):
            async with open_chat(url, token("alice"), reconnect_budget_s=math.inf) as chat:
                async for _ in chat.run("echo", "hi"):
                    pytest.fail("an event from a garbled stream")
    assert [f["type"] for f in received] == ["start_agent"]  # one connection, no retry
