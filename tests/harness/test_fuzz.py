"""Hypothesis against a live server: arbitrary WebSocket frames, and arbitrary JWTs.

One in-process trio server runs in a thread of its own for the whole module; the examples
talk to it over blocking sockets (every read bounded by a socket timeout). Meanwhile bob, a
legitimate user, keeps a run in flight on his own socket: after every example his socket
must still answer, and nothing of his may reach the fuzzing user.

Properties, for any bytes a client sends after its upgrade:
- the server never crashes (no connection handler fails; bob is served to the end);
- every server frame is well-formed: unmasked, no reserved bits, a known opcode, text that is
  a JSON object with a ``type``, a close code that may be sent;
- nothing follows the server's close frame;
- no frame carries another user's run or text;
- a client that breaks no rule gets its pong and the echo of its close.
And for any token: never a 5xx or a crash; 101 for a valid token, else the one fixed 401.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import json
import logging
import math
import socket
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Iterator
from typing import Any, Final

import attrs
import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.harness._support import EVENT_TYPES, HOST, SECRET, Server, open_server, token
from tests.harness.test_abuse import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    WireFrame,
    check_server_frame,
    client_frame,
    close_frame,
    text_frame,
    upgrade_request,
)

SOCKET_TIMEOUT: Final = 10.0
MAX_MESSAGE: Final = 2048
FUZZER: Final = "mallory"
VICTIM: Final = "bob"
SECRET_TEXT: Final = "bob-private-message"
SERVER_TYPES: Final = frozenset({"pong", "error", "run_accepted", "refreshed", *EVENT_TYPES})
ERROR_CODES: Final = frozenset({"bad_json", "unknown_type", "invalid_field", "unknown_agent",
                                "not_found", "resume_unavailable", "rate_limited", "overloaded"})
FUZZ_SETTINGS: Final = settings(max_examples=200, deadline=None,
                                suppress_health_check=[HealthCheck.too_slow])


# ============================================================ blocking WebSocket client
class SyncSocket:
    """A blocking raw client: the upgrade request, then bytes out and frames in."""

    def __init__(self, port: int, request: bytes) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=SOCKET_TIMEOUT)
        self.sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            data += chunk
        self.head, _, rest = data.partition(b"\r\n\r\n")
        self.answer = data
        self.parser = FrameParser()
        self.frames: deque[WireFrame] = deque(self.parser.feed(rest))

    @property
    def status(self) -> int:
        return int(self.head.split(b" ", 2)[1]) if self.head.startswith(b"HTTP/1.1 ") else 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_frame(self) -> WireFrame | None:
        while not self.frames:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self.frames.extend(self.parser.feed(chunk))
        return self.frames.popleft()

    def rest(self) -> list[WireFrame]:
        """Every frame until the server ends the connection."""
        frames = []
        while (frame := self.next_frame()) is not None:
            frames.append(frame)
        return frames

    def close(self) -> None:
        self.sock.close()


def http_answer(port: int, request: bytes) -> bytes:
    """The whole answer to a request the server answers and closes."""
    client = SyncSocket(port, request)
    try:
        while chunk := client.sock.recv(65536):
            client.answer += chunk
    except ConnectionResetError:
        pass
    client.close()
    return client.answer


# ================================================================ the live server
@attrs.define
class Live:
    """The module's server, its thread, bob's socket and run, and the errors it logged."""

    server: Server
    done: trio.Event
    trio_token: trio.lowlevel.TrioToken
    thread: threading.Thread
    errors: list[logging.LogRecord]
    bob: SyncSocket | None = None
    bob_run: str = ""
    bob_seq: int = 0
    checks: int = 0

    def assert_bob_served(self) -> None:
        """Bob's socket answers a ping; his events meanwhile are his own run's, in order."""
        assert self.bob is not None
        self.checks += 1
        ping_id = f"bob-{self.checks}"
        self.bob.send(text_frame({"type": "ping", "id": ping_id}))
        while True:
            frame = self.bob.next_frame()
            assert frame is not None, "the server closed bob's socket"
            if frame.opcode != OP_TEXT:
                continue
            message = frame.json()
            if message == {"type": "pong", "id": ping_id}:
                return
            assert message["run_id"] == self.bob_run, message
            assert message["seq"] == self.bob_seq + 1, message
            assert message["type"] != "agent_completed", f"bob's run ended: {message}"
            self.bob_seq += 1


class _Errors(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    """The server, in a thread; bob connected with a run in flight."""
    box: dict[str, Any] = {}
    ready = threading.Event()

    async def main() -> None:
        done = trio.Event()
        async with open_server(max_message_bytes=MAX_MESSAGE, ping_interval_s=600,
                               close_timeout_s=2, max_active_runs_per_user=50) as server:
            box.update(server=server, done=done, token=trio.lowlevel.current_trio_token())
            ready.set()
            await done.wait()

    errors: list[logging.LogRecord] = []
    handler = _Errors(errors)
    logging.getLogger().addHandler(handler)
    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert ready.wait(10), "the server did not start"
    state = Live(box["server"], box["done"], box["token"], thread, errors)
    state.bob = _bob_socket(state)
    try:
        yield state
    finally:
        state.bob.close()
        trio.from_thread.run_sync(state.done.set, trio_token=state.trio_token)
        thread.join(10)
        logging.getLogger().removeHandler(handler)


def _bob_socket(state: Live) -> SyncSocket:
    port = state.server.port
    bob = SyncSocket(port, upgrade_request(port, jwt=token(VICTIM)))
    assert bob.status == 101
    bob.send(text_frame({"type": "start_agent", "request_id": "bob-1", "agent": "scripted",
                         "message": SECRET_TEXT, "thread_id": "bob-thread",
                         "context": {"tools": 0, "tokens": 100000, "delay_ms": 300}}))
    frame = bob.next_frame()
    assert frame is not None
    accepted = frame.json()
    assert accepted["type"] == "run_accepted", accepted
    state.bob_run = accepted["run_id"]
    return bob


# ==================================================================== frame fuzzing
@attrs.frozen
class Sent:
    """What one example sends, and whether every byte of it keeps RFC 6455 and the limits."""

    data: bytes
    clean: bool


def _json_messages(bob_run: str) -> st.SearchStrategy[dict[str, Any]]:
    ids = st.one_of(st.none(), st.integers(), st.text(max_size=20), st.booleans())
    run_ids = st.sampled_from([bob_run, "0" * 32, "x"])
    return st.one_of(
        st.builds(lambda i: {"type": "ping", "id": i}, ids),
        st.builds(lambda r: {"type": "start_agent", "request_id": f"fz-{r}", "agent": "echo",
                             "message": "fuzz"}, st.integers(0, 10**9)),
        st.builds(lambda r, s: {"type": "resume", "run_id": r, "after_seq": s}, run_ids,
                  st.integers(0, 5)),
        st.builds(lambda r, s: {"type": "ack", "run_id": r, "seq": s}, run_ids,
                  st.integers(0, 5)),
        st.builds(lambda r: {"type": "cancel", "run_id": r}, run_ids),
        st.builds(lambda t: {"type": "refresh", "token": t}, st.text(max_size=30)),
        st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=3),
    )


@st.composite
def valid_message(draw: st.DrawFn, bob_run: str) -> Sent:
    """A JSON message, whole or in fragments, with control frames between them."""
    text = json.dumps(draw(_json_messages(bob_run))).encode()
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=3))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    data = b""
    for index, piece in enumerate(pieces):
        opcode = OP_TEXT if index == 0 else OP_CONTINUATION
        data += client_frame(opcode, piece, fin=index == len(pieces) - 1)
        if draw(st.booleans()) and index < len(pieces) - 1:
            data += client_frame(draw(st.sampled_from([OP_PING, OP_PONG])),
                                 draw(st.binary(max_size=125)))
    return Sent(data, True)


@st.composite
def raw_frame(draw: st.DrawFn) -> Sent:
    """Any frame at all: opcode, flags, mask, payload and declared length all drawn."""
    opcode = draw(st.integers(0, 15))
    fin = draw(st.booleans())
    rsv = draw(st.sampled_from([0, 0, 0, 1, 2, 4, 7]))
    masked = draw(st.sampled_from([True, True, True, False]))
    payload = draw(st.binary(max_size=200) | st.binary(min_size=126, max_size=300))
    frame = client_frame(opcode, payload, fin=fin, rsv=rsv, masked=masked)
    if draw(st.integers(0, 9)) == 0:  # cut short: the rest never comes
        frame = frame[: draw(st.integers(1, len(frame)))]
    clean = (masked and rsv == 0 and fin and opcode in (OP_PING, OP_PONG)
             and len(payload) <= 125 and len(frame) == len(client_frame(opcode, payload)))
    return Sent(frame, clean)


@st.composite
def special_frame(draw: st.DrawFn) -> Sent:
    """Frames near the edges: bad UTF-8, oversize messages, binary, a close mid-stream."""
    kind = draw(st.sampled_from(["bad utf8", "oversize", "binary", "close", "16-bit length"]))
    if kind == "bad utf8":
        return Sent(client_frame(OP_TEXT, b'{"type":"ping","id":"' + draw(
            st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82"])) + b'"}'),
            False)
    if kind == "oversize":
        return Sent(client_frame(OP_TEXT, b" " * (MAX_MESSAGE + 1)), False)
    if kind == "binary":
        return Sent(client_frame(OP_BINARY, draw(st.binary(max_size=50))), True)
    if kind == "16-bit length":
        padding = b" " * draw(st.integers(126 - 30, MAX_MESSAGE - 40))
        return Sent(client_frame(OP_TEXT, b'{"type":"ping","id":1}' + padding), True)
    code = draw(st.sampled_from([1000, 1001, 1002, 1003, 1007, 3000, 4999, 999, 1005, 5000]))
    reason = draw(st.binary(max_size=20))
    return Sent(close_frame(code, reason), False)


def example_bytes(bob_run: str) -> st.SearchStrategy[list[Sent]]:
    return st.lists(st.one_of(valid_message(bob_run), raw_frame(), special_frame()),
                    min_size=1, max_size=8)


def _send_in_pieces(client: SyncSocket, data: bytes, cuts: list[int]) -> None:
    """Writes ``data`` in pieces (the server must cope with frames split anywhere)."""
    start = 0
    for cut in sorted(cuts):
        if start < cut < len(data):
            client.send(data[start:cut])
            start = cut
    client.send(data[start:])


def _until_pong(client: SyncSocket, ping_id: str) -> list[WireFrame]:
    """Frames up to the pong of ``ping_id`` (or the end of the connection)."""
    frames = []
    while (frame := client.next_frame()) is not None:
        frames.append(frame)
        if frame.opcode == OP_TEXT and frame.json() == {"type": "pong", "id": ping_id}:
            break
    return frames


def _check_conversation(frames: list[WireFrame], clean: bool, bob_run: str) -> None:
    closes = [i for i, frame in enumerate(frames) if frame.opcode == OP_CLOSE]
    if closes:
        assert closes[0] == len(frames) - 1, f"frames after the close: {frames[closes[0]:]}"
    else:  # the peer went away mid-frame: nothing to close
        assert not clean, f"no close frame for a clean conversation: {frames[-3:]}"
    runs: set[str] = set()
    texts = []
    for frame in frames:
        check_server_frame(frame)
        if frame.opcode != OP_TEXT:
            continue
        message = frame.json()
        texts.append(message)
        assert message["type"] in SERVER_TYPES, message
        assert SECRET_TEXT not in frame.payload.decode(), message
        if message["type"] == "error":
            assert message["code"] in ERROR_CODES, message
        elif message["type"] == "run_accepted":
            runs.add(message["run_id"])
        elif message["type"] in EVENT_TYPES:
            assert message["run_id"] in runs and message["run_id"] != bob_run, message
    if clean:  # nothing broke a rule: every message was read, our close was echoed
        assert {"type": "pong", "id": "end"} in texts, texts
        assert frames[-1].close_code() == 1000


@FUZZ_SETTINGS
@given(data=st.data())
def test_random_frames_never_crash_the_server_or_leak(live: Live, data: st.DataObject) -> None:
    sent = data.draw(example_bytes(live.bob_run), label="frames")
    cuts = data.draw(st.lists(st.integers(1, 4000), max_size=4), label="cuts")
    port = live.server.port
    client = SyncSocket(port, upgrade_request(port, jwt=token(FUZZER)))
    try:
        assert client.status == 101, client.answer[:200]
        clean = all(s.clean for s in sent)
        stream = b"".join(s.data for s in sent) + text_frame({"type": "ping", "id": "end"})
        if clean:  # the pong of "end" comes, then our close is echoed
            _send_in_pieces(client, stream, cuts)
            frames = _until_pong(client, "end")
            client.send(close_frame(1000))
        else:  # the server may be waiting for the rest of a frame: end our side
            _send_in_pieces(client, stream + close_frame(1000), cuts)
            client.sock.shutdown(socket.SHUT_WR)
            frames = []
        frames += client.rest()
    except OSError as exc:  # the server closed at a broken rule and reset what came after
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
            raise
        frames = client.rest()
    finally:
        client.close()
    _check_conversation(frames, clean, live.bob_run)
    closing = [f.close_code() for f in frames if f.opcode == OP_CLOSE]
    event(f"{'clean' if clean else 'unclean'}, close {closing[0] if closing else 'none'}")
    live.assert_bob_served()
    assert live.errors == [], [r.getMessage() for r in live.errors]


# ====================================================================== JWT fuzzing
def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(secret: str, signing_input: str) -> bytes:
    return hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()


@attrs.frozen
class Token:
    text: str
    valid: bool


NOW: Final = int(time.time())
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10),
                        st.lists(st.integers(), max_size=2))
GOOD_EXP = st.sampled_from([NOW + 3600, NOW + 3600.5, 10**12])
BAD_EXP = st.sampled_from([NOW - 3600, NOW - 3600.5, 0, -1, True, False, None, "9999999999",
                           [NOW + 3600], {"t": 1}, math.inf, math.nan])


@st.composite
def claims(draw: st.DrawFn) -> tuple[Any, bool]:
    """A payload, and whether its claims make a token valid (given a good signature)."""
    if draw(st.integers(0, 15)) == 0:  # not even an object
        return draw(JSON_VALUES), False
    body: dict[str, Any] = {}
    valid = True
    exp_kind = draw(st.sampled_from(["good"] * 6 + ["bad", "missing"]))
    if exp_kind != "missing":
        body["exp"] = draw(GOOD_EXP if exp_kind == "good" else BAD_EXP)
    valid &= exp_kind == "good"
    sub_kind = draw(st.sampled_from(["good"] * 6 + ["empty", "other", "missing"]))
    if sub_kind == "good":
        body["sub"] = f"fz-{draw(st.text(min_size=1, max_size=12))}"
    elif sub_kind == "empty":
        body["sub"] = ""
    elif sub_kind == "other":
        body["sub"] = draw(st.one_of(st.none(), st.integers(), st.lists(st.text(), max_size=1)))
    valid &= sub_kind == "good"
    nbf = draw(st.sampled_from(["none"] * 4 + ["past", "future"]))
    if nbf != "none":
        body["nbf"] = NOW - 3600 if nbf == "past" else NOW + 3600
    valid &= nbf != "future"
    for name in ("iat", "aud", "iss"):  # ignored, whatever they hold
        if draw(st.booleans()):
            body[name] = draw(JSON_VALUES)
    return body, valid


@st.composite
def jwt_tokens(draw: st.DrawFn) -> Token:
    """A token built segment by segment: header, claims and signature each right or wrong."""
    shape = draw(st.sampled_from(["jwt"] * 8 + ["garbage", "segments"]))
    if shape == "garbage":
        return Token(draw(st.text(min_size=1, max_size=200)), False)
    alg = draw(st.sampled_from(["HS256"] * 12 + ["none", "HS512", "RS256", "hs256", "", None]))
    header: dict[str, Any] = {"typ": "JWT"} if draw(st.booleans()) else {}
    if alg is not None:
        header["alg"] = alg
    payload, claims_ok = draw(claims())
    h = b64(json.dumps(header).encode())
    p = b64(json.dumps(payload).encode()) if draw(st.integers(0, 20)) else "!!not-base64!!"
    how = draw(st.sampled_from(["right"] * 12 + ["other secret", "empty", "random", "HS512"]))
    if how == "right":
        signature = b64(sign(SECRET, f"{h}.{p}"))
    elif how == "other secret":
        signature = b64(sign(SECRET + "x", f"{h}.{p}"))
    elif how == "HS512":
        signature = b64(hmac.new(SECRET.encode(), f"{h}.{p}".encode(), hashlib.sha512).digest())
    elif how == "empty":
        signature = ""
    else:
        signature = b64(draw(st.binary(min_size=1, max_size=40)))
    parts = [h, p, signature]
    if shape == "segments":
        parts = draw(st.sampled_from([parts[:2], [*parts, "x"], [h, "", signature], [""] * 3]))
        return Token(".".join(parts), False)
    valid = alg == "HS256" and how == "right" and claims_ok and not p.startswith("!")
    return Token(".".join(parts), valid)


def _header_safe(text: str) -> bool:
    return all(0x21 <= ord(c) <= 0x7E for c in text)


@FUZZ_SETTINGS
@given(candidate=jwt_tokens(), via=st.sampled_from(["header", "query"]))
def test_random_tokens_get_101_when_valid_else_the_one_fixed_401(
    live: Live, candidate: Token, via: str,
) -> None:
    port = live.server.port
    if via == "header" and _header_safe(candidate.text):
        request = upgrade_request(port, jwt=candidate.text)
    else:
        request = upgrade_request(port, target="/ws?token=" + urllib.parse.quote(
            candidate.text, safe=""))
    client = SyncSocket(port, request)
    try:
        status = client.status
        if status == 101:
            client.send(close_frame(1000))
            assert client.rest()[-1].close_code() == 1000
        else:
            while chunk := client.sock.recv(65536):
                client.answer += chunk
    finally:
        client.close()
    event(f"{'valid' if candidate.valid else 'invalid'} token: {status}")
    assert status == (101 if candidate.valid else 401), (candidate, client.answer[:300])
    if status == 401:
        assert client.answer == _fixed_401(port)
    assert live.errors == [], [r.getMessage() for r in live.errors]


_FIXED_401: dict[int, bytes] = {}


def _fixed_401(port: int) -> bytes:
    """The server's answer to an upgrade without any token (every 401 must be this)."""
    if port not in _FIXED_401:
        _FIXED_401[port] = http_answer(port, upgrade_request(port))
        assert _FIXED_401[port].startswith(b"HTTP/1.1 401 ")
    return _FIXED_401[port]


def test_the_frame_helpers_agree_with_each_other() -> None:
    """The fuzzer's own frame builder and parser round-trip (so their verdicts can be trusted)."""
    parser = FrameParser()
    payloads = [b"", b"x" * 125, b"y" * 126, b"z" * 70_000]
    data = b"".join(client_frame(OP_TEXT, p, fin=False, rsv=5) for p in payloads)
    frames = parser.feed(data[:7]) + parser.feed(data[7:])
    assert [(f.payload, f.fin, f.rsv, f.masked) for f in frames] == [
        (p, False, 5, True) for p in payloads]
    assert parser.pending == 0
