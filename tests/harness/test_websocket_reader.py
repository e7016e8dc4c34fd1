"""The trio server's WebSocket reader against wsproto alone, on any bytes a client may send.

:class:`harness._websocket.ServerWebSocket` reads the simple frames itself (a whole masked
text frame, a ping, a pong) and hands every other frame to wsproto. Whatever the frames and
however TCP cuts them, it must read exactly what wsproto alone reads: the same messages, the
same pongs, the same close (1002, 1007, 1009 or the peer's) and nothing after it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.utilities import LocalProtocolError

from harness._websocket import Closed, Message, ServerWebSocket


class WsprotoReader:
    """Every byte through wsproto: what the server's reader did before it read frames itself."""

    def __init__(self, max_message_bytes: int) -> None:
        self.ws = Connection(ConnectionType.SERVER)
        self.max_message_bytes = max_message_bytes
        self.parts: list[str] = []
        self.size = 0
        self.binary = False
        self.ended = False
        self.pongs = 0

    def receive(self, data: bytes) -> tuple[list[object], bytes]:
        if self.ended or self.ws.state not in (ConnectionState.OPEN, ConnectionState.LOCAL_CLOSING):
            return [], b""
        self.ws.receive_data(data)
        out: list[object] = []
        reply = b""
        for event in self.ws.events():
            closed: Closed | None = None
            if isinstance(event, TextMessage | BytesMessage):
                if isinstance(event, TextMessage):
                    self.parts.append(event.data)
                    self.size += len(event.data.encode())
                else:
                    self.binary = True
                    self.size += len(event.data)
                if self.size > self.max_message_bytes:
                    limit = self.max_message_bytes
                    closed = Closed(1009, f"message over max_message_bytes ({limit})", False)
                elif event.message_finished:
                    out.append(Message(None if self.binary else "".join(self.parts)))
                    self.parts, self.size, self.binary = [], 0, False
            elif isinstance(event, Ping):
                with contextlib.suppress(LocalProtocolError):  # closing: no pong is owed
                    reply += self.ws.send(event.response())
            elif isinstance(event, Pong):
                self.pongs += 1
            elif isinstance(event, CloseConnection):
                by_peer = self.ws.state in (ConnectionState.REMOTE_CLOSING, ConnectionState.CLOSED)
                closed = Closed(event.code, event.reason or "", by_peer)
            if closed is not None:
                out.append(closed)
                self.ended = True
                break
        return out, reply


def frame(first: int, payload: bytes, *, masked: bool = True, long_form: int = 0) -> bytes:
    """A client frame; ``long_form`` 2 or 8 writes the length in that many bytes whatever it is."""
    size = len(payload)
    mask_bit = 0x80 if masked else 0
    if long_form == 2 or (not long_form and 126 <= size < 1 << 16):
        head = struct.pack("!BBH", first, mask_bit | 126, size)
    elif long_form == 8 or (not long_form and size >= 1 << 16):
        head = struct.pack("!BBQ", first, mask_bit | 127, size)
    else:
        head = bytes((first, mask_bit | size))
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def settled(item: object) -> object:
    """A close for invalid UTF-8 names a position within the bytes wsproto had at once."""
    if isinstance(item, Closed) and item.code == 1007:
        return Closed(1007, "", item.by_peer)
    return item


text = st.text(max_size=200).map(str.encode)
raw = st.binary(max_size=200)
frames = st.one_of(
    text.map(lambda p: frame(0x81, p)),  # the simple text frame, sometimes over the limit
    raw.map(lambda p: frame(0x81, p)),  # mostly invalid UTF-8
    st.binary(max_size=130).map(lambda p: frame(0x89, p)),  # pings, some too long for control
    st.binary(max_size=130).map(lambda p: frame(0x8A, p)),
    raw.map(lambda p: frame(0x82, p)),  # binary
    text.map(lambda p: frame(0x01, p)),  # a first fragment
    text.map(lambda p: frame(0x00, p)),  # a continuation, final or not
    text.map(lambda p: frame(0x80, p)),
    text.map(lambda p: frame(0x81, p, masked=False)),
    st.sampled_from([0x91, 0xA1, 0xC1, 0x83, 0x8B, 0x09]).flatmap(  # RSV bits, bad opcodes
        lambda first: text.map(lambda p: frame(first, p))),
    st.tuples(st.sampled_from([0x81, 0x89]), st.sampled_from([2, 8]), st.binary(max_size=20))
    .map(lambda t: frame(t[0], t[2], long_form=t[1])),  # lengths that are not minimal
    st.binary(max_size=30).map(lambda p: frame(0x88, struct.pack("!H", 1000) + p)),  # close
    st.binary(min_size=1, max_size=12),  # garbage
)


@settings(max_examples=1500, deadline=None)
@given(
    stream=st.lists(frames, max_size=12).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=8),
    max_message_bytes=st.integers(min_value=0, max_value=300),
    closing=st.booleans(),
)
def test_the_reader_reads_what_wsproto_reads_however_the_bytes_are_cut(
    stream: bytes, cuts: list[int], max_message_bytes: int, closing: bool
) -> None:
    """``closing``: the server sent its close frame first (the peer's frames are then read
    only for its close reply)."""
    ours, theirs = ServerWebSocket(max_message_bytes), WsprotoReader(max_message_bytes)
    if closing:
        assert ours.close(1001, "shutdown") == theirs.ws.send(CloseConnection(1001, "shutdown"))
    got: list[object] = []
    want: list[object] = []
    got_reply = want_reply = b""
    edges = sorted({c for c in cuts if c < len(stream)} | {0, len(stream)})
    for a, b in itertools.pairwise(edges):
        inbound, reply = ours.receive(stream[a:b])
        got += inbound
        got_reply += reply
        oracle, oracle_reply = theirs.receive(stream[a:b])
        want += oracle
        want_reply += oracle_reply
    assert [settled(i) for i in got] == [settled(i) for i in want]
    assert got_reply == want_reply
    assert ours.pongs == theirs.pongs
    assert ours.closed == (theirs.ws.state is ConnectionState.CLOSED)


@pytest.mark.parametrize("chars", [0, 60, 200, 40_000])  # lengths in 7, 16 and 64 bits
def test_a_message_arriving_a_byte_at_a_time_is_read_once_whole(chars: int) -> None:
    ws = ServerWebSocket(1 << 20)
    data = frame(0x81, ("é" * chars).encode()) + frame(0x89, b"?")
    got: list[object] = []
    replies = b""
    for i in range(len(data)):
        inbound, reply = ws.receive(data[i:i + 1])
        got += inbound
        replies += reply
    assert got == [Message("é" * chars)]
    assert replies == b"\x8a\x01?"


def test_a_frame_declaring_an_enormous_length_is_refused_without_waiting_for_it() -> None:
    """A header saying 2**62 bytes follow is not buffered: its first bytes pass the limit."""
    ws = ServerWebSocket(1024)
    head = struct.pack("!BBQ", 0x81, 0xFF, 1 << 62) + b"\0\0\0\0"
    inbound, _ = ws.receive(head + b"x" * 2048)
    assert [type(i) for i in inbound] == [Closed]
    assert isinstance(inbound[0], Closed) and inbound[0].code == 1009
