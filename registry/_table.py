"""Every run the registry knows, sans-IO: indexes, dedup, capacity and the run counters.

A :class:`RunTable` is pure and synchronous, like :class:`~registry.RunStream`: no task, no
clock (times come in as arguments), no I/O. The registry's driver asks it whether a run may
start, records where each run is (active, ended and retained, dropped), and reads the
counters back. Its rules:

* (user_id, request_id) names at most one retained run: a repeated request finds it;
* a new run needs room: fewer than ``max_active_runs_per_user`` runs of its user in flight,
  fewer than ``max_active_runs`` in all, and the table not closing;
* an ended run stays retained until dropped; a user keeps at most
  ``max_retained_runs_per_user`` ended runs (the oldest is dropped first), and
  :meth:`RunTable.oldest_ended` names the next to drop when memory is short.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import final

from registry._errors import (
    InvalidField,
    Overloaded,
    RateLimited,
    RegistryClosed,
    RunNotFound,
    quote,
)
from registry._run import Run

__all__ = ["RunTable"]


@final
class RunTable:
    """The registry's runs and their counters.

    Args:
        max_active_runs: Runs in flight in all.
        max_active_runs_per_user: Runs in flight per user.
        max_retained_runs_per_user: Ended runs a user keeps for late resumes.
    """

    def __init__(
        self, *, max_active_runs: int, max_active_runs_per_user: int,
        max_retained_runs_per_user: int,
    ) -> None:
        self.max_active_runs = max_active_runs
        self.max_active_runs_per_user = max_active_runs_per_user
        self.max_retained_runs_per_user = max_retained_runs_per_user
        self.closing = False
        self._runs: dict[str, Run] = {}
        self._by_request: dict[tuple[str, str], Run] = {}
        self._active: dict[str, Run] = {}
        self._active_per_user: Counter[str] = Counter()
        self._ended: dict[str, Run] = {}  # oldest first
        self._ended_per_user: dict[str, dict[str, Run]] = {}
        self.runs_started = 0
        self.dedup_hits = 0
        self.completed_by_status: Counter[str] = Counter()

    # ------------------------------------------------------------- queries
    def find(self, user_id: str, request_id: str) -> Run | None:
        """The retained run of this (user, request_id), counted as a dedup hit if found."""
        run = self._by_request.get((user_id, request_id))
        if run is not None:
            self.dedup_hits += 1
        return run

    def get(self, run_id: str, user_id: str) -> Run:
        """The retained run ``run_id`` of ``user_id``.

        Raises:
            RunNotFound: it does not exist, is no longer retained, or belongs to someone
                else (indistinguishable).
        """
        run = self._runs.get(run_id)
        if run is None or run.user_id != user_id:
            raise RunNotFound(f"no run {quote(run_id)}")
        return run

    def lookup(self, run_id: str) -> Run | None:
        """The retained run ``run_id`` whoever it belongs to (for the registry's own use)."""
        return self._runs.get(run_id)

    def active(self) -> Iterator[Run]:
        return iter(tuple(self._active.values()))

    def own(self) -> list[Run]:
        """The runs this registry runs or ran and retains (no mirror), oldest first."""
        return [run for run in self._runs.values() if not run._mirror]

    def stale(self, horizon: float) -> list[Run]:
        """The active runs created at or before ``horizon``."""
        return [run for run in self._active.values() if run.created_at <= horizon]

    def oldest_ended(self) -> Run | None:
        """The ended run retained longest (the first to drop when memory is short)."""
        return next(iter(self._ended.values()), None)

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def retained_count(self) -> int:
        """Runs retained, active ones included."""
        return len(self._runs)

    def active_per_user(self) -> dict[str, int]:
        return dict(self._active_per_user)

    @property
    def runs_completed(self) -> int:
        return sum(self.completed_by_status.values())

    # ------------------------------------------------------------ changes
    def check_room(self, user_id: str) -> None:
        """Raises unless a new run of ``user_id`` may start now.

        Raises:
            InvalidField: ``user_id`` is empty (field ``user_id``).
            RegistryClosed: the registry is shutting down.
            RateLimited: the user is at ``max_active_runs_per_user``.
            Overloaded: the registry is at ``max_active_runs``.
        """
        if not user_id:
            raise InvalidField("user_id", "user_id must be a non-empty string")
        if self.closing:
            raise RegistryClosed("the registry is shutting down")
        limit = self.max_active_runs_per_user
        if self._active_per_user[user_id] >= limit:
            raise RateLimited(f"the user already has {limit} runs in flight")
        if len(self._active) >= self.max_active_runs:
            raise Overloaded(f"at max_active_runs ({self.max_active_runs})")

    def add(self, run: Run) -> None:
        """Records a new active run (after :meth:`check_room`)."""
        self._runs[run.run_id] = self._active[run.run_id] = run
        self._by_request[run.user_id, run.request_id] = run
        self._active_per_user[run.user_id] += 1
        self.runs_started += 1

    def add_mirror(self, run: Run) -> None:
        """Records a mirror of another node's run: findable, counted nowhere."""
        self._runs[run.run_id] = run

    def drop_mirror(self, run: Run) -> None:
        if self._runs.get(run.run_id) is run:
            del self._runs[run.run_id]

    def complete(self, run: Run) -> list[Run]:
        """Moves an active run to the ended ones; returns the runs its user now has too many of.

        The caller drops those (:meth:`drop`), oldest first.
        """
        del self._active[run.run_id]
        self._active_per_user[run.user_id] -= 1
        if not self._active_per_user[run.user_id]:
            del self._active_per_user[run.user_id]
        self.completed_by_status[str(run.status)] += 1
        self._ended[run.run_id] = run
        mine = self._ended_per_user.setdefault(run.user_id, {})
        mine[run.run_id] = run
        excess = len(mine) - self.max_retained_runs_per_user
        return list(mine.values())[:excess] if excess > 0 else []

    def drop(self, run: Run) -> bool:
        """Forgets an ended run; False when it was already dropped."""
        if self._ended.pop(run.run_id, None) is None:
            return False
        mine = self._ended_per_user[run.user_id]
        del mine[run.run_id]
        if not mine:
            del self._ended_per_user[run.user_id]
        del self._runs[run.run_id]
        if self._by_request.get((run.user_id, run.request_id)) is run:
            del self._by_request[run.user_id, run.request_id]
        return True
