"""Client frames: bad_json, unknown_type, invalid_field per field, ping, error precedence, size.

After every error the socket stays open and usable.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import wsproto.events as wse

from tests.harness._support import (
    Client,
    Frame,
    Server,
    check_run,
    connect,
    open_server,
    raw_connect,
    scripted,
    unique,
)


def assert_error(frame: Frame, code: str, **fields: Any) -> None:
    assert frame["type"] == "error", frame
    assert frame["code"] == code, frame
    assert isinstance(frame["message"], str), frame
    for name, value in fields.items():
        assert frame.get(name) == value, f"{name} should be {value!r}: {frame}"


async def error_then_usable(client: Client, data: str | bytes, code: str, **fields: Any) -> Frame:
    await client.send_raw(data)
    answer = await client.recv()
    assert_error(answer, code, **fields)
    await client.assert_quiet()
    return answer


@pytest.mark.parametrize("data", ["{", "nope", "", "{'type': 'ping'}", '{"type": "ping"', "\ufeff"])
async def test_invalid_json_is_bad_json(server: Server, data: str) -> None:
    async with connect(server) as client:
        await error_then_usable(client, data, "bad_json")


@pytest.mark.parametrize("data", ["[]", '["ping"]', '"ping"', "1", "null", "true"])
async def test_json_that_is_not_an_object_is_bad_json(server: Server, data: str) -> None:
    async with connect(server) as client:
        await error_then_usable(client, data, "bad_json")


@pytest.mark.parametrize("data", [
    "[" * 5000 + "]" * 5000,
    '{"type": "ping", "id": ' + "[" * 5000 + "]" * 5000 + "}",
    '{"type": "start_agent", "request_id": "r", "agent": "echo", "message": "m", "context": '
    + '{"a":' * 3000 + "1" + "}" * 3000 + "}",
], ids=["array", "ping_id", "start_context"])
async def test_deeply_nested_json_is_bad_json_and_keeps_the_socket(
    server: Server, data: str
) -> None:
    async with connect(server) as client:
        await error_then_usable(client, data, "bad_json")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_non_json_number_constants_are_bad_json(server: Server, constant: str) -> None:
    async with connect(server) as client:
        await error_then_usable(client, f'{{"type": "ping", "id": {constant}}}', "bad_json")


@pytest.mark.parametrize("number", ["1e400", "-1e400"])
async def test_a_number_beyond_float_range_never_makes_the_server_send_non_json(
    server: Server, number: str
) -> None:
    async with connect(server) as client:
        await client.send_raw(f'{{"type": "ping", "id": {number}}}')
        await client.recv()  # strict: fails on Infinity
        await client.assert_quiet()


@pytest.mark.parametrize("data", [b'{"type": "ping"}', b"\x00\x01"])
async def test_binary_frame_is_bad_json(server: Server, data: bytes) -> None:
    async with connect(server) as client:
        await error_then_usable(client, data, "bad_json")


@pytest.mark.parametrize("frame", [
    {}, {"id": 1}, {"type": None}, {"type": 5}, {"type": ["ping"]}, {"type": "pingg"},
    {"type": "PING"}, {"type": ""}, {"type": "pong"}, {"type": "run_accepted"},
    {"type": "error"}, {"type": "agent_started"},
])
async def test_missing_non_string_or_unknown_type_is_unknown_type(
    server: Server, frame: Frame
) -> None:
    async with connect(server) as client:
        await error_then_usable(client, json.dumps(frame), "unknown_type")


# ------------------------------------------------------------ invalid fields
START = {"type": "start_agent", "request_id": "r-1", "agent": "echo", "message": "hi"}
INVALID_START = [
    ("request_id", {"request_id": None}),
    ("request_id", {"request_id": ""}),
    ("request_id", {"request_id": "x" * 129}),
    ("request_id", {"request_id": "é" * 129}),
    ("request_id", {"request_id": 7}),
    ("request_id", {"request_id": ["r"]}),
    ("agent", {"agent": None}),
    ("agent", {"agent": 3}),
    ("agent", {"agent": {"name": "echo"}}),
    ("message", {"message": None}),
    ("message", {"message": 12}),
    ("message", {"message": ["hi"]}),
    ("thread_id", {"thread_id": 5}),
    ("thread_id", {"thread_id": ["t"]}),
    ("context", {"context": []}),
    ("context", {"context": "tools=1"}),
    ("context", {"context": 3}),
]


def _without_nones(frame: Frame) -> Frame:
    return {k: v for k, v in frame.items() if v is not None}


@pytest.mark.parametrize(("field", "change"), INVALID_START)
async def test_invalid_start_agent_field_is_named(
    server: Server, field: str, change: Frame
) -> None:
    frame = _without_nones({**START, "request_id": unique(), **change})
    expected = {"field": field}
    if field != "request_id":
        expected["request_id"] = frame["request_id"]
    async with connect(server) as client:
        await error_then_usable(client, json.dumps(frame), "invalid_field", **expected)


@pytest.mark.parametrize("request_id", ["x" * 128, "é" * 128, "😀" * 128, "a"])
async def test_request_id_length_counts_characters(server: Server, request_id: str) -> None:
    async with connect(server) as client:
        accepted = await client.start("echo", request_id=request_id)
        assert accepted["request_id"] == request_id
        await client.run_events(accepted["run_id"])


RUN_ID = "0" * 32
INVALID_RUN_FRAMES = [
    ("run_id", {"type": "resume", "after_seq": 0}),
    ("run_id", {"type": "resume", "run_id": 5, "after_seq": 0}),
    ("run_id", {"type": "resume", "run_id": None, "after_seq": 0}),
    ("after_seq", {"type": "resume", "run_id": RUN_ID}),
    ("after_seq", {"type": "resume", "run_id": RUN_ID, "after_seq": -1}),
    ("after_seq", {"type": "resume", "run_id": RUN_ID, "after_seq": 1.5}),
    ("after_seq", {"type": "resume", "run_id": RUN_ID, "after_seq": "3"}),
    ("after_seq", {"type": "resume", "run_id": RUN_ID, "after_seq": True}),
    ("after_seq", {"type": "resume", "run_id": RUN_ID, "after_seq": False}),
    ("after_seq", {"type": "resume", "run_id": RUN_ID, "after_seq": None}),
    ("run_id", {"type": "ack", "seq": 0}),
    ("run_id", {"type": "ack", "run_id": ["r"], "seq": 0}),
    ("seq", {"type": "ack", "run_id": RUN_ID}),
    ("seq", {"type": "ack", "run_id": RUN_ID, "seq": -5}),
    ("seq", {"type": "ack", "run_id": RUN_ID, "seq": 2.5}),
    ("seq", {"type": "ack", "run_id": RUN_ID, "seq": "1"}),
    ("seq", {"type": "ack", "run_id": RUN_ID, "seq": True}),
    ("run_id", {"type": "cancel"}),
    ("run_id", {"type": "cancel", "run_id": 1}),
    ("run_id", {"type": "cancel", "run_id": {"id": "x"}}),
]


@pytest.mark.parametrize(("field", "frame"), INVALID_RUN_FRAMES)
async def test_invalid_run_command_field_is_named(server: Server, field: str, frame: Frame) -> None:
    async with connect(server) as client:
        answer = await error_then_usable(client, json.dumps(frame), "invalid_field", field=field)
        if field != "run_id":
            assert answer.get("run_id") == RUN_ID, answer


async def test_unknown_agent_echoes_request_id(server: Server) -> None:
    async with connect(server) as client:
        request_id = unique()
        frame = {**START, "request_id": request_id, "agent": "no-such-agent"}
        await error_then_usable(client, json.dumps(frame), "unknown_agent", request_id=request_id)


async def test_start_agent_ignores_unknown_extra_fields(server: Server) -> None:
    async with connect(server) as client:
        accepted = await client.start("echo", extra={"x": 1}, version=2)
        await client.run_events(accepted["run_id"])


# ----------------------------------------------------------------------- ping
@pytest.mark.parametrize("ping_id", [1, 0, -3.5, "abc", "", {"a": [1, {"b": None}]}, [1, 2], True])
async def test_ping_echoes_any_id(server: Server, ping_id: Any) -> None:
    async with connect(server) as client:
        assert await client.ping(ping_id) == {"type": "pong", "id": ping_id}


@pytest.mark.parametrize("frame", [{"type": "ping"}, {"type": "ping", "id": None}])
async def test_ping_without_id_gets_null_id(server: Server, frame: Frame) -> None:
    async with connect(server) as client:
        await client.send(frame)
        answer = await client.recv()
        assert answer == {"type": "pong", "id": None}
        assert "id" in answer


async def test_many_errors_in_a_row_keep_the_socket_open(server: Server) -> None:
    async with connect(server) as client:
        frames: list[str | bytes] = ["{", "[]", '{"type": 1}', '{"type": "cancel"}', b"\x00"]
        for data in frames * 20:
            await client.send_raw(data)
        codes = [(await client.recv())["code"] for _ in range(100)]
        assert codes == ["bad_json", "bad_json", "unknown_type", "invalid_field", "bad_json"] * 20
        accepted = await client.start("echo")
        await client.run_events(accepted["run_id"])


# ----------------------------------------------------------------- precedence
async def test_bad_json_wins_over_everything(server: Server) -> None:
    async with connect(server) as client:
        await error_then_usable(client, '{"type": "nope", "request_id": ""', "bad_json")


async def test_unknown_type_wins_over_invalid_field(server: Server) -> None:
    async with connect(server) as client:
        frame = {"type": "start_agnt", "request_id": "", "agent": 1}
        await error_then_usable(client, json.dumps(frame), "unknown_type")


async def test_invalid_field_wins_over_unknown_agent(server: Server) -> None:
    async with connect(server) as client:
        frame = {"type": "start_agent", "request_id": "r", "agent": "nobody", "message": 1}
        await error_then_usable(client, json.dumps(frame), "invalid_field", field="message")


async def test_invalid_field_wins_over_not_found(server: Server) -> None:
    async with connect(server) as client:
        frame = {"type": "resume", "run_id": unique("missing"), "after_seq": -1}
        await error_then_usable(client, json.dumps(frame), "invalid_field", field="after_seq")


async def test_unknown_agent_and_invalid_context_win_over_rate_limited(server_kind: str) -> None:
    async with (
        open_server(server_kind, max_active_runs_per_user=1) as server,
        connect(server) as client,
    ):
        await client.start(context=scripted(tokens=100, delay_ms=1000))
        request_id = unique()
        frame = client.start_frame("nobody", request_id=request_id)
        assert_error(await client.request(frame), "unknown_agent", request_id=request_id)
        frame = client.start_frame(request_id=request_id, context={"tools": -1})
        assert_error(await client.request(frame), "invalid_field", field="context.tools")


async def test_rate_limited_wins_over_overloaded(server_kind: str) -> None:
    async with (
        open_server(server_kind, max_active_runs_per_user=1, max_active_runs=1) as server,
        connect(server, "alice") as alice,
        connect(server, "bob") as bob,
    ):
        await alice.start(context=scripted(tokens=100, delay_ms=1000))
        request_id = unique()
        answer = await alice.request(alice.start_frame(request_id=request_id))
        assert_error(answer, "rate_limited", request_id=request_id)
        answer = await bob.request(bob.start_frame(request_id=request_id))
        assert_error(answer, "overloaded", request_id=request_id)


# -------------------------------------------------------------------- closing
async def test_a_close_the_server_starts_ends_when_the_client_answers(server_kind: str) -> None:
    """The client's close reply completes the handshake: the TCP connection ends then,
    not ``close_timeout_s`` later (an hour here; the raw client gives up after 15 s)."""
    async with (
        open_server(server_kind, close_timeout_s=3600, shutdown_grace_s=3600) as server,
        raw_connect(server) as client,
    ):
        server.shut_down()
        closing = await client.next_event()
        assert isinstance(closing, wse.CloseConnection)
        assert closing.code == 1001
        await client.send(closing.response())
        assert await client.next_event() is None


# ----------------------------------------------------------------------- size
async def test_frame_over_max_message_bytes_closes_1009(server_kind: str) -> None:
    async with (
        open_server(server_kind, max_message_bytes=1024) as server,
        connect(server) as client,
    ):
        await client.send(client.start_frame("echo", "x" * 2000))
        code, frames = await client.until_closed()
        assert code == 1009
        assert frames == []


async def test_frame_of_exactly_max_message_bytes_is_accepted(server_kind: str) -> None:
    async with (
        open_server(server_kind, max_message_bytes=1024) as server,
        connect(server) as client,
    ):
        head = '{"type":"ping","id":"'
        padding = "p" * (1024 - len(head) - 2)
        frame = head + padding + '"}'
        assert len(frame.encode()) == 1024
        await client.send_raw(frame)
        assert await client.recv() == {"type": "pong", "id": padding}


async def test_fragmented_message_is_reassembled_and_accepted(server_kind: str) -> None:
    async with (
        open_server(server_kind, max_message_bytes=1024) as server,
        raw_connect(server) as raw,
    ):
        text = json.dumps({"type": "ping", "id": "f" * 600})
        for start in range(0, len(text), 100):
            chunk = text[start:start + 100]
            await raw.send(wse.TextMessage(data=chunk, message_finished=start + 100 >= len(text)))
        assert await raw.next_text() == {"type": "pong", "id": "f" * 600}


async def test_fragmented_message_over_max_message_bytes_closes_1009(server_kind: str) -> None:
    async with (
        open_server(server_kind, max_message_bytes=1024) as server,
        raw_connect(server) as raw,
    ):
        for index in range(4):
            await raw.send(wse.TextMessage(data="y" * 400, message_finished=index == 3))
        event = await raw.next_event()
        assert isinstance(event, wse.CloseConnection), event
        assert event.code == 1009


# ------------------------------------------------------------------------ fuzz
ERROR_CODES = {"bad_json", "unknown_type", "invalid_field", "unknown_agent", "not_found",
               "resume_unavailable", "rate_limited", "overloaded"}
VALUES: list[Any] = [None, True, False, 0, 1, 2, -1, 2**70, 1.5, "", "x", "é" * 129, "echo",
                     "scripted", [], [1, "a"], {}, {"tools": 1, "tokens": 1, "delay_ms": 1},
                     {"tools": 2, "fail_at_tool": 2, "delay_ms": 0}, {"tokens": "1"}]
FIELDS = ["type", "request_id", "agent", "message", "thread_id", "context", "run_id",
          "after_seq", "seq", "id"]
TYPES = ["start_agent", "resume", "ack", "cancel", "ping", "pong", "START_AGENT", 7, None]


def random_frame(rng: random.Random) -> Frame:
    frame: Frame = {"type": rng.choice(TYPES)}
    for name in rng.sample(FIELDS[1:], rng.randint(0, len(FIELDS) - 1)):
        frame[name] = rng.choice(VALUES)
    if rng.random() < 0.3:
        frame.update(type="start_agent", request_id=unique(), message="m",
                     agent=rng.choice(["echo", "scripted", "nobody"]))
    if rng.random() < 0.1:
        del frame["type"]
    return frame


def check_answer(frame: Frame) -> None:
    assert frame["type"] in ("error", "run_accepted", "pong"), frame
    if frame["type"] == "error":
        assert frame["code"] in ERROR_CODES and isinstance(frame["message"], str), frame
        if frame["code"] == "invalid_field":
            assert isinstance(frame["field"], str), frame


async def test_random_frames_get_well_formed_answers_and_every_run_ends(server: Server) -> None:
    rng = random.Random(20240601)
    started: set[str] = set()
    async with connect(server) as client:
        for index in range(300):
            await client.send(random_frame(rng))
            await client.send({"type": "ping", "id": index})
            while (answer := await client.control()) != {"type": "pong", "id": index}:
                check_answer(answer)
                if answer["type"] == "run_accepted":
                    started.add(answer["run_id"])
        streams = await client.collect(*started)
    assert started
    for events in streams.values():
        check_run(events)
