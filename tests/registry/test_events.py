"""Event payload validation and the JSON envelope of run events."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry import (
    AgentCompleted,
    AgentThinking,
    Event,
    EventType,
    PayloadError,
    payload_from_dict,
    payload_to_dict,
    validate_payload,
)

VALID: dict[EventType, dict[str, Any]] = {
    EventType.AGENT_STARTED: {"agent": "triage"},
    EventType.AGENT_THINKING: {"thought": "hmm"},
    EventType.TOOL_EXECUTING: {"tool": "search", "call_id": "c1", "args": {"q": "x"}},
    EventType.TOOL_COMPLETED: {"tool": "search", "call_id": "c1", "status": "ok", "result": 1},
    EventType.PARTIAL_RESULT: {"text": "tok"},
    EventType.AGENT_COMPLETED: {"status": "succeeded", "result": "done"},
}
REQUIRED = [(t, f) for t, p in VALID.items() for f in p if f not in ("result",)]
WRONG_VALUES: list[Any] = [None, 1, 1.5, ["x"], {"x": 1}, True]
MISTYPED = [(t, f, v) for t, f in REQUIRED for v in WRONG_VALUES
            if not isinstance(v, type(VALID[t][f]))]


MISSING = object()


def frame(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"type": "partial_result", "run_id": "r", "thread_id": "t",
                            "seq": 3, "ts": 1.5, "payload": {"text": "x"}}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not MISSING}


@pytest.mark.parametrize("event_type", list(EventType))
def test_each_valid_payload_passes(event_type: EventType) -> None:
    validate_payload(event_type, VALID[event_type])


@pytest.mark.parametrize(("event_type", "field"), REQUIRED, ids=str)
def test_a_missing_field_is_refused_by_name(event_type: EventType, field: str) -> None:
    payload = {k: v for k, v in VALID[event_type].items() if k != field}
    with pytest.raises(PayloadError, match=field):
        validate_payload(event_type, payload)


@pytest.mark.parametrize(("event_type", "field", "value"), MISTYPED, ids=str)
def test_a_mistyped_field_is_refused(event_type: EventType, field: str, value: Any) -> None:
    with pytest.raises(PayloadError, match=field):
        validate_payload(event_type, {**VALID[event_type], field: value})


@pytest.mark.parametrize("payload", [None, "x", ["agent"], 3])
def test_a_payload_that_is_not_an_object_is_refused(payload: Any) -> None:
    with pytest.raises(PayloadError):
        validate_payload(EventType.AGENT_STARTED, payload)


@pytest.mark.parametrize(
    ("event_type", "status", "needs"),
    [(EventType.TOOL_COMPLETED, "ok", "result"),
     (EventType.TOOL_COMPLETED, "error", "error"),
     (EventType.TOOL_COMPLETED, "cancelled", "error"),
     (EventType.AGENT_COMPLETED, "succeeded", "result"),
     (EventType.AGENT_COMPLETED, "failed", "error"),
     (EventType.AGENT_COMPLETED, "cancelled", "error"),
     (EventType.AGENT_COMPLETED, "timed_out", "error")],
)
def test_completions_carry_result_on_success_and_error_otherwise(
    event_type: EventType, status: str, needs: str
) -> None:
    base = {k: v for k, v in VALID[event_type].items() if k != "result"} | {"status": status}
    validate_payload(event_type, base | {needs: None})
    with pytest.raises(PayloadError, match=needs):
        validate_payload(event_type, base)
    other = "error" if needs == "result" else "result"
    with pytest.raises(PayloadError, match=needs):
        validate_payload(event_type, base | {other: "x"})


@pytest.mark.parametrize(
    ("event_type", "status"),
    [(EventType.TOOL_COMPLETED, "succeeded"), (EventType.TOOL_COMPLETED, "timed_out"),
     (EventType.AGENT_COMPLETED, "ok"), (EventType.AGENT_COMPLETED, "done"),
     (EventType.AGENT_COMPLETED, "")],
)
def test_an_unknown_status_is_refused(event_type: EventType, status: str) -> None:
    payload = VALID[event_type] | {"status": status, "error": "e", "result": 1}
    with pytest.raises(PayloadError, match="status"):
        validate_payload(event_type, payload)


@pytest.mark.parametrize(("check", "names"), [
    (lambda: validate_payload(EventType.AGENT_THINKING, {"thought": 1}), "thought"),
    (lambda: payload_from_dict("tool_executing", {"tool": "t", "args": {}}), "call_id"),
    (lambda: AgentThinking(1), "thought"),  # type: ignore[arg-type]
    (lambda: AgentCompleted("finished"), "status"),
    (lambda: payload_to_dict(["not", "a", "payload"]), "JSON object"),  # type: ignore[arg-type]
    (lambda: Event.from_json('{"type":"partial_result","run_id":"r","thread_id":"t","seq":1,'
                             '"ts":1.0,"payload":{"txt":"x"}}'), "text"),
])
def test_code_catching_value_error_catches_a_bad_payload(check: Any, names: str) -> None:
    """A transport that wraps decoding in ``except ValueError`` catches bad payloads too."""
    try:
        check()
    except ValueError as exc:
        caught = str(exc)
    else:
        raise AssertionError("the bad payload was accepted")
    assert names in caught


@pytest.mark.parametrize("event_type", list(EventType))
def test_json_round_trip(event_type: EventType) -> None:
    event = Event(event_type, "run-1", "thread-1", 7, 1700000000.25, VALID[event_type])
    wire = json.loads(event.json)
    assert wire == {"type": str(event_type), "run_id": "run-1", "thread_id": "thread-1",
                    "seq": 7, "ts": 1700000000.25, "payload": VALID[event_type]}
    assert Event.from_json(event.json) == event
    assert Event.from_json(event.json.encode()) == event
    assert Event.from_dict(event.to_dict()) == event


@settings(max_examples=100, deadline=None)
@given(text=st.text(), seq=st.integers(1, 2**53), ts=st.floats(0, 2e9))
def test_json_round_trip_of_any_text(text: str, seq: int, ts: float) -> None:
    event = Event(EventType.PARTIAL_RESULT, "r", "t", seq, ts, {"text": text})
    assert Event.from_json(event.json) == event


def strict_loads(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise AssertionError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_the_json_form_is_strict_even_for_nan_and_infinity(bad: float) -> None:
    payload = {"status": "succeeded", "result": {"x": bad, 1: [bad, (2.5, bad)], "ok": "y"}}
    event = Event(EventType.AGENT_COMPLETED, "r", "t", 2, 0.0, payload)
    wire = strict_loads(event.json)
    assert wire["payload"]["result"] == {"x": None, "1": [None, [2.5, None]], "ok": "y"}
    assert wire["seq"] == 2


def test_integer_ts_is_read_as_float() -> None:
    event = Event.from_dict(frame(ts=5))
    assert event.ts == 5.0 and isinstance(event.ts, float)


def test_the_json_form_serialises_unknown_values_as_text() -> None:
    payload = {"status": "succeeded", "result": Decimal("1.5")}
    event = Event(EventType.AGENT_COMPLETED, "r", "t", 2, 0.0, payload)
    assert json.loads(event.json)["payload"]["result"] == "1.5"


@pytest.mark.parametrize(
    ("data", "names"),
    [(frame(type=MISSING), "type"), (frame(type="hello"), "hello"),
     (frame(type=["x"]), "type"), (frame(type=None), "type"),
     (frame(run_id=MISSING), "run_id"), (frame(run_id=1), "run_id"),
     (frame(thread_id=None), "thread_id"), (frame(seq="3"), "seq"),
     (frame(seq=True), "seq"), (frame(seq=3.0), "seq"), (frame(payload=[]), "payload"),
     (frame(payload=MISSING), "payload"), (frame(ts=MISSING), "ts"), (frame(ts="1"), "ts"),
     (frame(ts=False), "ts"), (frame(payload={"txt": "x"}), "text")],
)
def test_from_dict_refuses_malformed_events_naming_the_field(
    data: dict[str, Any], names: str
) -> None:
    with pytest.raises(ValueError, match=names):
        Event.from_dict(data)
    with pytest.raises(ValueError, match=names):
        Event.from_json(json.dumps(data))


@pytest.mark.parametrize("text", ["[]", "3", '"x"', "null", "{", "", b"\xff"])
def test_from_json_refuses_what_is_not_a_json_object(text: str | bytes) -> None:
    with pytest.raises(ValueError):
        Event.from_json(text)
