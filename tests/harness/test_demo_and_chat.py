"""``python -m harness demo`` and ``python -m harness chat`` as a user runs them."""

from __future__ import annotations

import re

import pytest

from tests.harness._support import PROCESS_KINDS, SECRET, run_cli, server_env, server_process


@pytest.fixture(params=PROCESS_KINDS)
def server_kind(request: pytest.FixtureRequest) -> str:
    """The command line starts one server process: ``trio`` or ``fastapi``, not ``cluster``."""
    kind: str = request.param
    return kind


EVENT_LINE = re.compile(r"\[\s*(\d+)\] (\w+)\s")


async def test_demo_runs_three_chats_and_stops_the_server_cleanly() -> None:
    done = await run_cli("demo", env=server_env())
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert out.count("agent_completed  succeeded") == 3
    assert "server stopped with exit code 0" in out


async def test_chat_prints_every_event_of_a_run_live_and_readably(server_kind: str) -> None:
    async with server_process(kind=server_kind) as (_, server):
        done = await run_cli("chat", "--user", "bob", "--agent", "scripted", "--url",
                             server.url(), "--context",
                             '{"tools": 1, "tokens": 2, "delay_ms": 0}', "hello")
    lines = done.stdout.decode().splitlines()
    assert done.returncode == 0, done.stderr.decode()
    parsed = [EVENT_LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [(int(m[1]), m[2]) for m in parsed if m] == [
        (1, "agent_started"), (2, "agent_thinking"), (3, "tool_executing"),
        (4, "tool_completed"), (5, "partial_result"), (6, "partial_result"),
        (7, "agent_completed")]


async def test_chat_reports_a_refused_run_on_stderr_and_exits_1(server_kind: str) -> None:
    async with server_process(kind=server_kind) as (_, server):
        done = await run_cli("chat", "--agent", "nope", "--url", server.url(), "hi")
    assert done.returncode == 1
    assert "unknown_agent" in done.stderr.decode()


async def test_chat_without_a_secret_says_what_to_set() -> None:
    done = await run_cli("chat", "hi", env=server_env())
    assert done.returncode == 2
    assert "REGISTRY_AUTH_SECRET" in done.stderr.decode()
    assert SECRET not in done.stderr.decode()
