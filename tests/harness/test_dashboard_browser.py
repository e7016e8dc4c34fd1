"""PROTOCOL.md v2's dashboard in a real browser (the system Chromium under Playwright).

These are plain synchronous tests: the server is a subprocess, the load runs in threads
(websocket-client), and every wait is ``page.wait_for_function`` polling the DOM, bounded.
They fail (never skip) when Playwright or Chromium is missing; see ``_browser.py``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any, Final

import pytest

from tests.harness._browser import (
    METRIC_TEXT,
    WAIT_MS,
    ServerProcess,
    load,
    open_browser,
    server_process,
    wait_for_figure,
)

REQUIRED: Final = ("runs_active", "connections_active", "events_per_second", "delivery_p95_ms",
                   "events_failed")
NUMBER_OR_NA: Final = re.compile(r"-?\d+(\.\d+)?|n/a")
METRICS_TOKEN: Final = "dash-" + uuid.uuid4().hex
STATUS_IS: Final = "want => document.getElementById('status-text').textContent === want"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with open_browser() as running:
        yield running


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with server_process() as running:
        yield running


@pytest.fixture(scope="module")
def guarded_server() -> Iterator[ServerProcess]:
    with server_process(metrics_token=METRICS_TOKEN) as running:
        yield running


class Watched:
    """A page with every console error, page error and request it made recorded."""

    def __init__(self, browser: Any) -> None:
        self.page = browser.new_page(viewport={"width": 1400, "height": 900})
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def open(self, url: str) -> Any:
        return self.page.goto(url, wait_until="load", timeout=WAIT_MS)

    def figure(self, name: str) -> str | None:
        text: str | None = self.page.evaluate(METRIC_TEXT, name)
        return text

    def wait_status(self, status: str) -> None:
        self.page.wait_for_function(STATUS_IS, arg=status, timeout=WAIT_MS, polling=100)


@pytest.fixture
def watched(browser: Any) -> Iterator[Watched]:
    one = Watched(browser)
    try:
        yield one
    finally:
        one.page.close()


def test_the_page_loads_without_errors_and_shows_every_figure(
        server: ServerProcess, watched: Watched) -> None:
    response = watched.open(server.url())
    assert response.status == 200
    watched.wait_status("ready")
    wait_for_figure(watched.page, "runs_active", "number")
    names = watched.page.eval_on_selector_all(
        "[data-metric]", "els => els.map(e => e.getAttribute('data-metric'))")
    for name in REQUIRED:
        assert name in names, f"no element with data-metric={name!r}"
    figures = {name: watched.figure(name) for name in names}
    assert all(NUMBER_OR_NA.fullmatch(text or "") for text in figures.values()), figures
    assert figures["events_failed"] == "0"
    assert watched.errors == []
    origin = server.url("/")
    assert all(url.startswith(origin) for url in watched.requests), watched.requests


def test_the_figures_follow_a_load_started_beside_the_page(
        server: ServerProcess, watched: Watched) -> None:
    watched.open(server.url())
    wait_for_figure(watched.page, "runs_active", "==", 0)
    wait_for_figure(watched.page, "connections_active", "==", 0)
    with load(server.ws_url(), 3) as sockets:
        wait_for_figure(watched.page, "runs_active", "==", 3)
        wait_for_figure(watched.page, "connections_active", "==", 3)
        wait_for_figure(watched.page, "events_per_second", ">", 0)
        wait_for_figure(watched.page, "delivery_p95_ms", "number")
        assert all(s.events > 1 for s in sockets)
    wait_for_figure(watched.page, "runs_active", "==", 0)
    wait_for_figure(watched.page, "connections_active", "==", 0)
    assert watched.figure("events_failed") == "0"
    assert watched.errors == []


def test_with_metrics_token_the_page_opened_with_the_token_works(
        guarded_server: ServerProcess, watched: Watched) -> None:
    response = watched.open(guarded_server.url(f"/dashboard?token={METRICS_TOKEN}"))
    assert response.status == 200
    watched.wait_status("ready")
    wait_for_figure(watched.page, "runs_active", "==", 0)
    wait_for_figure(watched.page, "events_failed", "==", 0)
    assert watched.errors == []


def test_with_metrics_token_the_page_without_it_is_refused(
        guarded_server: ServerProcess, watched: Watched) -> None:
    response = watched.open(guarded_server.url())
    assert response.status == 401
    assert watched.page.locator("[data-metric]").count() == 0


def test_with_metrics_token_a_page_whose_data_is_refused_shows_disconnected(
        guarded_server: ServerProcess, watched: Watched) -> None:
    """The page itself let through (e.g. a proxy added the header), its data requests not."""
    page_url = guarded_server.url()

    def authorise_the_page_only(route: Any) -> None:
        headers = {**route.request.headers, "authorization": f"Bearer {METRICS_TOKEN}"}
        route.continue_(headers=headers)

    watched.page.route(page_url, authorise_the_page_only)
    assert watched.open(page_url).status == 200
    watched.wait_status("disconnected")
    assert watched.page.get_attribute("#banner", "data-level") == "crit"
    reasons = watched.page.inner_text("#reasons")
    assert "401" in reasons, reasons
    for name in REQUIRED:
        assert watched.figure(name) == "n/a"
