"""RunLifecycle, the sans-IO transition table of a run."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry import IllegalTransition, RunLifecycle, RunState, RunStatus, Trigger
from registry._lifecycle import TRANSITIONS

C, R, G, D = RunState.CREATED, RunState.RUNNING, RunState.COMPLETING, RunState.COMPLETED
ENDINGS = {
    Trigger.SUCCEED: RunStatus.SUCCEEDED,
    Trigger.FAIL: RunStatus.FAILED,
    Trigger.CANCEL: RunStatus.CANCELLED,
    Trigger.TIMEOUT: RunStatus.TIMED_OUT,
    Trigger.DETACH: RunStatus.CANCELLED,
    Trigger.SHUTDOWN: RunStatus.CANCELLED,
    Trigger.STALE: RunStatus.CANCELLED,
}
#: The legal moves as the module docstring draws them: (state, trigger) -> (next, status).
EXPECTED: dict[tuple[RunState, Trigger], tuple[RunState, RunStatus | None]] = {
    (C, Trigger.START): (R, None),
    **{(R, t): (G, s) for t, s in ENDINGS.items()},
    **{(C, t): (G, s) for t, s in ENDINGS.items() if t not in (Trigger.SUCCEED, Trigger.FAIL)},
    (G, Trigger.COMPLETE): (D, None),
}
PATH_TO = {C: [], R: [Trigger.START], G: [Trigger.START, Trigger.FAIL],
           D: [Trigger.START, Trigger.FAIL, Trigger.COMPLETE]}
ALL_PAIRS = list(itertools.product(RunState, Trigger))


def lifecycle_in(state: RunState) -> RunLifecycle:
    """A lifecycle brought to ``state`` through legal triggers only."""
    lifecycle = RunLifecycle()
    for trigger in PATH_TO[state]:
        lifecycle.fire(trigger)
    assert lifecycle.state is state
    return lifecycle


def test_the_table_is_the_documented_one() -> None:
    assert TRANSITIONS == EXPECTED


def test_a_new_run_is_created_and_active_without_status() -> None:
    lifecycle = RunLifecycle()
    assert (lifecycle.state, lifecycle.status) == (C, None)
    assert lifecycle.active


@pytest.mark.parametrize(("state", "trigger"), sorted(EXPECTED, key=str))
def test_every_legal_transition_moves_as_the_table_says(
    state: RunState, trigger: Trigger
) -> None:
    lifecycle = lifecycle_in(state)
    status_before = lifecycle.status
    assert lifecycle.can(trigger)
    new_state, status = EXPECTED[state, trigger]
    assert lifecycle.fire(trigger) is new_state
    assert lifecycle.state is new_state
    assert lifecycle.status is (status if status is not None else status_before)
    assert lifecycle.active == (new_state in (C, R))


@pytest.mark.parametrize(
    ("state", "trigger"), [p for p in ALL_PAIRS if p not in EXPECTED], ids=str
)
def test_every_illegal_pair_raises_and_changes_nothing(
    state: RunState, trigger: Trigger
) -> None:
    lifecycle = lifecycle_in(state)
    before = (lifecycle.state, lifecycle.status)
    assert not lifecycle.can(trigger)
    with pytest.raises(IllegalTransition, match=trigger.value):
        lifecycle.fire(trigger)
    assert (lifecycle.state, lifecycle.status) == before


@pytest.mark.parametrize("first", list(ENDINGS))
def test_the_first_ending_wins(first: Trigger) -> None:
    lifecycle = lifecycle_in(R)
    lifecycle.fire(first)
    for later in ENDINGS:
        with pytest.raises(IllegalTransition):
            lifecycle.fire(later)
    lifecycle.fire(Trigger.COMPLETE)
    assert lifecycle.status == ENDINGS[first]
    assert not lifecycle.active


@settings(max_examples=200, deadline=None)
@given(triggers=st.lists(st.sampled_from(list(Trigger)), max_size=12))
def test_random_trigger_sequences_end_at_most_once(triggers: list[Trigger]) -> None:
    lifecycle = RunLifecycle()
    decided: Trigger | None = None
    for trigger in triggers:
        legal = lifecycle.can(trigger)
        try:
            lifecycle.fire(trigger)
        except IllegalTransition:
            assert not legal
            continue
        assert legal
        if trigger in ENDINGS:
            assert decided is None
            decided = trigger
    assert lifecycle.status is (ENDINGS[decided] if decided else None)
    assert lifecycle.active == (decided is None)
