"""The reference client (harness/client.py) against both real servers on 127.0.0.1."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from harness.client import ChatError, ChatUnavailable, format_event, open_chat
from tests.harness._support import Server, token, unique


async def collect(chat: Any, agent: str, message: str, **kwargs: Any) -> list[dict[str, Any]]:
    return [event async for event in chat.run(agent, message, **kwargs)]


def assert_complete_run(events: list[dict[str, Any]], expected: int) -> None:
    assert [e["seq"] for e in events] == list(range(1, expected + 1))
    assert events[0]["type"] == "agent_started"
    assert events[-1]["type"] == "agent_completed"
    assert len({e["run_id"] for e in events}) == 1


async def test_a_run_yields_every_event_once_in_order(server: Server) -> None:
    async with open_chat(server.url(), token("alice")) as chat:
        events = await collect(chat, "scripted", "hi", context={"tools": 2, "tokens": 4,
                                                                 "delay_ms": 0})
    assert_complete_run(events, 3 + 2 * 2 + 4)
    assert events[-1]["payload"] == {"status": "succeeded", "result": {"tools": 2, "tokens": 4}}


async def test_three_forced_disconnects_lose_and_repeat_nothing(server: Server) -> None:
    tokens = 60
    async with open_chat(server.url(), token("alice")) as chat:
        events = []
        drops_at = {10, 25, 45}
        async for event in chat.run("scripted", "x", context={"tools": 1, "tokens": tokens,
                                                               "delay_ms": 2}):
            events.append(event)
            if event["seq"] in drops_at:
                await chat.drop_connection()
        assert chat.reconnects >= 3
    assert_complete_run(events, 3 + 2 + tokens)


async def test_drop_before_run_accepted_resends_start_with_same_request_id(server: Server) -> None:
    async with open_chat(server.url(), token("alice")) as chat:
        await chat.drop_connection()  # the start below goes out on the next socket
        events = await collect(chat, "echo", "again", request_id=unique("req-fixed"))
    assert_complete_run(events, 3)
    assert events[-1]["payload"]["result"] == "again"


async def test_a_second_chat_with_the_same_request_id_follows_the_same_run(server: Server) -> None:
    context = {"tools": 0, "tokens": 20, "delay_ms": 5}
    shared = unique("shared")
    results: dict[str, list[dict[str, Any]]] = {}

    async def follow(name: str, chat: Any) -> None:
        results[name] = await collect(chat, "scripted", "m", request_id=shared,
                                      context=context)

    async with (
        open_chat(server.url(), token("alice")) as first,
        open_chat(server.url(), token("alice")) as second,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(follow, "first", first)
        nursery.start_soon(follow, "second", second)
    assert results["first"] == results["second"]
    assert_complete_run(results["first"], 3 + 20)


async def test_server_errors_raise_chat_error(server: Server) -> None:
    async with open_chat(server.url(), token("alice")) as chat:
        with pytest.raises(ChatError) as caught:
            await collect(chat, "no-such-agent", "hi")
        assert caught.value.code == "unknown_agent"
        with pytest.raises(ChatError) as caught:
            await collect(chat, "scripted", "hi", context={"tools": -1})
        assert caught.value.field == "context.tools"


async def test_bad_token_is_unavailable_not_retried_forever(server: Server) -> None:
    with pytest.raises(ChatUnavailable, match="401"):
        async with open_chat(server.url(), "not-a-jwt"):
            pass


def test_format_event_is_one_readable_line() -> None:
    line = format_event({"type": "tool_completed", "seq": 4, "payload": {
        "tool": "search", "call_id": "c1", "status": "ok", "result": {"hits": 3}}})
    assert line == '[   4] tool_completed   search ok: {"hits": 3}'
