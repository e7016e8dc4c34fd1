"""Fixtures of the end-to-end tests: each protocol test runs against both servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.harness._support import SERVER_KINDS, SHARED, SHARED_REDIS, Server, default_server


@pytest.fixture(params=SERVER_KINDS)
def server_kind(request: pytest.FixtureRequest) -> str:
    """``trio``, ``fastapi`` or ``cluster``: a test taking it runs against each server."""
    kind: str = request.param
    return kind


@pytest.fixture
async def server(server_kind: str) -> AsyncIterator[Server]:
    """A server with the default settings (``shutdown_grace_s`` 2) and the demo agents.

    The trio server runs in the test's trio run; the FastAPI one is the session's shared
    subprocess, handed over idle.
    """
    async with default_server(server_kind) as running:
        yield running


@pytest.fixture(scope="session", autouse=True)
def _stop_the_shared_server() -> Iterator[None]:
    yield
    SHARED.close()
    SHARED_REDIS.close()
