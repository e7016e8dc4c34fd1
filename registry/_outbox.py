"""What a node still has to write to the shared state, in order, bounded; sans-IO.

The node that runs a run records its events locally first (its own sockets get them at
once) and queues them here; one replicator task writes them to the shared state in batches.
While the shared state is unreachable they wait here, in order. Nothing is ever dropped
(another node would see a gap); instead, once the bound is passed, the registry ends the
runs that keep emitting (``failed``): each adds only its closing events, so memory stays
bounded.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Final, final

import attrs

__all__ = ["Abandon", "Append", "Disconnect", "Finish", "Operation", "Outbox", "Tools", "Trim"]

#: How many operations one write takes at most.
BATCH: Final = 256


@final
@attrs.frozen
class Append:
    """Events of a run to append: (seq, wire bytes), contiguous."""

    run_id: str
    entries: tuple[tuple[int, bytes], ...]

    @property
    def size(self) -> int:
        return sum(len(frame) for _, frame in self.entries)


@final
@attrs.frozen
class Tools:
    """A run's open tool calls changed."""

    run_id: str
    open_tools: Mapping[str, str]

    size = 0


@final
@attrs.frozen
class Trim:
    """A run was acknowledged through ``seq`` on this node (followers elsewhere spared)."""

    run_id: str
    seq: int

    size = 0


@final
@attrs.frozen
class Finish:
    """A run ended (after its last Append)."""

    run_id: str
    retention_s: float

    size = 0


@final
@attrs.frozen
class Disconnect:
    """A connection closed: it no longer counts against its user's limit."""

    user_id: str
    conn_id: str

    run_id = ""
    size = 0


@final
@attrs.frozen
class Abandon:
    """An admission whose answer never came (the shared state timed out): if it was
    registered after all, it is undone, so that no dedup key or slot points at a run that
    no node runs."""

    run_id: str

    size = 0


Operation = Append | Tools | Trim | Finish | Disconnect | Abandon


@final
class Outbox:
    """Operations waiting to be written, oldest first, bounded by count and bytes.

    Args:
        max_operations: At most this many operations wait.
        max_bytes: At most this many event bytes wait.
    """

    def __init__(self, *, max_operations: int, max_bytes: int) -> None:
        self.max_operations = max_operations
        self.max_bytes = max_bytes
        self._waiting: deque[Operation] = deque()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def full(self) -> bool:
        """Past a bound: what may be skipped (a trim) is not queued."""
        return len(self._waiting) >= self.max_operations or self.bytes > self.max_bytes

    def push(self, operation: Operation) -> bool:
        """Queues ``operation``; returns False when the outbox is now past its bounds."""
        self._waiting.append(operation)
        self.bytes += operation.size
        return len(self._waiting) <= self.max_operations and self.bytes <= self.max_bytes

    def take(self) -> list[Operation]:
        """The oldest operations, up to :data:`BATCH`, removed (see :meth:`give_back`)."""
        batch = [self._waiting.popleft() for _ in range(min(BATCH, len(self._waiting)))]
        self.bytes -= sum(op.size for op in batch)
        return batch

    def give_back(self, batch: list[Operation]) -> None:
        """Puts a batch that could not be written back in front, in its order."""
        self._waiting.extendleft(reversed(batch))
        self.bytes += sum(op.size for op in batch)

    def runs(self) -> set[str]:
        """The runs with operations waiting."""
        return {op.run_id for op in self._waiting if op.run_id}
