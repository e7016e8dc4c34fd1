"""Small helpers shared by the registry and the harness."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["unwrapping_groups"]


@asynccontextmanager
async def unwrapping_groups() -> AsyncIterator[None]:
    """Re-raises a lone exception out of the exception groups task groups wrap it in.

    Wrap an ``async with`` that owns a task group so that its users catch what their own
    code raised (``KeyError``, ``ChatError``), as with trio-websocket's ``open_websocket``.
    Groups of several exceptions pass through unchanged.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        inner: BaseException = group
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if inner is group:
            raise
        raise inner from None
