"""``python -m harness serve|token`` as a subprocess: settings, tokens, signals, exit codes."""

from __future__ import annotations

import re
import signal
import time

import jwt as pyjwt
import pytest
import trio

from tests.harness._support import (
    PROCESS_KINDS,
    SECRET,
    assert_shut_down,
    check_run,
    connect,
    handshake_status,
    run_cli,
    scripted,
    server_env,
    server_process,
    start_in_flight,
)


@pytest.fixture(params=PROCESS_KINDS)
def server_kind(request: pytest.FixtureRequest) -> str:
    """The command line starts one server process: ``trio`` or ``fastapi``, not ``cluster``."""
    kind: str = request.param
    return kind


#: What the process may take beyond ``shutdown_grace_s`` to exit (interpreter teardown).
EXIT_SLACK_S = 1.5


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_cancels_runs_closes_sockets_1001_and_exits_0(
    signum: int, server_kind: str,
) -> None:
    grace = 3.0
    flags = ("--shutdown-grace-s", str(grace))
    async with server_process(*flags, kind=server_kind) as (proc, server):
        async with (
            connect(server, "alice") as a,
            connect(server, "bob") as b,
            connect(server, "alice") as idle,
            connect(server, "carol") as two_runs,
        ):
            in_flight = [
                await start_in_flight(a, scripted(tokens=200, delay_ms=100)),
                await start_in_flight(b, scripted(tools=3, delay_ms=300), until="tool_executing"),
            ]
            run_ids = [(await two_runs.start(context=scripted(tokens=200, delay_ms=100)))["run_id"]
                       for _ in range(2)]
            signalled = trio.current_time()
            proc.send_signal(signum)
            await assert_shut_down(in_flight, [idle])
            code, frames = await two_runs.until_closed()
        with trio.fail_after(grace + EXIT_SLACK_S):
            returncode = await proc.wait()
        assert returncode == 0
        assert trio.current_time() - signalled < grace + EXIT_SLACK_S
    assert code == 1001
    for run_id in run_ids:
        mine = [f for f in frames if f["run_id"] == run_id]
        assert check_run(mine)["status"] == "cancelled"


async def test_sigterm_with_an_idle_server_exits_0_quickly(server_kind: str) -> None:
    async with server_process(kind=server_kind) as (proc, _):
        signalled = trio.current_time()
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(5 + EXIT_SLACK_S):
            assert await proc.wait() == 0
        assert trio.current_time() - signalled < 5 + EXIT_SLACK_S


async def test_sigterm_exits_within_grace_even_with_a_socket_that_never_reads(
    server_kind: str,
) -> None:
    grace = 2.0
    async with (
        server_process("--shutdown-grace-s", str(grace), kind=server_kind) as (proc, server),
        connect(server, "slow") as slow,
    ):
        await slow.start(context=scripted(tools=0, tokens=20000, delay_ms=0, token_bytes=3000))
        signalled = trio.current_time()
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(grace + EXIT_SLACK_S):
            assert await proc.wait() == 0
        assert trio.current_time() - signalled < grace + EXIT_SLACK_S


INVALID_SETTINGS = [
    ("max_connections_per_user", {"REGISTRY_MAX_CONNECTIONS_PER_USER": "0"}, []),
    ("max_connections_per_user", {"REGISTRY_MAX_CONNECTIONS_PER_USER": "-2"}, []),
    ("max_active_runs", {"REGISTRY_MAX_ACTIVE_RUNS": "1.5"}, []),
    ("max_queued_messages", {"REGISTRY_MAX_QUEUED_MESSAGES": "lots"}, []),
    ("ping_timeout_s", {"REGISTRY_PING_TIMEOUT_S": "0"}, []),
    ("retention_s", {"REGISTRY_RETENTION_S": "-1"}, []),
    ("agent_timeout_s", {"REGISTRY_AGENT_TIMEOUT_S": "abc"}, []),
    ("shutdown_grace_s", {"REGISTRY_SHUTDOWN_GRACE_S": ""}, []),
    ("agent_timeout_s", {}, ["--agent-timeout-s", "abc"]),
    ("agent_timeout_s", {}, ["--agent-timeout-s", "0"]),
    ("max_message_bytes", {}, ["--max-message-bytes", "0"]),
    ("max_active_runs_per_user", {}, ["--max-active-runs-per-user", "2.5"]),
    ("detached_run_timeout_s", {}, ["--detached-run-timeout-s", "-0.5"]),
    ("max_retained_events_per_run", {}, ["--max-retained-events-per-run", "x"]),
]


def names(setting: str) -> re.Pattern[str]:
    """The setting as PROTOCOL.md, its env variable or its flag spell it."""
    return re.compile(setting.replace("_", "[_-]"), re.IGNORECASE)


@pytest.mark.parametrize(("setting", "env", "flags"), INVALID_SETTINGS)
async def test_invalid_setting_stops_the_server_with_a_message_naming_it(
    setting: str, env: dict[str, str], flags: list[str], server_kind: str,
) -> None:
    result = await run_cli("serve", "--server", server_kind, "--port", "0", *flags,
                           env=server_env(REGISTRY_AUTH_SECRET=SECRET, **env))
    assert result.returncode != 0
    assert b"listening" not in result.stdout
    assert names(setting).search(result.stderr.decode() + result.stdout.decode())


async def test_serve_without_an_auth_secret_refuses_to_start(server_kind: str) -> None:
    result = await run_cli("serve", "--server", server_kind, "--port", "0", env=server_env())
    assert result.returncode != 0
    assert b"listening" not in result.stdout
    assert names("auth_secret").search(result.stderr.decode())


async def test_a_setting_from_the_environment_applies_and_the_token_command_works(
    server_kind: str,
) -> None:
    env = server_env(REGISTRY_AUTH_SECRET=SECRET, REGISTRY_MAX_CONNECTIONS_PER_USER="1")
    printed = await run_cli("token", "bob", env=env)
    assert printed.returncode == 0
    jwt = printed.stdout.decode().strip()
    async with (
        server_process(env=env, kind=server_kind) as (_, server),
        connect(server, jwt=jwt) as client,
    ):
        accepted = await client.start("echo", "via the cli token")
        assert check_run(await client.run_events(accepted["run_id"]))["result"] == (
            "via the cli token")
        assert await handshake_status(server, jwt=jwt) == 429


async def test_a_flag_wins_over_the_environment(server_kind: str) -> None:
    env = server_env(REGISTRY_AUTH_SECRET=SECRET, REGISTRY_MAX_CONNECTIONS_PER_USER="1")
    flags = ("--max-connections-per-user", "2")
    async with (
        server_process(*flags, env=env, kind=server_kind) as (_, server),
        connect(server, "alice"),
        connect(server, "alice"),
    ):
        assert await handshake_status(server, jwt=(await _cli_token("alice"))) == 429


async def test_auth_secret_flag_wins_over_the_environment(server_kind: str) -> None:
    env = server_env(REGISTRY_AUTH_SECRET="an-other-secret-" + "x" * 40)
    async with server_process("--auth-secret", SECRET, env=env, kind=server_kind) as (_, server):
        async with connect(server, "alice") as client:
            await client.assert_quiet()
        assert await handshake_status(server, jwt=await _cli_token("alice", env=env)) == 401


async def _cli_token(user: str, env: dict[str, str] | None = None) -> str:
    printed = await run_cli("token", user, env=env)
    assert printed.returncode == 0, printed.stderr
    return printed.stdout.decode().strip()


async def test_token_command_mints_hs256_for_the_user_with_the_ttl() -> None:
    before = time.time()
    printed = await run_cli("token", "dave", "--ttl", "120")
    assert printed.returncode == 0
    jwt = printed.stdout.decode().strip()
    assert pyjwt.get_unverified_header(jwt)["alg"] == "HS256"
    claims = pyjwt.decode(jwt, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "dave"
    assert before + 110 <= claims["exp"] <= time.time() + 130


async def test_a_token_for_another_secret_is_refused_by_the_server(server_kind: str) -> None:
    other = server_env(REGISTRY_AUTH_SECRET="a-different-secret-" + "y" * 40)
    jwt = await _cli_token("erin", env=other)
    async with server_process(kind=server_kind) as (_, server):
        assert await handshake_status(server, jwt=jwt) == 401
        assert await handshake_status(server, jwt=jwt, via="query") == 401


async def test_a_decimal_duration_from_the_environment_applies(server_kind: str) -> None:
    env = server_env(REGISTRY_AUTH_SECRET=SECRET, REGISTRY_AGENT_TIMEOUT_S="0.4")
    async with (
        server_process(env=env, kind=server_kind) as (_, server),
        connect(server) as client,
    ):
        accepted = await client.start(context=scripted(tools=0, tokens=1, delay_ms=5000))
        events = await client.run_events(accepted["run_id"])
    assert check_run(events)["status"] == "timed_out"
    assert events[-1]["ts"] - events[0]["ts"] < 3
