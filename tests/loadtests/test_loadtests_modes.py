"""The Locust user driven through Locust's web UI, as a person would (Locust in a subprocess).

Headless and distributed (``--processes``) runs are exercised by CI's smoke loads.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _process(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(args, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read()) if "json" in response.headers["Content-Type"] else None


def _wait_for(predicate: Any, what: str) -> Any:
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        try:
            result = predicate()
        except OSError:
            result = None
        if result:
            return result
        time.sleep(0.2)  # polling another process over HTTP; no event to wait on
    raise AssertionError(f"timed out waiting for {what}")


def test_chat_users_run_from_the_web_ui_and_report_every_event_type() -> None:
    env = {**os.environ, "REGISTRY_AUTH_SECRET": secrets.token_urlsafe(32)}
    server_cmd = [sys.executable, "-m", "harness", "serve", "--port", "0"]
    with _process(server_cmd, env) as server:
        assert server.stdout is not None
        url = server.stdout.readline().strip().removeprefix("listening on ")
        web = _free_port()
        locust_cmd = [sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py",
                      "--host", url, "--web-host", "127.0.0.1", "--web-port", str(web)]
        with _process(locust_cmd, env):
            base = f"http://127.0.0.1:{web}"
            _wait_for(lambda: urllib.request.urlopen(base + "/", timeout=5).status == 200,
                      "the web UI")
            form = urllib.parse.urlencode({"user_count": 3, "spawn_rate": 3, "host": url})
            swarm = urllib.request.urlopen(base + "/swarm", data=form.encode(), timeout=5)
            assert json.loads(swarm.read())["success"] is True
            names = _wait_for(lambda: _completed_names(base), "agent_completed in the stats")
            assert {"agent_started", "agent_completed"} <= names
            urllib.request.urlopen(base + "/stop", data=b"", timeout=5).close()
            stats = _get(base + "/stats/requests")
    assert all(row["num_failures"] == 0 for row in stats["stats"]), stats["errors"]


def _completed_names(base: str) -> set[str] | None:
    stats = _get(base + "/stats/requests")
    names = {row["name"] for row in stats["stats"]}
    return names if "agent_completed" in names else None
