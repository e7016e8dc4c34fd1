"""The sans-IO wire layers of the trio server, driven directly: WebSocket frames
(:mod:`harness._websocket`), the HTTP request head (:mod:`harness._http`) and client frames
(:mod:`harness._protocol`).

The WebSocket side is checked against wsproto's client, the HTTP side against h11's client:
what the server's layer writes must be what a real client reads.
"""

from __future__ import annotations

import h11
import pytest
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Message, Ping, Pong, TextMessage

from harness._http import (
    MAX_HEAD_BYTES,
    REFUSALS,
    HttpError,
    RequestReader,
    accept_websocket,
)
from harness._protocol import ProtocolError, parse_client_frame
from harness._websocket import Closed, ServerWebSocket, text_frame_header
from harness._websocket import Message as WholeMessage


# ================================================================ WebSocket frames
def client() -> Connection:
    return Connection(ConnectionType.CLIENT)


def client_reads(data: bytes) -> list[object]:
    reader = client()
    reader.receive_data(data)
    return list(reader.events())


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200_000])
def test_a_text_frame_of_any_size_reads_back_whole(size: int) -> None:
    payload = ("x" * size).encode()
    events = client_reads(text_frame_header(size) + payload)
    assert len(events) == 1
    message = events[0]
    assert isinstance(message, TextMessage)
    assert message.message_finished
    assert message.data == "x" * size


def test_a_ping_after_our_close_frame_gets_no_pong() -> None:
    """After the server's close frame, a ping from the peer is read but not answered
    (RFC 6455: nothing but the close reply is owed); the peer's close still completes."""
    ws, peer = ServerWebSocket(1024), client()
    closing = ws.close(1001, "shutdown")
    peer.receive_data(closing)
    assert [type(e) for e in peer.events()] == [CloseConnection]
    assert ws.close_sent and not ws.closed
    inbound, reply = ws.receive(client().send(Ping(b"are you there")))
    assert (inbound, reply) == ([], b"")
    inbound, reply = ws.receive(peer.send(CloseConnection(code=1001)))
    assert inbound == [Closed(1001, "", by_peer=True)]  # the reply that completes the close
    assert ws.closed


def test_a_ping_while_open_is_answered_with_its_payload() -> None:
    ws, peer = ServerWebSocket(1024), client()
    inbound, reply = ws.receive(peer.send(Ping(b"p1")))
    assert inbound == []
    peer.receive_data(reply)
    assert [(type(e), getattr(e, "payload", None)) for e in peer.events()] == [(Pong, b"p1")]


def test_close_is_sent_once_and_nothing_is_sent_after_it() -> None:
    ws = ServerWebSocket(1024)
    first = ws.close(1000, "bye")
    assert first
    assert ws.close(1011, "again") == b""
    assert ws.ping(b"keepalive") == b""
    assert not ws.open
    events = client_reads(first)
    assert len(events) == 1
    close = events[0]
    assert isinstance(close, CloseConnection)
    assert (close.code, close.reason) == (1000, "bye")


def test_a_long_close_reason_is_cut_to_fit_a_close_frame() -> None:
    ws = ServerWebSocket(1024)
    close = client_reads(ws.close(4008, "r" * 500))[0]
    assert isinstance(close, CloseConnection)
    assert close.reason == "r" * 100


def test_nothing_is_read_after_the_peer_closed() -> None:
    ws, peer = ServerWebSocket(1024), client()
    data = peer.send(CloseConnection(code=1000)) + b""
    inbound, _ = ws.receive(data)
    assert inbound == [Closed(1000, "", by_peer=True)]
    other = client()
    assert ws.receive(other.send(Message(data="late"))) == ([], b"")
    reply = client_reads(ws.close(1000))
    assert [type(e) for e in reply] == [CloseConnection]
    assert ws.closed


def test_fragments_make_one_message_and_its_size_counts_utf8_bytes() -> None:
    ws, peer = ServerWebSocket(4), client()
    data = (peer.send(Message(data="é", message_finished=False))
            + peer.send(Message(data="é", message_finished=True)))
    assert ws.receive(data) == ([WholeMessage("éé")], b"")
    over = peer.send(Message(data="éé", message_finished=False)) + peer.send(Message(data="é"))
    inbound, _ = ws.receive(over)
    assert inbound == [Closed(1009, "message over max_message_bytes (4)", by_peer=False)]
    assert ws.receive(peer.send(Message(data="x"))) == ([], b"")  # nothing after it


def test_a_binary_message_arrives_without_its_bytes() -> None:
    ws, peer = ServerWebSocket(16), client()
    inbound, _ = ws.receive(peer.send(Message(data=b"\x00\x01", message_finished=False))
                            + peer.send(Message(data=b"\x02")) + peer.send(Message(data="t")))
    assert inbound == [WholeMessage(None), WholeMessage("t")]


def test_a_pong_is_counted_for_the_keepalive() -> None:
    ws, peer = ServerWebSocket(1024), client()
    ws.receive(peer.send(Pong(b"keepalive")) + peer.send(Pong(b"keepalive")))
    assert ws.pongs == 2
    assert ws._ws.state is ConnectionState.OPEN


# ====================================================================== HTTP head
def test_bytes_that_are_not_http_are_a_400_answered_plainly() -> None:
    reader = RequestReader()
    with pytest.raises(HttpError) as refused:
        reader.feed(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
    assert refused.value.status == 400
    answer = reader.respond(400, REFUSALS[400], "text/plain")
    response, body = _read_response(answer)
    assert response.status_code == 400
    assert body == REFUSALS[400]
    assert (b"connection", b"close") in response.headers


def test_a_request_head_over_the_limit_is_431() -> None:
    reader = RequestReader()
    head = b"GET /ws HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * (MAX_HEAD_BYTES + 10)
    with pytest.raises(HttpError) as refused:
        reader.feed(head)
    assert refused.value.status == 431
    response, body = _read_response(reader.respond(431, REFUSALS[431], "text/plain"))
    assert response.status_code == 431
    assert body == REFUSALS[431]


def test_a_status_without_a_known_reason_is_still_a_valid_answer() -> None:
    reader = RequestReader()
    with pytest.raises(HttpError):
        reader.feed(b"NOT HTTP\r\n\r\n")
    response, body = _read_response(reader.respond(429, REFUSALS[429], "text/plain"))
    assert response.status_code == 429
    assert body == REFUSALS[429]


def test_a_request_arriving_in_pieces_is_read_once_whole() -> None:
    reader = RequestReader()
    assert reader.feed(b"GET /healthz?a=1&a=2&b=3 HTTP/1.1\r\nHost: x\r\n") is None
    request = reader.feed(b"X-Twice: first\r\nX-Twice: second\r\n\r\n")
    assert request is not None
    assert (request.method, request.path) == ("GET", "/healthz")
    assert request.query == {"a": "1", "b": "3"}
    assert request.header("x-twice") == "first"
    assert not request.wants_websocket


def test_a_target_that_is_not_a_url_has_no_path() -> None:
    request = RequestReader().feed(b"GET http://[bad/x?token=t HTTP/1.1\r\nHost: x\r\n\r\n")
    assert request is not None
    assert (request.path, request.query) == (None, {})


def test_an_answer_to_head_is_written_whole_even_though_h11_refuses_a_body() -> None:
    """h11 allows no body after a response to HEAD; the refusal is still written, plainly
    (status line, the same headers, the fixed text), and the connection ends after it."""
    reader = RequestReader()
    request = reader.feed(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert request is not None and request.method == "HEAD"
    answer = reader.respond(405, REFUSALS[405], "text/plain", [("allow", "GET")])
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 405 ")
    assert set(lines[1:]) == {"content-type: text/plain", f"content-length: {len(REFUSALS[405])}",
                              "connection: close", "cache-control: no-store", "allow: GET"}
    assert body == REFUSALS[405]


def _upgrade_head(**extra: str) -> bytes:
    lines = ["GET /ws HTTP/1.1", "Host: x", "Upgrade: websocket", "Connection: Upgrade"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in extra.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("extra", [
    {},
    {"Sec-WebSocket-Version": "13"},
    {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "8"},
])
def test_an_upgrade_without_a_key_or_version_13_is_400(extra: dict[str, str]) -> None:
    reader = RequestReader()
    request = reader.feed(_upgrade_head(**extra))
    assert request is not None and request.wants_websocket
    with pytest.raises(HttpError) as refused:
        accept_websocket(reader, request)
    assert refused.value.status == 400


def test_an_upgrade_is_accepted_with_the_rfc_accept_token_and_keeps_early_frames() -> None:
    reader = RequestReader()
    frame = client().send(Message(data="early"))
    request = reader.feed(_upgrade_head(Sec_WebSocket_Key="dGhlIHNhbXBsZSBub25jZQ==",
                                        Sec_WebSocket_Version="13") + frame)
    assert request is not None
    head, trailing = accept_websocket(reader, request)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head
    assert trailing == frame


def _read_response(data: bytes) -> tuple[h11.Response, bytes]:
    """What an HTTP client reads from ``data`` (h11 as the client side)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    response = conn.next_event()
    assert isinstance(response, h11.Response)
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        else:
            assert isinstance(event, h11.EndOfMessage), event
            return response, body


# ================================================================== client frames
def test_a_binary_frame_is_bad_json() -> None:
    with pytest.raises(ProtocolError) as refused:
        parse_client_frame(b'{"type": "ping"}')
    assert refused.value.code == "bad_json"
