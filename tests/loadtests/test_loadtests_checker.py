"""Tests of the pure run checker: valid streams pass, every mutation is caught by its kind."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loadtests.checker import (
    ClientChecker,
    GuaranteeViolated,
    Kind,
    RunChecker,
    check_run,
    payload_problem,
    run_violations,
)
from loadtests.wire import scripted_context, scripted_types

Frame = dict[str, Any]
RUN = "run-a"
THREAD = "thread-a"


def envelope(etype: str, seq: int, payload: dict[str, Any], run_id: str = RUN) -> Frame:
    """Build one run event frame."""
    return {
        "type": etype,
        "run_id": run_id,
        "thread_id": THREAD,
        "seq": seq,
        "ts": 1_700_000_000.0 + seq,
        "payload": payload,
    }


def renumber(frames: Sequence[Frame]) -> list[Frame]:
    """Return copies of ``frames`` with seq 1..n in list order."""
    return [{**frame, "seq": i} for i, frame in enumerate(frames, start=1)]


@st.composite
def segments(draw: st.DrawFn, call_base: int) -> list[tuple[str, dict[str, Any]]]:
    """Draw the middle of a run: thinking, partial results and tool pairs (maybe wrapping)."""
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(draw(st.integers(0, 6))):
        choice = draw(st.sampled_from(["think", "partial", "tool"]))
        if choice == "tool":
            call = {"tool": "search", "call_id": f"c{call_base}-{i}"}
            out.append(("tool_executing", {**call, "args": {}}))
            out.extend(("partial_result", {"text": "x"}) for _ in range(draw(st.integers(0, 2))))
            out.append(("tool_completed", {**call, "status": "ok", "result": 1}))
        elif choice == "think":
            out.append(("agent_thinking", {"thought": "hmm"}))
        else:
            out.append(("partial_result", {"text": "x"}))
    return out


@st.composite
def valid_runs(draw: st.DrawFn) -> list[Frame]:
    """Draw a valid stream of one run: agent_started, a middle, agent_completed."""
    middle = draw(segments(call_base=draw(st.integers(0, 9))))
    body = [("agent_started", {"agent": "research"}), *middle]
    body.append(("agent_completed", {"status": "succeeded", "result": "ok"}))
    return [envelope(etype, seq, payload) for seq, (etype, payload) in enumerate(body, start=1)]


def kinds_of(frames: Sequence[Frame], script: tuple[str, ...] | None = None) -> set[Kind]:
    """Feed ``frames`` to a fresh run checker and return the kinds it reports."""
    checker = RunChecker(RUN, THREAD, script)
    for frame in frames:
        checker.feed(frame)
    checker.finish()
    return {violation.kind for violation in checker.violations}


@given(valid_runs())
def test_valid_runs_have_no_violation(frames: list[Frame]) -> None:
    assert kinds_of(frames) == set()


@given(st.integers(0, 5), st.integers(0, 8), st.data())
def test_scripted_stream_matches_its_script(tools: int, tokens: int, data: st.DataObject) -> None:
    fail_at = data.draw(st.none() | st.integers(1, tools)) if tools else None
    script = scripted_types(scripted_context(tools, tokens, 0, fail_at))
    expected_len = 3 + 2 * (fail_at or 0) if fail_at else 3 + 2 * tools + tokens
    assert len(script) == expected_len
    frames = [envelope(t, i, {"call_id": f"c{(i - 1) // 2}"}) for i, t in enumerate(script, 1)]
    assert kinds_of(frames, script) == set()


@given(valid_runs(), st.data())
def test_dropped_event_is_lost_or_unterminated(frames: list[Frame], data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(frames) - 1))
    mutated = frames[:index] + frames[index + 1 :]
    expected = Kind.UNTERMINATED if index == len(frames) - 1 else Kind.LOST
    assert expected in kinds_of(mutated)


@given(valid_runs(), st.data())
def test_dropped_event_is_lost_when_the_script_is_known(
    frames: list[Frame], data: st.DataObject
) -> None:
    script = tuple(frame["type"] for frame in frames)
    index = data.draw(st.integers(0, len(frames) - 1))
    assert Kind.LOST in kinds_of(frames[:index] + frames[index + 1 :], script)


@given(valid_runs(), st.data())
def test_duplicate_is_detected(frames: list[Frame], data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(frames) - 1))
    at = data.draw(st.integers(index + 1, len(frames)))
    mutated = [*frames[:at], dict(frames[index]), *frames[at:]]
    assert kinds_of(mutated) == {Kind.DUPLICATE}


@given(valid_runs(), st.data())
def test_swap_is_reordered(frames: list[Frame], data: st.DataObject) -> None:
    if len(frames) < 3:
        frames = [*frames, envelope("agent_completed", len(frames) + 1, {})]
    index = data.draw(st.integers(0, len(frames) - 2))
    mutated = list(frames)
    mutated[index], mutated[index + 1] = mutated[index + 1], mutated[index]
    assert Kind.REORDERED in kinds_of(mutated)


@given(valid_runs(), st.integers(1, 10))
def test_truncated_run_is_unterminated(frames: list[Frame], cut: int) -> None:
    mutated = frames[: max(0, len(frames) - cut)]
    assert kinds_of(mutated) == {Kind.UNTERMINATED}


@given(valid_runs().filter(lambda fs: any(f["type"] == "tool_completed" for f in fs)), st.data())
def test_missing_tool_completion_is_unpaired(frames: list[Frame], data: st.DataObject) -> None:
    completions = [i for i, frame in enumerate(frames) if frame["type"] == "tool_completed"]
    index = data.draw(st.sampled_from(completions))
    assert kinds_of(renumber(frames[:index] + frames[index + 1 :])) == {Kind.UNPAIRED_TOOL}


@given(valid_runs().filter(lambda fs: any(f["type"] == "tool_executing" for f in fs)), st.data())
def test_second_tool_completion_is_unpaired(frames: list[Frame], data: st.DataObject) -> None:
    completions = [i for i, frame in enumerate(frames) if frame["type"] == "tool_completed"]
    index = data.draw(st.sampled_from(completions))
    mutated = renumber([*frames[: index + 1], dict(frames[index]), *frames[index + 1 :]])
    assert kinds_of(mutated) == {Kind.UNPAIRED_TOOL}


def test_agent_started_must_be_first() -> None:
    frames = renumber([envelope("agent_thinking", 0, {}), envelope("agent_completed", 0, {})])
    assert kinds_of(frames) == {Kind.REORDERED}


def test_event_after_terminal_is_reordered() -> None:
    frames = renumber(
        [envelope(t, 0, {}) for t in ("agent_started", "agent_completed", "partial_result")]
    )
    assert kinds_of(frames) == {Kind.REORDERED}


def test_second_terminal_is_reordered() -> None:
    frames = renumber(
        [envelope(t, 0, {}) for t in ("agent_started", "agent_completed", "agent_completed")]
    )
    assert kinds_of(frames) == {Kind.REORDERED}


def test_bad_envelope_is_malformed() -> None:
    frames = [envelope("agent_started", 1, {}), {"type": "agent_thinking", "run_id": RUN}]
    frames.append(envelope("agent_completed", 2, {}))
    assert kinds_of(frames) == {Kind.MALFORMED}


@given(valid_runs(), st.data())
def test_resume_overlap_is_not_duplicate(frames: list[Frame], data: st.DataObject) -> None:
    held = data.draw(st.integers(0, len(frames)))
    after = data.draw(st.integers(0, held))
    checker = RunChecker(RUN, THREAD)
    for frame in frames[:held]:
        checker.feed(frame)
    checker.resume(after)
    for frame in frames[after:]:
        checker.feed(frame)
    checker.finish()
    assert checker.violations == ()


@given(valid_runs(), st.data())
def test_reconnect_resume_fills_exactly_the_missing(
    frames: list[Frame], data: st.DataObject
) -> None:
    held = data.draw(st.integers(0, len(frames)))
    client = ClientChecker()
    client.start_sent("req-1")
    client.on_frame(
        {
            "type": "run_accepted",
            "request_id": "req-1",
            "run_id": RUN,
            "thread_id": THREAD,
            "duplicate": False,
        }
    )
    for frame in frames[:held]:
        client.on_frame(frame)
    assert client.socket_replaced() == []
    client.resume_sent(RUN, client.runs[RUN].last_seq)
    for frame in frames[held:]:
        client.on_frame(frame)
    client.finish()
    assert client.violations == []
    assert client.runs[RUN].delivered == len(frames)


@given(valid_runs(), st.data())
def test_resume_that_skips_an_event_is_lost(frames: list[Frame], data: st.DataObject) -> None:
    held = data.draw(st.integers(0, len(frames) - 2))
    checker = RunChecker(RUN, THREAD)
    for frame in frames[:held]:
        checker.feed(frame)
    checker.resume(held)
    for frame in frames[held + 1 :]:
        checker.feed(frame)
    checker.finish()
    assert {violation.kind for violation in checker.violations} == {Kind.LOST}


def accepted_client(run_id: str = RUN) -> ClientChecker:
    """Return a client checker whose socket started ``run_id``."""
    client = ClientChecker()
    client.start_sent("req-1")
    client.on_frame(
        {
            "type": "run_accepted",
            "request_id": "req-1",
            "run_id": run_id,
            "thread_id": THREAD,
            "duplicate": False,
        }
    )
    return client


@given(valid_runs(), st.data())
def test_foreign_run_is_detected(frames: list[Frame], data: st.DataObject) -> None:
    client = accepted_client()
    index = data.draw(st.integers(0, len(frames)))
    stranger = envelope("agent_started", 1, {"agent": "echo"}, run_id="run-b")
    for frame in [*frames[:index], stranger, *frames[index:]]:
        client.on_frame(frame)
    client.finish()
    assert {violation.kind for violation in client.violations} == {Kind.FOREIGN}


def test_events_before_run_accepted_are_held_not_foreign() -> None:
    client = ClientChecker()
    client.start_sent("req-1")
    assert client.on_frame(envelope("agent_started", 1, {})) == []
    client.on_frame(
        {
            "type": "run_accepted",
            "request_id": "req-1",
            "run_id": RUN,
            "thread_id": THREAD,
            "duplicate": False,
        }
    )
    client.on_frame(envelope("agent_completed", 2, {}))
    assert client.finish() == []
    assert client.violations == []


def test_held_event_of_another_run_is_foreign_once_answered() -> None:
    client = ClientChecker()
    client.start_sent("req-1")
    client.on_frame(envelope("agent_started", 1, {}, run_id="run-b"))
    found = client.on_frame(
        {
            "type": "run_accepted",
            "request_id": "req-1",
            "run_id": RUN,
            "thread_id": THREAD,
            "duplicate": False,
        }
    )
    assert [violation.kind for violation in found] == [Kind.FOREIGN]


def test_other_thread_id_is_foreign() -> None:
    client = accepted_client()
    frame = {**envelope("agent_started", 1, {}), "thread_id": "someone-else"}
    assert [violation.kind for violation in client.on_frame(frame)] == [Kind.FOREIGN]


def test_duplicate_accept_for_new_request_is_duplicate() -> None:
    client = ClientChecker()
    client.start_sent("req-1")
    client.on_frame(
        {
            "type": "run_accepted",
            "request_id": "req-1",
            "run_id": RUN,
            "thread_id": THREAD,
            "duplicate": True,
        }
    )
    for frame in (envelope("agent_started", 1, {}), envelope("agent_completed", 2, {})):
        client.on_frame(frame)
    client.finish()
    assert [violation.kind for violation in client.violations] == [Kind.DUPLICATE]


def test_events_after_socket_change_without_resume_are_foreign() -> None:
    client = accepted_client()
    client.on_frame(envelope("agent_started", 1, {}))
    client.socket_replaced()
    found = client.on_frame(envelope("agent_thinking", 2, {}))
    assert [violation.kind for violation in found] == [Kind.FOREIGN]


def test_finish_returns_only_what_it_found_and_is_idempotent() -> None:
    checker = RunChecker(RUN, THREAD)
    checker.feed(envelope("agent_started", 1, {}))
    assert [v.kind for v in checker.feed(envelope("agent_started", 1, {}))] == [Kind.DUPLICATE]
    assert [v.kind for v in checker.finish()] == [Kind.UNTERMINATED]
    assert checker.finish() == []
    assert [v.kind for v in checker.violations] == [Kind.DUPLICATE, Kind.UNTERMINATED]


def test_contiguous_seq_stops_at_a_gap() -> None:
    checker = RunChecker(RUN, THREAD)
    for seq in (1, 2, 4):
        checker.feed(envelope("agent_started" if seq == 1 else "agent_thinking", seq, {}))
    assert (checker.contiguous_seq, checker.last_seq) == (2, 4)


# ====================================================================== whole runs
def kinds(violations: Sequence[Any]) -> list[Kind]:
    return [violation.kind for violation in violations]


@given(valid_runs())
def test_a_valid_run_passes_the_whole_run_check(frames: list[Frame]) -> None:
    assert run_violations(frames) == []
    assert check_run(frames, run_id=RUN, thread_id=THREAD) == frames[-1]["payload"]


@given(valid_runs(), st.data())
def test_every_single_loss_duplicate_or_swap_fails_the_whole_run_check(
    frames: list[Frame], data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(frames) - 1))
    mutation = data.draw(st.sampled_from(["drop", "repeat", "swap"]))
    if mutation == "drop":
        mutated = frames[:index] + frames[index + 1 :]
    elif mutation == "repeat":
        mutated = [*frames[: index + 1], frames[index], *frames[index + 1 :]]
    else:
        other = index + 1 if index + 1 < len(frames) else index - 1
        mutated = list(frames)
        mutated[index], mutated[other] = mutated[other], mutated[index]
    with pytest.raises(GuaranteeViolated) as info:
        check_run(mutated)
    assert info.value.violations
    assert all(f"{v.kind} (seq {v.seq})" in str(info.value) for v in info.value.violations)


def test_no_events_at_all_is_unterminated() -> None:
    assert kinds(run_violations([])) == [Kind.UNTERMINATED]


def run_of(*middle: Frame) -> list[Frame]:
    """A run with ``middle`` between agent_started and agent_completed, numbered 1..n."""
    return renumber([envelope("agent_started", 0, {"agent": "a"}), *middle,
                     envelope("agent_completed", 0, {"status": "succeeded", "result": 1})])


def test_an_event_of_another_run_or_thread_is_foreign() -> None:
    stranger = envelope("agent_thinking", 2, {"thought": "x"}, run_id="run-b")
    frames = [*run_of()[:1], stranger, *run_of()[1:]]
    assert kinds(run_violations(frames)) == [Kind.FOREIGN]
    elsewhere = {**run_of()[1], "thread_id": "thread-b"}
    assert kinds(run_violations([run_of()[0], elsewhere])) == [Kind.FOREIGN, Kind.UNTERMINATED]
    assert kinds(run_violations(run_of(), run_id="run-b")) == [Kind.FOREIGN, Kind.FOREIGN,
                                                               Kind.UNTERMINATED]


@pytest.mark.parametrize(("etype", "payload", "says"), [
    ("agent_thinking", {}, "'thought'"),
    ("agent_thinking", {"thought": 1}, "'thought' of type str"),
    ("tool_executing", {"tool": "t", "call_id": "c"}, "'args'"),
    ("partial_result", {"txt": "x"}, "'text'"),
])
def test_a_payload_without_the_fields_of_its_type_is_malformed(
    etype: str, payload: Frame, says: str
) -> None:
    found = run_violations(run_of(envelope(etype, 0, payload)))
    (malformed,) = [v for v in found if v.kind is Kind.MALFORMED]
    assert malformed.seq == 2 and says in malformed.detail


@pytest.mark.parametrize(("payload", "says"), [
    ({"status": "done", "result": 1}, "'done'"),
    ({"status": "succeeded"}, "needs 'result'"),
    ({"status": "cancelled", "result": 1}, "needs 'error'"),
])
def test_a_completion_with_a_bad_status_or_outcome_is_malformed(
    payload: Frame, says: str
) -> None:
    frames = run_of()
    frames[-1] = {**frames[-1], "payload": payload}
    (found,) = run_violations(frames)
    assert found.kind is Kind.MALFORMED and says in found.detail
    assert payload_problem("agent_completed", payload) == found.detail


@pytest.mark.parametrize(("field", "value"), [("ts", 1_700_000_000), ("thread_id", None)])
def test_an_envelope_field_of_the_wrong_type_is_malformed(field: str, value: Any) -> None:
    frames = run_of()
    frames[0] = {**frames[0], field: value}
    assert Kind.MALFORMED in kinds(run_violations(frames, thread_id=THREAD))


def test_a_tool_closed_under_another_name_is_unpaired() -> None:
    frames = run_of(
        envelope("tool_executing", 0, {"tool": "search", "call_id": "c1", "args": {}}),
        envelope("tool_completed", 0, {"tool": "fetch", "call_id": "c1", "status": "ok",
                                       "result": 1}),
    )
    (found,) = run_violations(frames)
    assert (found.kind, found.seq) == (Kind.UNPAIRED_TOOL, 3)
    assert "'search'" in found.detail and "'fetch'" in found.detail


def test_check_run_is_an_assertion_listing_every_violation() -> None:
    frames = run_of(envelope("agent_thinking", 0, {"thought": 1}))
    del frames[0]
    with pytest.raises(AssertionError) as info:
        check_run(frames)
    assert isinstance(info.value, GuaranteeViolated)
    assert kinds(info.value.violations) == [Kind.MALFORMED, Kind.LOST]
    assert str(info.value).startswith("2 guarantee violation(s):")
