"""Fixtures of the registry tests."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator

import pytest

#: Wall-clock budget of one registry test; each normally takes well under a second.
HANG_S = 20.0


@pytest.fixture
def hang_watchdog(request: pytest.FixtureRequest) -> Iterator[None]:
    """Ends the session, naming the test, if the test is still running after ``HANG_S``.

    A registry bug can leave ``open_registry``'s shielded exit waiting forever, which no
    cancel scope of the test can interrupt; this turns such a hang into a loud failure.
    """
    def abort() -> None:
        sys.stderr.write(f"\nHANG: {request.node.nodeid} still running after {HANG_S} s\n")
        sys.stderr.flush()
        os._exit(70)

    timer = threading.Timer(HANG_S, abort)
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()
