"""Tests of the pure protocol helpers, the tally and the Socket.IO framing."""

from __future__ import annotations

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import serverkit, sio_frames
from benchmarks.agents import InvalidField, scripted_steps
from loadtests import wire
from loadtests.checker import Kind, RunChecker, Violation
from loadtests.latency import histogram_of, summarize
from loadtests.tally import LatencySamples, Tally

SECRET = "s" * 32


def test_token_carries_sub_and_exp() -> None:
    token = wire.mint_token(SECRET, "alice", ttl_s=60, now=1_000.0)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert (claims["sub"], claims["exp"]) == ("alice", 1_060)


def test_server_side_auth_accepts_query_token_and_rejects_a_bad_one() -> None:
    token = wire.mint_token(SECRET, "bob")
    target = wire.url_with_token("/ws", token)
    assert serverkit.user_for(serverkit.token_from(target, []), SECRET) == "bob"
    assert serverkit.user_for(serverkit.token_from(target, []), "other" * 8) is None
    header = [(b"Authorization", f"Bearer {token}".encode())]
    assert serverkit.user_for(serverkit.token_from("/ws", header), SECRET) == "bob"
    assert serverkit.user_for(None, SECRET) is None


def test_parse_listening_line() -> None:
    assert wire.parse_listening("listening on ws://127.0.0.1:8765/ws\n") == (
        "ws://127.0.0.1:8765/ws"
    )
    assert wire.parse_listening("starting up") is None


@given(st.integers(0, 20), st.integers(0, 50), st.data())
def test_baseline_agent_matches_the_protocol_script(
    tools: int, tokens: int, data: st.DataObject
) -> None:
    fail_at = data.draw(st.none() | st.integers(1, tools)) if tools else None
    context = wire.scripted_context(tools, tokens, 0, fail_at)
    steps = scripted_steps(context)
    assert tuple(step.type for step in steps) == wire.scripted_types(context)
    expected = 3 + 2 * fail_at if fail_at else 3 + 2 * tools + tokens
    assert len(steps) == expected


@pytest.mark.parametrize(
    ("context", "field"),
    [
        ({"tools": -1}, "context.tools"),
        ({"tokens": 100_001}, "context.tokens"),
        ({"delay_ms": "10"}, "context.delay_ms"),
        ({"tools": 2, "fail_at_tool": 3}, "context.fail_at_tool"),
    ],
)
def test_baseline_agent_rejects_out_of_range_context(
    context: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidField) as caught:
        scripted_steps(context)
    assert caught.value.field == field


def test_tally_counts_runs_and_violations() -> None:
    run = RunChecker("r", None, ("agent_started", "agent_thinking", "agent_completed"))
    for seq, etype in ((1, "agent_started"), (3, "agent_completed")):
        run.feed({"type": etype, "run_id": "r", "seq": seq, "ts": 1.0, "payload": {}})
    tally = Tally()
    tally.add_violations(run.finish())
    tally.add_finished_run(run)
    assert tally.to_dict()["counts"]["events_expected"] == 3
    assert tally.to_dict()["counts"]["events_delivered"] == 2
    assert tally.violations == {"lost": 1}


def test_tally_deltas_add_up_to_the_total() -> None:
    tally, master = Tally(), Tally()
    tally.counts["runs_started"] += 2
    master.merge(tally.take_delta())
    tally.counts["runs_started"] += 3
    tally.add_violations([Violation(Kind.FOREIGN, "x", 1, "")])
    master.merge(tally.take_delta())
    assert master.counts["runs_started"] == 5
    assert master.violations == {"foreign": 1}


def test_samples_are_capped_and_merge() -> None:
    samples = LatencySamples(cap=3)
    for i in range(5):
        samples.record("partial_result", 10.0 + i, float(i))
    assert (len(samples), samples.dropped) == (3, 2)
    merged = LatencySamples.merged([samples.to_dict(), samples.to_dict()])
    assert len(merged) == 6
    assert merged.dropped == 4


def test_hdr_summary_in_milliseconds() -> None:
    summary = summarize(histogram_of([1.0] * 99 + [100.0]))
    assert summary["count"] == 100
    assert summary["p50"] == pytest.approx(1.0, rel=0.01)
    assert summary["max"] == pytest.approx(100.0, rel=0.01)


def test_socketio_event_round_trip_and_ack() -> None:
    frame = sio_frames.encode_event("start_agent", {"a": 1}, ack_id=12)
    assert frame.startswith("4212[")
    decoded = sio_frames.decode(frame)
    assert (decoded.kind, decoded.name, decoded.data, decoded.ack_id) == (
        "event",
        "start_agent",
        {"a": 1},
        12,
    )
    ack = sio_frames.decode('4312[{"type":"run_accepted"}]')
    assert (ack.kind, ack.ack_id, ack.data) == ("ack", 12, {"type": "run_accepted"})


def test_socketio_control_packets() -> None:
    assert sio_frames.decode("2").kind == "ping"
    assert sio_frames.decode('0{"sid":"x"}').kind == "open"
    assert sio_frames.decode('40{"sid":"y"}').kind == "connect"
    assert sio_frames.decode('44{"message":"no"}').kind == "connect_error"
