"""RunTable, the sans-IO run table: dedup, capacity, the retention bound and the counters."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from registry import (
    InvalidField,
    Overloaded,
    RateLimited,
    RegistryClosed,
    RegistryError,
    Run,
    RunNotFound,
    RunStream,
    Trigger,
)
from registry._table import RunTable

USERS = ("alice", "bob", "carol")
REQUESTS = st.sampled_from(["r1", "r2", "r3"])
#: The triggers that end a running run, and the status each gives it.
ENDINGS = {
    Trigger.SUCCEED: "succeeded",
    Trigger.FAIL: "failed",
    Trigger.CANCEL: "cancelled",
    Trigger.TIMEOUT: "timed_out",
    Trigger.DETACH: "cancelled",
    Trigger.SHUTDOWN: "cancelled",
    Trigger.STALE: "cancelled",
}
NO_SUCH_RUN = "no-such-run"


def new_run(run_id: str, user_id: str, request_id: str, created_at: float) -> Run:
    """A run as the driver admits it: built by keyword with a real stream, then started."""
    thread_id = "thread-" + run_id
    run = Run(run_id=run_id, user_id=user_id, request_id=request_id, thread_id=thread_id,
              agent="triage", message="hello", options={}, created_at=created_at,
              stream=RunStream(run_id, thread_id, "triage", 10))
    run.lifecycle.fire(Trigger.START)
    return run


def end(run: Run, ending: Trigger) -> None:
    """Ends a run's lifecycle as the driver does before ``complete``: decided, then completed."""
    run.lifecycle.fire(ending)
    run.lifecycle.fire(Trigger.COMPLETE)


def new_table(max_active: int = 10, per_user: int = 10, retained: int = 10) -> RunTable:
    return RunTable(max_active_runs=max_active, max_active_runs_per_user=per_user,
                    max_retained_runs_per_user=retained)


def not_found_text(table: RunTable, run_id: str, user_id: str) -> str:
    with pytest.raises(RunNotFound) as info:
        table.get(run_id, user_id)
    return str(info.value)


# ====================================================================== stateful model
class RunTableMachine(RuleBasedStateMachine):
    """Admits, completes and drops runs as the driver does, against a model of lists."""

    table: RunTable

    @initialize(max_active=st.integers(1, 4), per_user=st.integers(1, 3),
                retained=st.integers(1, 3))
    def open_table(self, max_active: int, per_user: int, retained: int) -> None:
        self.table = new_table(max_active, per_user, retained)
        self.max_active, self.per_user, self.retained = max_active, per_user, retained
        self.ids = itertools.count(1)
        self.clock = 0.0
        self.closing = False
        self.active: list[Run] = []  # in admission order
        self.ended: list[Run] = []  # retained, in completion order
        self.known: list[Run] = []  # every run ever admitted, dropped ones too
        self.named: dict[tuple[str, str], Run] = {}
        self.started = self.hits = 0
        self.by_status: Counter[str] = Counter()

    # ------------------------------------------------------------- helpers
    def _refusal(self, user_id: str) -> type[RegistryError] | None:
        """What ``check_room`` must raise for a new run of ``user_id`` (None: room)."""
        if not user_id:
            return InvalidField
        if self.closing:
            return RegistryClosed
        if sum(run.user_id == user_id for run in self.active) >= self.per_user:
            return RateLimited
        if len(self.active) >= self.max_active:
            return Overloaded
        return None

    def _retained(self, run_id: str) -> Run | None:
        return next((r for r in self.active + self.ended if r.run_id == run_id), None)

    def _run_ids(self) -> st.SearchStrategy[str]:
        return st.sampled_from([run.run_id for run in self.known] + [NO_SUCH_RUN])

    def _forget(self, run: Run) -> None:
        self.ended.remove(run)
        if self.named.get((run.user_id, run.request_id)) is run:
            del self.named[run.user_id, run.request_id]

    # ---------------------------------------------------------------- rules
    @rule(user_id=st.sampled_from([*USERS, ""]), request_id=REQUESTS)
    def admit(self, user_id: str, request_id: str) -> None:
        """The driver's start: a repeat finds the retained run, else check_room then add."""
        self.clock += 1.0
        found = self.table.find(user_id, request_id)
        assert found is self.named.get((user_id, request_id))
        if found is not None:
            self.hits += 1
            return
        refusal = self._refusal(user_id)
        if refusal is not None:
            with pytest.raises(refusal) as info:
                self.table.check_room(user_id)
            assert refusal is not InvalidField or getattr(info.value, "field", None) == "user_id"
            return
        self.table.check_room(user_id)
        run = new_run(f"run-{next(self.ids)}", user_id, request_id, self.clock)
        self.table.add(run)
        self.active.append(run)
        self.known.append(run)
        self.named[user_id, request_id] = run
        self.started += 1

    @precondition(lambda self: self.active)
    @rule(data=st.data(), ending=st.sampled_from(list(ENDINGS)), drop_them=st.booleans())
    def complete(self, data: st.DataObject, ending: Trigger, drop_them: bool) -> None:
        """Ends an active run; the runs of its user beyond the bound come back, oldest first."""
        run = data.draw(st.sampled_from(self.active), label="run")
        end(run, ending)
        excess = self.table.complete(run)
        self.active.remove(run)
        self.ended.append(run)
        self.by_status[ENDINGS[ending]] += 1
        mine = [r for r in self.ended if r.user_id == run.user_id]
        assert excess == mine[: max(0, len(mine) - self.retained)]
        for old in excess if drop_them else ():
            assert self.table.drop(old) is True
            self._forget(old)

    @precondition(lambda self: self.known)
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        """Only a retained ended run can be dropped, once; dropping again is a no-op."""
        run = data.draw(st.sampled_from(self.known), label="run")
        expected = run in self.ended
        assert self.table.drop(run) is expected
        if expected:
            self._forget(run)

    @precondition(lambda self: not self.closing)
    @rule()
    def close(self) -> None:
        self.table.closing = self.closing = True

    @rule(data=st.data(), user_id=st.sampled_from(USERS))
    def get(self, data: st.DataObject, user_id: str) -> None:
        """Someone else's run and a run that never existed are the same not-found."""
        run_id = data.draw(self._run_ids(), label="run_id")
        run = self._retained(run_id)
        if run is not None and run.user_id == user_id:
            assert self.table.get(run_id, user_id) is run
            return
        text = not_found_text(self.table, run_id, user_id)
        assert text == not_found_text(new_table(), run_id, user_id)

    @rule(data=st.data())
    def lookup(self, data: st.DataObject) -> None:
        run_id = data.draw(self._run_ids(), label="run_id")
        assert self.table.lookup(run_id) is self._retained(run_id)

    @rule(data=st.data())
    def stale(self, data: st.DataObject) -> None:
        horizon = data.draw(st.floats(-1.0, self.clock + 1.0), label="horizon")
        expected = [run for run in self.active if run.created_at <= horizon]
        assert self.table.stale(horizon) == expected

    # ------------------------------------------------------------ invariants
    @invariant()
    def runs_are_where_the_model_says(self) -> None:
        assert list(self.table.active()) == self.active
        assert self.table.oldest_ended() is (self.ended[0] if self.ended else None)
        assert self.table.active_count == len(self.active)
        assert self.table.retained_count == len(self.active) + len(self.ended)
        assert self.table.active_per_user() == dict(Counter(r.user_id for r in self.active))

    @invariant()
    def counters_match(self) -> None:
        assert self.table.runs_started == self.started
        assert self.table.dedup_hits == self.hits
        assert dict(self.table.completed_by_status) == dict(self.by_status)
        assert self.table.runs_completed == sum(self.by_status.values())


RunTableMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestRunTableMachine = RunTableMachine.TestCase


# ================================================================== edge cases by hand
def test_the_refusals_come_in_the_documented_order() -> None:
    """An empty user, then shutting down, then the user's limit, then the registry's."""
    table = new_table(max_active=1, per_user=1)
    table.add(new_run("run-1", "alice", "r1", 0.0))
    refusals: list[Any] = []
    for user_id, closing in (("", True), ("alice", True), ("alice", False), ("bob", False)):
        table.closing = closing
        with pytest.raises(RegistryError) as info:
            table.check_room(user_id)
        refusals.append(type(info.value))
    assert refusals == [InvalidField, RegistryClosed, RateLimited, Overloaded]


def test_a_request_added_again_is_named_by_the_newer_run_until_that_one_is_dropped() -> None:
    """A caller that skips ``find`` re-names the request; dropping the older run keeps that."""
    table = new_table()
    older, newer = new_run("run-1", "alice", "r1", 0.0), new_run("run-2", "alice", "r1", 1.0)
    for run in (older, newer):
        table.add(run)
    for run, ending in ((older, Trigger.SUCCEED), (newer, Trigger.CANCEL)):
        end(run, ending)
        assert table.complete(run) == []
    assert table.drop(older) is True
    assert table.find("alice", "r1") is newer
    assert table.oldest_ended() is newer
    assert table.drop(newer) is True
    assert table.find("alice", "r1") is None
    assert (table.dedup_hits, table.retained_count, table.oldest_ended()) == (1, 0, None)


def test_completing_beyond_the_bound_returns_the_oldest_first() -> None:
    table = new_table(retained=1)
    runs = [new_run(f"run-{i}", "alice", f"r{i}", float(i)) for i in range(3)]
    for run in runs:
        table.add(run)
    for run in reversed(runs):  # completion order, not admission order, decides "oldest"
        end(run, Trigger.SUCCEED)
        excess = table.complete(run)
    assert excess == [runs[2], runs[1]]
    assert table.oldest_ended() is runs[2]
