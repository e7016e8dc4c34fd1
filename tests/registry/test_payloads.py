"""The typed payloads: every shape of PROTOCOL.md's table round-trips through its JSON object."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry import (
    AgentCompleted,
    AgentStarted,
    AgentThinking,
    Event,
    EventType,
    PartialResult,
    PayloadError,
    RunStatus,
    ToolCompleted,
    ToolExecuting,
    ToolStatus,
    payload_from_dict,
    payload_to_dict,
    validate_payload,
)

text = st.text(max_size=20)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | text,
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(text, inner, max_size=3), max_leaves=8)
payloads = st.one_of(
    st.builds(AgentStarted, text),
    st.builds(AgentThinking, text),
    st.builds(ToolExecuting, text, text, st.dictionaries(text, json_values, max_size=3)),
    st.builds(ToolCompleted, text, text, st.sampled_from(ToolStatus), json_values, text),
    st.builds(PartialResult, text),
    st.builds(AgentCompleted, st.sampled_from(RunStatus), json_values, text),
)


@given(payloads)
def test_every_payload_is_valid_on_the_wire_and_round_trips(payload: Any) -> None:
    data = payload_to_dict(payload)
    validate_payload(payload.event_type, data)
    again = payload_from_dict(payload.event_type, data)
    assert payload_to_dict(again) == data
    assert type(again) is type(payload)


def test_results_go_with_success_and_errors_with_everything_else() -> None:
    assert payload_to_dict(AgentCompleted("succeeded", result=1, error="x")) == {
        "status": "succeeded", "result": 1}
    assert payload_to_dict(AgentCompleted("timed_out", result=1, error="late")) == {
        "status": "timed_out", "error": "late"}
    assert payload_to_dict(ToolCompleted("t", "c1", "cancelled")) == {
        "tool": "t", "call_id": "c1", "status": "cancelled", "error": ""}


def test_a_malformed_object_is_refused_with_the_field_named() -> None:
    with pytest.raises(PayloadError, match="call_id"):
        payload_from_dict(EventType.TOOL_EXECUTING, {"tool": "t", "args": {}})
    with pytest.raises(ValueError, match="RunStatus"):
        AgentCompleted("finished")


def test_a_received_event_gives_its_typed_payload() -> None:
    event = Event.from_json('{"type":"tool_completed","run_id":"r","thread_id":"t","seq":4,'
                            '"ts":1.5,"payload":{"tool":"search","call_id":"c","status":"ok",'
                            '"result":[1,2]}}')
    assert event.typed_payload() == ToolCompleted("search", "c", ToolStatus.OK, [1, 2])
