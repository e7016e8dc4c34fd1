"""The dashboard in a real browser: Playwright (sync API) driving the system Chromium.

Nothing here downloads a browser: Playwright comes from pip (``pip install playwright``) and
drives ``/usr/bin/chromium`` (Debian/Ubuntu package ``chromium``), or the executable named by
``DASHBOARD_CHROMIUM``. When either is missing the browser tests fail, saying how to install it.

Besides the fixtures' building blocks, two helpers for people:

- :func:`screenshot` saves a picture of a dashboard page::

      python -m tests.harness._browser http://127.0.0.1:8000/dashboard docs/dashboard.png

  (add ``--load 3`` to start 3 sockets with a long ``scripted`` run each beside the page; the
  server's ``REGISTRY_AUTH_SECRET`` must then be in the environment.)
- :class:`LoadSocket` opens one WebSocket (websocket-client, in a thread) with one long run.

The tests drive Playwright's sync API from plain synchronous tests: the server runs as a
subprocess (:func:`server_process`) and the load in threads, so no event loop is shared.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import selectors
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import attrs
import pytest

from harness import mint_token
from tests.harness._support import HOST, LISTENING, REPO, SECRET, TIMEOUT, server_env, unique

CHROMIUM: Final = os.environ.get("DASHBOARD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS: Final = ("--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run")
INSTALL_PLAYWRIGHT: Final = (
    "Playwright for Python is not installed: run `.venv/bin/pip install playwright` "
    "(do NOT run `playwright install`: the tests drive the system Chromium)")
INSTALL_CHROMIUM: Final = (
    f"no Chromium at {CHROMIUM}: install the system package with `apt-get install -y chromium` "
    "(or point DASHBOARD_CHROMIUM at a Chromium/Chrome executable)")
#: Bound of every wait in the browser, in milliseconds (a passing test never gets near it).
WAIT_MS: Final = int(TIMEOUT * 1000)

#: JS: the text of the element ``[data-metric=name]`` (null when there is none).
METRIC_TEXT: Final = """name => {
  const el = document.querySelector(`[data-metric="${name}"]`);
  return el === null ? null : el.textContent.trim();
}"""
#: JS: whether the figure ``name`` is a number satisfying ``op`` against ``value``.
METRIC_IS: Final = """([name, op, value]) => {
  const el = document.querySelector(`[data-metric="${name}"]`);
  if (el === null) return false;
  const text = el.textContent.trim();
  if (!/^-?\\d+(\\.\\d+)?$/.test(text)) return op === "na" && text === "n/a";
  const n = Number(text);
  return op === "==" ? n === value : op === ">" ? n > value : op === "number";
}"""


def sync_playwright() -> Any:
    """Playwright's sync entry point; fails the test with how to install it when missing."""
    try:
        from playwright.sync_api import sync_playwright as start
    except ImportError:
        pytest.fail(INSTALL_PLAYWRIGHT, pytrace=False)
    return start()


def chromium_executable() -> str:
    """The system Chromium; fails the test with how to install it when missing."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(INSTALL_CHROMIUM, pytrace=False)
    return CHROMIUM


@contextlib.contextmanager
def open_browser() -> Iterator[Any]:
    """A headless system Chromium under Playwright (a ``Browser``)."""
    executable = chromium_executable()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS))
        try:
            yield browser
        finally:
            browser.close()


# ================================================================== server
@attrs.frozen
class ServerProcess:
    """A ``python -m harness serve`` subprocess and where it listens."""

    proc: subprocess.Popen[bytes]
    port: int

    def url(self, path: str = "/dashboard") -> str:
        return f"http://{HOST}:{self.port}{path}"

    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.port}/ws"


@contextlib.contextmanager
def server_process(**settings: str) -> Iterator[ServerProcess]:
    """Runs the server with ``REGISTRY_<NAME>`` = value for each setting, until the block ends."""
    env = server_env(REGISTRY_AUTH_SECRET=SECRET,
                     **{f"REGISTRY_{k.upper()}": v for k, v in settings.items()})
    command = [sys.executable, "-m", "harness", "serve", "--host", HOST, "--port", "0"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            cwd=REPO, env=env)
    try:
        line = _first_line(proc)
        match = LISTENING.fullmatch(line)
        assert match is not None, f"first stdout line is {line!r}"
        yield ServerProcess(proc, int(match["port"]))
    finally:
        proc.terminate()
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _first_line(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(TIMEOUT):
            raise AssertionError(f"the server printed nothing in {TIMEOUT} s")
    return proc.stdout.readline().decode().rstrip("\r\n")


# ==================================================================== load
class LoadSocket:
    """One WebSocket of ``user`` with one long ``scripted`` run, read by a thread of its own.

    The run emits a token every ``delay_ms`` until :meth:`stop` cancels it; the socket is
    then closed with 1000.
    """

    def __init__(self, ws_url: str, user: str | None = None, *, delay_ms: int = 20,
                 secret: str = SECRET) -> None:
        import websocket  # websocket-client, a test dependency

        self.user = user or unique("load")
        self.ws = websocket.create_connection(
            ws_url, timeout=TIMEOUT, enable_multithread=True,
            header=[f"Authorization: Bearer {mint_token(secret, self.user, 3600)}"])
        self.run_id: str | None = None
        self.events = 0
        self.accepted = threading.Event()
        self.completed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ws.send(json.dumps({
            "type": "start_agent", "request_id": unique("load-run"), "agent": "scripted",
            "message": "load", "context": {"tools": 1, "tokens": 100000, "delay_ms": delay_ms}}))
        if not self.accepted.wait(TIMEOUT):
            raise AssertionError("the run was not accepted")

    def _read(self) -> None:
        import websocket

        with contextlib.suppress(websocket.WebSocketException, OSError):
            while text := self.ws.recv():  # "" once the server's close frame arrived
                frame = json.loads(text)
                if frame["type"] == "run_accepted":
                    self.run_id = frame["run_id"]
                    self.accepted.set()
                elif frame["type"] == "agent_completed":
                    self.events += 1
                    self.completed.set()
                elif "seq" in frame:
                    self.events += 1

    def stop(self) -> None:
        """Cancels the run, waits for its ``agent_completed``, closes the socket (1000)."""
        if self.run_id is not None and not self.completed.is_set():
            self.ws.send(json.dumps({"type": "cancel", "run_id": self.run_id}))
            if not self.completed.wait(TIMEOUT):
                raise AssertionError("the cancelled run never completed")
        self.ws.close()
        self._reader.join(TIMEOUT)


@contextlib.contextmanager
def load(ws_url: str, sockets: int, *, secret: str = SECRET) -> Iterator[list[LoadSocket]]:
    """``sockets`` sockets (one user each), each with one long run, until the block ends."""
    opened: list[LoadSocket] = []
    try:
        for _ in range(sockets):
            opened.append(LoadSocket(ws_url, secret=secret))
        yield opened
    finally:
        for one in opened:
            one.stop()


# ================================================================ pictures
def wait_for_figure(page: Any, name: str, op: str, value: float = 0) -> None:
    """Waits (bounded) until the figure ``name`` is a number ``op`` ``value`` (or ``na``)."""
    page.wait_for_function(METRIC_IS, arg=[name, op, value], timeout=WAIT_MS, polling=100)


def screenshot(url: str, path: str | Path, *, width: int = 1600, height: int = 1000,
               latency: bool = False) -> Path:
    """Opens the dashboard at ``url`` in the system Chromium and saves a PNG at ``path``.

    Waits until the page shows live data (and, with ``latency``, a p95 figure, so call it
    while a load runs). Returns the path written.
    """
    target = Path(path)
    with open_browser() as browser:
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url, wait_until="load", timeout=WAIT_MS)
        page.wait_for_function(
            "() => document.getElementById('status-text').textContent !== 'connecting…'",
            timeout=WAIT_MS)
        wait_for_figure(page, "runs_active", "number")
        if latency:
            wait_for_figure(page, "delivery_p95_ms", "number")
        target.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target), full_page=True)
    return target


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=screenshot.__doc__)
    parser.add_argument("url", help="the dashboard, e.g. http://127.0.0.1:8000/dashboard")
    parser.add_argument("path", help="where to write the PNG")
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="open N sockets with a long scripted run each meanwhile")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.load:
            match = re.match(r"(https?)://([^/?#]+)", args.url)
            assert match is not None, "url must be http(s)://HOST:PORT/..."
            scheme = "wss" if match[1] == "https" else "ws"
            secret = os.environ.get("REGISTRY_AUTH_SECRET", SECRET)
            stack.enter_context(load(f"{scheme}://{match[2]}/ws", args.load, secret=secret))
        print(screenshot(args.url, args.path, latency=bool(args.load)))


if __name__ == "__main__":
    _main()
