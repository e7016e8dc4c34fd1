"""Fixtures of the end-to-end tests: a server running in the test's own trio run."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.harness._support import Server, open_server


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    """A server with the default settings (``shutdown_grace_s`` 2) and the demo agents."""
    async with open_server() as running:
        yield running
