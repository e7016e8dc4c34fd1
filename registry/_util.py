"""Small helpers shared by the registry and the harness."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager, asynccontextmanager

import anyio
import anyio.lowlevel
import sniffio
import trio

__all__ = ["Lock", "checkpoints", "deadlines", "new_lock", "unwrapping_groups"]

Checkpoint = Callable[[], Awaitable[None]]
Deadline = Callable[[float], AbstractContextManager[object]]
Lock = anyio.Lock | trio.Lock


def _on_trio() -> bool:
    try:
        return sniffio.current_async_library() == "trio"
    except sniffio.AsyncLibraryNotFoundError:
        return False


def checkpoints() -> tuple[Checkpoint, Checkpoint]:
    """``checkpoint_if_cancelled`` and ``cancel_shielded_checkpoint`` of the running backend.

    Under trio, trio's own: anyio's dispatch to the backend costs more than the check (the
    registry makes one per event). Elsewhere, anyio's.
    """
    if _on_trio():
        return trio.lowlevel.checkpoint_if_cancelled, trio.lowlevel.cancel_shielded_checkpoint
    return anyio.lowlevel.checkpoint_if_cancelled, anyio.lowlevel.cancel_shielded_checkpoint


def deadlines() -> tuple[Deadline, tuple[type[Exception], ...]]:
    """``fail_after`` of the running backend, and what it raises when time is up.

    Under trio, trio's own (``TooSlowError``): anyio's scope around trio's costs as much
    again, and a service node sets one per Redis call. Elsewhere, anyio's (``TimeoutError``).
    """
    if _on_trio():
        return trio.fail_after, (trio.TooSlowError,)
    return anyio.fail_after, (TimeoutError,)


def new_lock() -> Lock:
    """A lock of the running backend (trio's own under trio, for the same reason)."""
    return trio.Lock() if _on_trio() else anyio.Lock()


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
