"""Runs of the demo agents: exact event sequences, the envelope, thread ids, failures."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.harness._support import (
    Server,
    check_run,
    connect,
    scripted,
    scripted_types,
    types,
    unique,
)


@pytest.mark.parametrize(("tools", "tokens"), [(0, 0), (1, 3), (3, 5), (2, 0), (0, 7), (10, 40)])
async def test_scripted_emits_exactly_3_plus_2t_plus_k_events_in_order(
    server: Server, tools: int, tokens: int
) -> None:
    async with connect(server) as client:
        accepted = await client.start(context=scripted(tools, tokens))
        events = await client.run_events(accepted["run_id"])
    assert len(events) == 3 + 2 * tools + tokens
    assert types(events) == scripted_types(tools, tokens)
    payload = check_run(events, run_id=accepted["run_id"], thread_id=accepted["thread_id"])
    assert payload["status"] == "succeeded"
    assert events[0]["payload"]["agent"] == "scripted"
    assert all(e["payload"]["status"] == "ok" for e in events if e["type"] == "tool_completed")


async def test_scripted_defaults_are_one_tool_and_three_tokens(server: Server) -> None:
    async with connect(server) as client:
        accepted = await client.start()
        events = await client.run_events(accepted["run_id"])
    assert types(events) == scripted_types(1, 3)
    check_run(events)


async def test_tool_completed_follows_its_tool_executing(server: Server) -> None:
    async with connect(server) as client:
        accepted = await client.start(context=scripted(tools=4, tokens=0))
        events = await client.run_events(accepted["run_id"])
    for executing, completed in zip(events[2:10:2], events[3:10:2], strict=True):
        assert executing["type"] == "tool_executing"
        assert completed["type"] == "tool_completed"
        assert completed["payload"]["call_id"] == executing["payload"]["call_id"]
        assert completed["payload"]["tool"] == executing["payload"]["tool"]


async def test_envelope_ts_is_a_float_near_now_and_never_goes_back(server: Server) -> None:
    async with connect(server) as client:
        before = time.time()
        accepted = await client.start(context=scripted(tools=2, tokens=5, delay_ms=5))
        events = await client.run_events(accepted["run_id"])
        after = time.time()
    stamps = [e["ts"] for e in events]
    assert all(isinstance(ts, float) for ts in stamps)
    assert before - 1 <= stamps[0] and stamps[-1] <= after + 1
    assert stamps == sorted(stamps)
    assert stamps[-1] - stamps[0] >= 0.005 * (len(events) - 1) * 0.5


async def test_scripted_delay_spaces_the_events(server: Server) -> None:
    async with connect(server) as client:
        accepted = await client.start(context=scripted(tools=1, tokens=2, delay_ms=50))
        events = await client.run_events(accepted["run_id"])
    # 7 events, a 50 ms pause before each after the first, plus the tool's own pause.
    assert events[-1]["ts"] - events[0]["ts"] >= 0.3


async def test_thread_id_given_by_client_is_echoed_everywhere(server: Server) -> None:
    async with connect(server) as client:
        thread_id = unique("thread")
        accepted = await client.start(thread_id=thread_id, context=scripted(tools=2, tokens=2))
        assert accepted["thread_id"] == thread_id
        events = await client.run_events(accepted["run_id"])
    check_run(events, thread_id=thread_id)


async def test_thread_id_is_assigned_by_the_server_and_stable(server: Server) -> None:
    async with connect(server) as client:
        first = await client.start(context=scripted(tools=2, tokens=2))
        events = await client.run_events(first["run_id"])
        second = await client.start(context=scripted(tools=0, tokens=0))
        await client.run_events(second["run_id"])
    assert isinstance(first["thread_id"], str) and first["thread_id"]
    assert {e["thread_id"] for e in events} == {first["thread_id"]}
    assert first["run_id"] != second["run_id"]


async def test_run_accepted_shape_and_run_ids_are_unique_and_long(server: Server) -> None:
    run_ids = set()
    async with connect(server) as client:
        for _ in range(20):
            accepted = await client.start("echo")
            assert set(accepted) >= {"type", "request_id", "run_id", "thread_id", "duplicate"}
            assert accepted["duplicate"] is False
            assert isinstance(accepted["run_id"], str)
            # 128 random bits need at least 22 characters even in base64.
            assert len(accepted["run_id"]) >= 22
            run_ids.add(accepted["run_id"])
            await client.run_events(accepted["run_id"])
    assert len(run_ids) == 20


@pytest.mark.parametrize(("tools", "fail_at"), [(1, 1), (3, 2), (3, 3)])
async def test_fail_at_tool_errors_that_tool_and_fails_the_run(
    server: Server, tools: int, fail_at: int
) -> None:
    async with connect(server) as client:
        accepted = await client.start(context=scripted(tools, 4, fail_at_tool=fail_at))
        events = await client.run_events(accepted["run_id"])
    payload = check_run(events)
    assert payload["status"] == "failed"
    assert isinstance(payload["error"], str)
    completed = [e["payload"] for e in events if e["type"] == "tool_completed"]
    assert [c["status"] for c in completed][: fail_at] == ["ok"] * (fail_at - 1) + ["error"]
    assert isinstance(completed[fail_at - 1]["error"], str)


@pytest.mark.parametrize(("field", "context"), [
    ("context.tools", {"tools": -1}),
    ("context.tools", {"tools": 1001}),
    ("context.tools", {"tools": "3"}),
    ("context.tools", {"tools": 1.5}),
    ("context.tools", {"tools": True}),
    ("context.tools", {"tools": None}),
    ("context.tokens", {"tokens": -1}),
    ("context.tokens", {"tokens": 100001}),
    ("context.tokens", {"tokens": [1]}),
    ("context.delay_ms", {"delay_ms": -1}),
    ("context.delay_ms", {"delay_ms": 60001}),
    ("context.delay_ms", {"delay_ms": "10"}),
    ("context.fail_at_tool", {"tools": 2, "fail_at_tool": 0}),
    ("context.fail_at_tool", {"tools": 2, "fail_at_tool": 3}),
    ("context.fail_at_tool", {"tools": 0, "fail_at_tool": 1}),
    ("context.fail_at_tool", {"fail_at_tool": 2}),
    ("context.fail_at_tool", {"tools": 2, "fail_at_tool": "1"}),
    ("context.fail_at_tool", {"tools": 2, "fail_at_tool": 1.5}),
])
async def test_invalid_scripted_context_names_the_field(
    server: Server, field: str, context: dict[str, Any]
) -> None:
    async with connect(server) as client:
        request_id = unique()
        answer = await client.request(client.start_frame(request_id=request_id, context=context))
        assert answer["type"] == "error" and answer["code"] == "invalid_field", answer
        assert answer["field"] == field
        assert answer["request_id"] == request_id
        await client.assert_quiet()


@pytest.mark.parametrize("context", [
    {"tools": 0, "tokens": 0, "delay_ms": 0},
    {"tools": 2, "tokens": 0, "delay_ms": 0, "fail_at_tool": 2},
])
async def test_scripted_context_lower_limits_are_inclusive(
    server: Server, context: dict[str, Any]
) -> None:
    async with connect(server) as client:
        accepted = await client.start(context=context)
        events = await client.run_events(accepted["run_id"])
    assert len(events) == 3 + 2 * context["tools"]
    check_run(events)


async def test_scripted_context_upper_limits_are_inclusive(server: Server) -> None:
    context = {"tools": 1000, "tokens": 100000, "delay_ms": 60000, "fail_at_tool": 1000}
    async with connect(server) as client:
        accepted = await client.start(context=context)
        started = await client.events_until(accepted["run_id"], lambda e: True)
        await client.send({"type": "cancel", "run_id": accepted["run_id"]})
        events = started + await client.run_events(accepted["run_id"])
    assert check_run(events)["status"] == "cancelled"


async def test_fast_reader_of_a_delay_0_run_gets_every_event(server: Server) -> None:
    """Guarantee 6 closes slow readers only: a client that reads as fast as it can keeps up."""
    async with connect(server) as client:
        accepted = await client.start(context=scripted(tools=0, tokens=5000))
        events = await client.run_events(accepted["run_id"])
    assert len(events) == 5003
    check_run(events)


@pytest.mark.parametrize("message", ["hello", "", "héllo wörld 😀", "x" * 5000, '{"type":"x"}'])
async def test_echo_completes_with_the_message(server: Server, message: str) -> None:
    async with connect(server) as client:
        accepted = await client.start("echo", message)
        events = await client.run_events(accepted["run_id"])
    assert types(events) == ["agent_started", "agent_thinking", "agent_completed"]
    assert events[0]["payload"]["agent"] == "echo"
    assert check_run(events) == {"status": "succeeded", "result": message}


async def test_research_completes_with_tool_pairs_and_streamed_text(server: Server) -> None:
    async with connect(server) as client:
        accepted = await client.start("research", "What is structured concurrency?")
        events = await client.run_events(accepted["run_id"])
    payload = check_run(events)
    assert payload["status"] == "succeeded"
    kinds = types(events)
    assert kinds.count("tool_executing") >= 1
    assert kinds.count("tool_executing") == kinds.count("tool_completed")
    assert "agent_thinking" in kinds and "partial_result" in kinds
    last_tool = max(i for i, k in enumerate(kinds) if k == "tool_completed")
    assert kinds.index("partial_result") > last_tool


async def test_runs_on_one_socket_interleave_without_mixing(server: Server) -> None:
    async with connect(server) as client:
        runs = [await client.start(context=scripted(tools=2, tokens=10, delay_ms=2))
                for _ in range(5)]
        runs.append(await client.start("echo"))
        streams = await client.collect(*(r["run_id"] for r in runs))
    for accepted in runs:
        check_run(streams[accepted["run_id"]], thread_id=accepted["thread_id"])


async def test_run_accepted_is_the_first_frame_of_a_new_run(server: Server) -> None:
    async with connect(server) as client:
        for agent in ("echo", "scripted", "research"):
            frame = client.start_frame(agent, context=scripted(tools=0, tokens=1))
            await client.send(frame)
            accepted = await client.recv()
            assert accepted["type"] == "run_accepted"
            assert accepted["request_id"] == frame["request_id"]
            first = await client.recv()
            assert (first["type"], first["seq"]) == ("agent_started", 1)
            await client.run_events(accepted["run_id"])


async def test_echo_accepts_any_context_object(server: Server) -> None:
    async with connect(server) as client:
        accepted = await client.start("echo", "hi", context={"anything": [1, {"x": None}]})
        assert check_run(await client.run_events(accepted["run_id"]))["result"] == "hi"
