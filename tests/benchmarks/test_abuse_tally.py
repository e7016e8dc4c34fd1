"""The abuse soak's pure parts on the abusers' side: how an attempt's end is named, what the
abusive frames are on the wire, the tally and its verdict, the abusers' command line."""

from __future__ import annotations

import json
import struct

import pytest
from wsproto.frame_protocol import FrameDecoder, Opcode

from benchmarks import abuse_tally as at
from benchmarks import abusers


def server_frames(data: bytes) -> list[tuple[Opcode, int, bool]]:
    """Decode client bytes as a server does (masked frames): (opcode, payload length, whether
    a message ended there) per frame, or part of a frame, received."""
    decoder = FrameDecoder(client=False)
    decoder.receive_bytes(data)
    out = []
    while (frame := decoder.process_buffer()) is not None:
        ended = frame.message_finished and frame.frame_finished
        out.append((frame.opcode, len(frame.payload), ended))
    return out


def test_an_attempt_is_named_by_the_close_it_got() -> None:
    assert at.close_outcome(4008) == "close:4008"
    assert at.close_outcome(None, eof=True) == "eof"
    assert at.close_outcome(None) == "no_close"


def test_a_flood_answered_whole_was_absorbed_but_one_cut_short_was_not() -> None:
    assert at.flood_outcome(None, eof=False, answered=500, sent=500) == "absorbed"
    assert at.flood_outcome(None, eof=False, answered=499, sent=500) == "no_close"
    assert at.flood_outcome(4008, eof=False, answered=1000, sent=9000) == "close:4008"
    assert at.flood_outcome(None, eof=True, answered=500, sent=500) == "eof"


@pytest.mark.parametrize(
    ("elapsed", "closed", "name"),
    [(0.01, True, "closed_at_once"), (2.4, True, "closed_at_once"), (3.5, True, "closed_early"),
     (4.0, True, "handshake_timeout"), (12.0, True, "handshake_timeout"),
     (12.5, True, "closed_late"), (20.0, False, "no_close")],
)
def test_a_pending_handshake_is_named_by_when_the_server_dropped_it(
    elapsed: float, closed: bool, name: str
) -> None:
    assert at.pending_outcome(elapsed, 5.0, closed=closed) == name


def test_error_frames_and_status_lines_are_named() -> None:
    assert at.error_outcome({"code": "rate_limited"}) == "error:rate_limited"
    assert at.error_outcome({"code": "invalid_field", "field": "thread_id"}) == (
        "error:invalid_field:thread_id")
    assert at.status_of("HTTP/1.1 429 Too Many Requests") == 429
    assert at.status_of("garbage") == 0


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_every_huge_message_is_one_byte_over_the_limit(variant: int) -> None:
    frames = server_frames(at.huge_message(variant, 1000))
    assert sum(size for _, size, _ in frames) == 1001
    assert frames[-1][2] is (variant != 2)  # the claimed 1 GiB never ends
    if variant == 1:
        assert [(op, fin) for op, _, fin in frames] == [
            (Opcode.TEXT, False), (Opcode.CONTINUATION, True)]
        assert all(size <= 1000 for _, size, _ in frames)


def test_the_claimed_huge_message_says_one_gibibyte_in_its_header() -> None:
    data = at.huge_message(2, 1000)
    assert data[1] & 0x7F == 127
    assert struct.unpack("!Q", data[2:10])[0] == 1 << 30
    assert at.huge_shape(2) == "claimed_1gib"


def test_floods_are_whole_masked_frames() -> None:
    assert server_frames(at.text_frames('{"type":"ping"}', 3)) == [(Opcode.TEXT, 15, True)] * 3
    assert server_frames(at.ws_ping_frames(2)) == [(Opcode.PING, 125, True)] * 2
    for index in range(3):
        message = at.junk_message(index)
        assert len(message) < 200
    assert json.loads(at.junk_message(2))["type"] == "start_agent"
    assert json.loads(at.big_ping(50)) == {"type": "ping", "id": "i" * 50}


def test_thread_id_cases_go_from_out_of_bounds_to_the_longest_valid() -> None:
    lengths = [len(thread_id) for _, thread_id in at.thread_id_cases()]
    assert lengths == [0, 129, 60000, 128]


def test_the_tally_counts_times_and_merges() -> None:
    tally = at.AbuseTally()
    tally.add(at.NON_READER, "close:4008", 2.0)
    tally.add(at.NON_READER, "close:4008", 4.0)
    tally.add(at.NON_READER, "absorbed")
    tally.count(at.NON_READER, "events_read", 10)
    data = tally.to_dict()
    part = data["kinds"][at.NON_READER]
    assert part["outcomes"] == {"absorbed": 1, "close:4008": 2}
    assert part["seconds"]["close:4008"] == {"count": 2, "mean": 3.0, "max": 4.0, "total": 6.0}
    assert part["figures"] == {"events_read": 10}
    merged = at.AbuseTally()
    merged.merge(data)
    merged.merge(data)
    again = merged.to_dict()["kinds"][at.NON_READER]
    assert again["outcomes"] == {"absorbed": 2, "close:4008": 4}
    assert again["seconds"]["close:4008"]["max"] == 4.0
    assert again["figures"] == {"events_read": 20}


def test_the_tally_keeps_few_examples() -> None:
    tally = at.AbuseTally(max_examples=2)
    for index in range(5):
        tally.note(f"example {index} " + "x" * 400)
    assert len(tally.examples) == 2
    assert all(len(example) == 300 for example in tally.examples)


def test_the_verdict_needs_every_promised_answer_and_nothing_unexplained() -> None:
    tally = at.AbuseTally()
    tally.add(at.LIMITS, "http:429")
    tally.add(at.LIMITS, "http:401")
    tally.add(at.LIMITS, "closed_at_once")
    tally.add(at.HUGE_MESSAGE, "close:1009")
    tally.add(at.HUGE_MESSAGE, "eof")
    judged = at.verdict(tally.to_dict(), [at.LIMITS, at.HUGE_MESSAGE, at.SLOWLORIS])
    assert judged[at.LIMITS]["missing"] == ["error:rate_limited"]
    assert judged[at.LIMITS]["tolerated"] == {"closed_at_once": 1}
    assert judged[at.HUGE_MESSAGE] == {
        "ok": False, "expected": ["close:1009"], "missing": [], "unexpected": {"eof": 1},
        "tolerated": {}}
    assert judged[at.SLOWLORIS]["missing"] == ["handshake_timeout"]
    tally.add(at.LIMITS, "error:rate_limited")
    assert at.verdict(tally.to_dict(), [at.LIMITS])[at.LIMITS]["ok"]


def test_a_probe_holds_the_bound_when_it_saw_no_more_held_than_allowed() -> None:
    assert at.probe_bound_held([{"closed_at_once": 45, "handshake_timeout": 980}], 1000)
    assert not at.probe_bound_held([{"closed_at_once": 45, "handshake_timeout": 1001}], 1000)
    assert not at.probe_bound_held([{"handshake_timeout": 900}], 1000)
    assert not at.probe_bound_held([], 1000)


def test_abuser_counts_come_from_the_command_line() -> None:
    counts = abusers.parse_counts(["all=0", "slowloris=3"])
    assert counts[at.SLOWLORIS] == 3
    assert sum(counts.values()) == 3
    assert abusers.parse_counts([])[at.NON_READER] == abusers.DEFAULT_COUNTS[at.NON_READER]
    with pytest.raises(SystemExit):
        abusers.parse_counts(["nonsense=1"])
    with pytest.raises(SystemExit):
        abusers.parse_counts(["slowloris=-1"])


def test_the_abusers_plan_reads_the_servers_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGISTRY_AUTH_SECRET", "secret")
    args = abusers.parse_args([
        "--url", "ws://127.0.0.1:9/ws", "--duration", "3", "--out", "x.json",
        "--limits", '{"max_queued_mib": 1, "handshake_timeout_s": 2}',
        "--nonreader-context", '{"tokens": 5}',
    ])
    plan = abusers.plan_of(args)
    assert (plan.host, plan.port, plan.path) == ("127.0.0.1", 9, "/ws")
    assert plan.limits.max_queued_mib == 1
    assert plan.limits.handshake_timeout_s == 2
    assert plan.nonreader_context == {"tokens": 5}
    assert plan.user(at.CHURN, 2).endswith("-churn-2")
    assert plan.resource("u").startswith("/ws?token=")
