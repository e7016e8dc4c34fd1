"""The examples, used as their readers use them (docs/MIGRATION.md).

Each backend runs as ``python -m examples.<name> --port 0`` under uvicorn in a subprocess; the
tests chat with it as a browser does: a real WebSocket on ``/ws`` for the events, ``POST
/api/chat`` for the messages. The FastAPI backend is type-checked with ``mypy --strict``
against the package installed from a wheel, and the guide's line counts are recounted.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import attrs
import jwt
import pytest
import trio
import trio.testing
import trio_websocket

from examples.fastapi_backend.agents import build_supervisor
from examples.fastapi_backend.domain import ChatReply, ChatRequest, ConversationStore
from examples.fastapi_backend.service import AgentService
from examples.legacy_before.app import LEGACY_AGENTS, LegacyAgent
from registry import (
    AgentContext,
    AgentFn,
    AgentRegistry,
    Config,
    MemorySubscriber,
    Supervisor,
    WebSocketNotifier,
    open_registry,
)
from tests.harness._support import first_line, reap

REPO: Final = Path(__file__).resolve().parents[1]
GUIDE: Final = REPO / "docs" / "MIGRATION.md"
SECRET: Final = "examples-test-secret-0123456789abcdef"
TIMEOUT: Final = 20.0
LISTENING: Final = re.compile(r"listening on ws://(?P<host>[^\s/:]+):(?P<port>\d+)/ws")
ORDER_QUESTION: Final = "Where is my order #1001? The machine arrived broken."

Frame = dict[str, Any]


# ================================================================ a backend
@attrs.frozen
class Backend:
    """A running example backend: where it listens, and its process."""

    port: int
    process: trio.Process

    def token(self, user: str) -> str:
        return jwt.encode({"sub": user, "exp": time.time() + 600}, SECRET, algorithm="HS256")

    async def post(self, user: str, path: str, body: Mapping[str, Any]) -> tuple[int, Any]:
        """``POST path`` with a JSON body and the user's token; (status, decoded JSON)."""
        return await trio.to_thread.run_sync(self._request, user, path, json.dumps(body))

    async def get(self, user: str, path: str) -> tuple[int, Any]:
        return await trio.to_thread.run_sync(self._request, user, path, None)

    def _request(self, user: str, path: str, body: str | None) -> tuple[int, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=None if body is None else body.encode(),
            headers={"authorization": f"Bearer {self.token(user)}",
                     "content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    @asynccontextmanager
    async def socket(self, user: str) -> AsyncIterator[Browser]:
        async with trio_websocket.open_websocket_url(
            f"ws://127.0.0.1:{self.port}/ws", connect_timeout=TIMEOUT,
            disconnect_timeout=TIMEOUT,
            extra_headers=[(b"authorization", f"Bearer {self.token(user)}".encode())],
        ) as ws:
            yield Browser(ws)


@asynccontextmanager
async def backend(module: str, *flags: str, **env: str) -> AsyncIterator[Backend]:
    """Runs ``python -m module --port 0 FLAGS`` with the test's secret, until its first line.

    The environment is this process's, without ``REGISTRY_*`` variables, plus ``env``.
    Kills the process on exit if the test left it running.
    """
    environment = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    environment.update(REGISTRY_AUTH_SECRET=SECRET, CHAT_JWT_SECRET=SECRET, **env)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", module, "--port", "0", *flags], cwd=REPO, env=environment,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        match = LISTENING.fullmatch(await first_line(process))
        assert match is not None, "the backend did not print where it listens"
        yield Backend(int(match["port"]), process)
    finally:
        await reap(process)


async def stop(server: Backend) -> int | None:
    """SIGTERM, as a process manager stops it; its exit status."""
    server.process.send_signal(signal.SIGTERM)
    with trio.fail_after(TIMEOUT):
        return await server.process.wait()


# ================================================================ a browser
@attrs.define
class Browser:
    """One chat WebSocket, read the way a browser's chat client reads it."""

    ws: trio_websocket.WebSocketConnection

    async def frame(self) -> Frame:
        with trio.fail_after(TIMEOUT):
            message = await self.ws.get_message()
        frame = json.loads(message)
        assert isinstance(frame, dict), frame
        return frame

    async def send(self, frame: Mapping[str, Any]) -> None:
        await self.ws.send_message(json.dumps(frame))

    async def events_until(self, kind: str) -> list[Frame]:
        """Frames up to and including the first of type ``kind``; all must be run events."""
        events: list[Frame] = []
        while not events or events[-1]["type"] != kind:
            frame = await self.frame()
            assert "seq" in frame, f"expected a run event, got {frame}"
            events.append(frame)
        return events

    async def assert_quiet(self) -> None:
        """Nothing is pending for this socket: a ping's pong is the very next frame."""
        await self.send({"type": "ping", "id": "quiet?"})
        assert await self.frame() == {"type": "pong", "id": "quiet?"}


@asynccontextmanager
async def chatting(server: Backend, user: str, body: Mapping[str, Any],
                   ) -> AsyncIterator[tuple[Browser, dict[str, Any]]]:
    """A socket of ``user``, open before ``body`` is posted; the reply once the block ends."""
    reply: dict[str, Any] = {}

    async def post() -> None:
        reply["status"], reply["body"] = await server.post(user, "/api/chat", body)

    async with server.socket(user) as browser, trio.open_nursery() as nursery:
        nursery.start_soon(post)
        yield browser, reply


def check_run(events: Sequence[Frame]) -> Frame:
    """The run's guarantees on one socket; returns its ``agent_completed`` payload.

    seq 1, 2, ... with no gap or repeat; ``agent_started`` first; one ``agent_completed``,
    last; each ``tool_executing`` closed by one ``tool_completed`` of its ``call_id``.
    """
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len({(e["run_id"], e["thread_id"]) for e in events}) == 1
    kinds = [e["type"] for e in events]
    assert kinds[0] == "agent_started" and kinds.count("agent_started") == 1
    assert kinds[-1] == "agent_completed" and kinds.count("agent_completed") == 1
    open_calls: dict[str, str] = {}
    for event in events:
        payload = event["payload"]
        if event["type"] == "tool_executing":
            assert payload["call_id"] not in open_calls
            open_calls[payload["call_id"]] = payload["tool"]
        elif event["type"] == "tool_completed":
            assert open_calls.pop(payload["call_id"]) == payload["tool"]
    assert not open_calls, f"tools never completed: {open_calls}"
    final: Frame = events[-1]["payload"]
    return final


def steps(events: Sequence[Frame]) -> list[str]:
    """The run as ``type`` (``type:tool:status`` for tools), partial results folded in one."""
    out: list[str] = []
    for event in events:
        payload = event["payload"]
        step = event["type"]
        if step.startswith("tool_"):
            step += ":" + payload["tool"] + (":" + payload["status"] if "status" in payload else "")
        if step != "partial_result" or out[-1:] != [step]:
            out.append(step)
    return out


SUPPORT_RUN: Final = [
    "agent_started", "agent_thinking",
    "tool_executing:lookup_order", "tool_completed:lookup_order:ok",
    "tool_executing:search_help", "tool_completed:search_help:ok",
    "partial_result", "agent_completed"]


# ======================================================== the FastAPI backend
async def test_a_chat_runs_once_with_every_event_and_a_retry_starts_nothing() -> None:
    async with backend("examples.fastapi_backend") as server:
        body = {"message": ORDER_QUESTION, "request_id": "msg-1"}
        async with chatting(server, "alice", body) as (browser, reply):
            events = await browser.events_until("agent_completed")
        final = check_run(events)
        assert steps(events) == SUPPORT_RUN
        assert final["status"] == "succeeded"
        streamed = "".join(e["payload"]["text"] for e in events if e["type"] == "partial_result")
        assert streamed == final["result"]["answer"] and "shipped" in streamed
        assert reply["status"] == 200
        assert reply["body"] == {
            "run_id": events[0]["run_id"], "thread_id": events[0]["thread_id"],
            "status": "succeeded", "result": final["result"], "error": None,
            "duplicate": False}

        async with chatting(server, "alice", body) as (browser, again):
            pass  # a retry of the same request_id: the first run's reply, no new run
        assert again["body"] == {**reply["body"], "duplicate": True}
        async with server.socket("alice") as browser:
            await browser.assert_quiet()
        assert await server.get("alice", "/api/history") == (200, [reply["body"]])
        assert await server.get("bob", "/api/history") == (200, [])
        assert await stop(server) == 0


async def test_a_cancel_from_the_socket_ends_the_run_cancelled_and_answers_the_post() -> None:
    async with backend("examples.fastapi_backend") as server:
        body = {"message": ORDER_QUESTION, "request_id": "msg-cancel"}
        async with chatting(server, "alice", body) as (browser, reply):
            events = await browser.events_until("partial_result")
            await browser.send({"type": "cancel", "run_id": events[0]["run_id"]})
            events += await browser.events_until("agent_completed")
        final = check_run(events)
        assert final["status"] == "cancelled"
        assert steps(events)[-2:] == ["partial_result", "agent_completed"]
        assert reply["body"]["status"] == "cancelled"
        assert reply["body"]["run_id"] == events[0]["run_id"]
        assert await stop(server) == 0


async def test_an_unknown_agent_or_a_bad_token_starts_no_run() -> None:
    async with backend("examples.fastapi_backend") as server:
        body = {"message": "hi", "request_id": "msg-x", "agent": "nope"}
        assert await server.post("alice", "/api/chat", body) == (404, {"detail": "unknown_agent"})
        status, _ = await trio.to_thread.run_sync(_unauthenticated_post, server.port)
        assert status == 401
        async with server.socket("alice") as browser:
            await browser.assert_quiet()


def _unauthenticated_post(port: int) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/chat", data=b"{}",
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.mark.parametrize("mode", ["registry", "direct"])
async def test_the_rollback_flag_switches_delivery_to_direct(mode: str) -> None:
    """``REGISTRY_DELIVERY_MODE=direct``: the same chat, events written straight to the
    socket and nothing retained, so a resume is ``resume_unavailable``."""
    async with backend("examples.fastapi_backend", REGISTRY_DELIVERY_MODE=mode) as server:
        assert (await server.get("alice", "/dashboard/data"))[1]["delivery_mode"] == mode
        body = {"message": "hello there", "request_id": "msg-2", "agent": "smalltalk"}
        async with chatting(server, "alice", body) as (browser, reply):
            events = await browser.events_until("agent_completed")
        assert check_run(events)["status"] == "succeeded"
        assert steps(events) == ["agent_started", "agent_thinking", "partial_result",
                                 "agent_completed"]
        assert reply["body"]["status"] == "succeeded"
        async with server.socket("alice") as browser:
            await browser.send({"type": "resume", "run_id": events[0]["run_id"], "after_seq": 0})
            if mode == "registry":
                assert await browser.events_until("agent_completed") == events
            else:
                answer = await browser.frame()
                assert (answer["type"], answer["code"]) == ("error", "resume_unavailable")
            await browser.assert_quiet()


async def test_a_bad_rollback_flag_stops_the_backend_at_start_naming_it() -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    environment.update(REGISTRY_AUTH_SECRET=SECRET, REGISTRY_DELIVERY_MODE="legacy")
    with trio.fail_after(TIMEOUT):
        done = await trio.run_process(
            [sys.executable, "-m", "examples.fastapi_backend", "--port", "0"], cwd=REPO,
            env=environment, check=False, capture_stdout=True, capture_stderr=True)
    assert done.returncode == 2 and not done.stdout
    assert b"REGISTRY_DELIVERY_MODE" in done.stderr


# ================================================ the AgentService, in-process
async def crashing(ctx: AgentContext) -> None:
    await ctx.think("about to fail")
    raise KeyError("a bug in the agent")


async def stuck(ctx: AgentContext) -> None:
    await ctx.tool("slow_search", {"q": ctx.message}, fn=_never)


async def _never(args: Mapping[str, Any]) -> None:
    await trio.sleep_forever()


@asynccontextmanager
async def in_process(supervisor: Supervisor, **settings: Any,
                     ) -> AsyncIterator[tuple[AgentService, MemorySubscriber]]:
    """The example's AgentService on a registry in this trio run, and a socket of alice's."""
    async with open_registry(Config(**settings)) as registry:
        await registry.setup_agent_websocket_integration(supervisor, supervisor.agent_registry)
        browser = MemorySubscriber("alice")
        registry.connect(browser)
        yield AgentService(supervisor, ConversationStore()), browser


def received(browser: MemorySubscriber) -> list[Frame]:
    (run_id,) = browser.received
    return [event.to_dict() for event in browser.received[run_id]]


async def test_in_process_the_service_runs_the_examples_agents(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with in_process(build_supervisor()) as (service, browser):
        reply = await service.execute_agent("alice", ChatRequest(
            message="Where is my order #4242?", request_id="r1"))
    events = received(browser)
    assert check_run(events) == {"status": "succeeded", "result": reply.result}
    assert steps(events)[2:4] == ["tool_executing:lookup_order",
                                  "tool_completed:lookup_order:error"]
    assert "could not find an order #4242" in reply.result["answer"]
    assert service.history.replies("alice") == [reply]


async def test_in_process_an_agent_that_raises_ends_failed_and_the_caller_gets_the_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agents = AgentRegistry()
    agents.register("crashing", crashing)
    async with in_process(Supervisor(agents)) as (service, browser):
        with pytest.raises(KeyError, match="a bug in the agent"):
            await service.execute_agent("alice", ChatRequest(
                message="hi", request_id="r1", agent="crashing"))
    events = received(browser)
    final = check_run(events)
    assert steps(events) == ["agent_started", "agent_thinking", "agent_completed"]
    assert final == {"status": "failed", "error": "the agent failed",
                     "error_id": final["error_id"]}
    assert service.history.replies("alice") == []


async def test_in_process_a_run_past_agent_timeout_s_ends_timed_out_with_its_tool_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agents = AgentRegistry()
    agents.register("stuck", stuck)
    async with in_process(Supervisor(agents), agent_timeout_s=30) as (service, browser):
        start = trio.current_time()
        reply = await service.execute_agent("alice", ChatRequest(
            message="hi", request_id="r1", agent="stuck"))
        assert trio.current_time() - start == pytest.approx(30)
    events = received(browser)
    assert check_run(events)["status"] == reply.status == "timed_out"
    assert steps(events) == ["agent_started", "tool_executing:slow_search",
                             "tool_completed:slow_search:cancelled", "agent_completed"]


def test_pass_one_the_legacy_agents_run_unchanged_under_the_new_service() -> None:
    """The guide's first pass: the AFTER service, the BEFORE agents behind a small adapter
    (they take a notifier bound to their run). On asyncio, as under FastAPI."""

    def adapted(agent: LegacyAgent) -> AgentFn:
        async def run(ctx: AgentContext) -> Any:
            return await agent(ctx.run, WebSocketNotifier(ctx.run, ctx.emit))

        return run

    agents = AgentRegistry()
    for name, agent in LEGACY_AGENTS.items():
        agents.register(name, adapted(agent))

    async def chat() -> tuple[ChatReply, list[Frame]]:
        async with in_process(Supervisor(agents)) as (service, browser):
            reply = await service.execute_agent("alice", ChatRequest(
                message=ORDER_QUESTION, request_id="r1"))
        return reply, received(browser)

    reply, events = asyncio.run(chat())
    assert check_run(events) == {"status": "succeeded", "result": reply.result}
    assert steps(events) == SUPPORT_RUN


# ============================================================ the legacy one
async def test_the_legacy_backend_runs_the_same_chat_without_dedup() -> None:
    """The BEFORE example really runs (and really starts a second run for a retry)."""
    async with backend("examples.legacy_before") as server:
        body = {"message": ORDER_QUESTION, "request_id": "msg-1"}
        async with chatting(server, "alice", body) as (browser, reply):
            events = await browser.events_until("agent_completed")
        assert check_run(events)["status"] == "succeeded"
        assert steps(events) == SUPPORT_RUN
        assert reply["body"]["run_id"] == events[0]["run_id"]
        async with chatting(server, "alice", body) as (browser, again):
            await browser.events_until("agent_completed")
        assert again["body"]["run_id"] != reply["body"]["run_id"]


# ================================================================== typing
def test_the_backend_passes_mypy_strict_against_the_installed_package(
    tmp_path: Path,
) -> None:
    """As a user would: the package installed from its wheel (no editable hook, no source
    tree on the path), the example in a directory of its own, ``mypy --strict``."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("registry", "harness"):
        shutil.copytree(REPO / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
               str(site), str(source)]
    offline = _run([*install, "--no-index", "--no-build-isolation"], cwd=tmp_path, check=False)
    if offline.returncode != 0:  # this environment cannot build wheels: let pip fetch setuptools
        _run(install, cwd=tmp_path)
    assert (site / "registry" / "py.typed").is_file() and (site / "harness" / "py.typed").is_file()
    python = _environment(tmp_path / "env", site)
    project = tmp_path / "project"
    shutil.copytree(REPO / "examples" / "fastapi_backend", project / "examples" / "fastapi_backend",
                    ignore=shutil.ignore_patterns("__pycache__"))
    checked = _run([sys.executable, "-m", "mypy", "--strict", "--python-executable", str(python),
                    "--cache-dir", str(tmp_path / "cache"), "-p", "examples.fastapi_backend"],
                   cwd=project, check=False)
    assert checked.returncode == 0, checked.stdout
    assert "Success: no issues found" in checked.stdout


def _environment(where: Path, site: Path) -> Path:
    """A virtual environment whose site sees ``site``, then this one's dependencies.

    Dependencies come from this environment's site-packages directory as a plain path, so
    an editable install of this repository in it stays invisible (its import hook is not run).
    """
    _run([sys.executable, "-m", "venv", "--without-pip", str(where)], cwd=where.parent)
    python = where / "bin" / "python"
    ours = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                cwd=where.parent).stdout.strip()
    deps = _run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                cwd=where.parent).stdout.strip()
    Path(ours, "example-deps.pth").write_text(f"{site}\n{deps}\n")
    return python


def _run(command: Sequence[str], *, cwd: Path, check: bool = True,
         ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MYPY", "PYTHONPATH"))}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


# =================================================================== guide
def test_the_guides_line_counts_are_what_its_script_counts_now() -> None:
    """docs/MIGRATION.md's counting script, run as printed there, prints its table's figures."""
    guide = GUIDE.read_text()
    script = re.search(r"```python count-glue\n(.*?)```", guide, re.S)
    assert script is not None, "the guide has no counting script"
    counted = subprocess.run(
        [sys.executable, "-", "examples/legacy_before", "examples/fastapi_backend"],
        input=script[1], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    for line in counted.stdout.splitlines():
        assert f"`{line}`" in guide, f"the guide does not show the current count: {line}"
