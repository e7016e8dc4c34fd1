"""Abusive clients for the abuse soak, in one asyncio process beside the normal users'.

``python -m benchmarks.abusers --url ws://127.0.0.1:PORT/ws --duration 60 --out abusers.json``
(``--count KIND=N`` to change how many of one kind run; ``--help`` lists the rest).

Every abuser repeats its abuse, reconnecting, until ``--duration`` s have passed, and names how
each attempt ended (:mod:`benchmarks.abuse_tally`):

* ``json_ping_flood`` / ``message_flood``: floods ``ping`` with a 1,000-character ``id`` (or
  junk messages the server answers with ``error`` frames) without reading, then reads: the
  server closed it with 4008.
  A flood the server answered whole is ``absorbed`` and the next one is twice as big.
* ``ws_ping_flood``: floods WebSocket ping control frames (125 bytes each) without reading,
  far more pong bytes than ``max_queued_mib``, then reads: the bound says 4008.
* ``non_reader``: starts runs of large events (``--nonreader-runs``), stops reading for
  ``--hold-s``, then reads: 4008 (the events of those runs stay retained, never acked).
* ``slowloris``: trickles a valid upgrade request a byte every ``--trickle-s`` and never ends
  it: dropped at ``handshake_timeout_s``. ``pending_probe``: every ``--probe-every-s`` opens
  ``max_pending_handshakes + --probe-extra`` such connections at once: the ones over the
  bound are closed at once, the rest at ``handshake_timeout_s``.
* ``huge_message``: a message of ``max_message_bytes + 1`` (one frame, two fragments, or a
  header claiming 1 GiB): 1009.
* ``thread_id``: ``start_agent`` with a thread_id of 0, 129 and 60,000 characters
  (``invalid_field``, each error frame short) and of 128 (accepted, read to its end).
* ``churn``: connect-and-close, ``--churn-per-s`` a second: a whole handshake then a close
  frame (the server's close reply), a whole handshake then a TCP reset, a bare TCP connect.
* ``limits``: a bad token (401), one socket more than ``max_connections_per_user`` (429),
  one run more than ``max_active_runs_per_user`` (``rate_limited``).

The sockets that stop reading cap their kernel receive buffer at 64 KiB (a slow phone, not
a data centre peer), so what the server owes them piles up on the server's side. The JWT
secret comes from env ``REGISTRY_AUTH_SECRET``; only the URL given is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Final, final
from urllib.parse import urlsplit

import attrs

from benchmarks import abuse_tally as at
from benchmarks import genkit, ws_frames
from loadtests import wire

READ_BYTES: Final = 65536
NOT_READING_RCVBUF: Final = 64 * 1024
"""The receive buffer of a socket that stops reading: what the kernel holds for it stays
small, so what the server owes it piles up on the server's side, as for a slow phone."""
CONNECT_S: Final = 10.0
DEFAULT_COUNTS: Final = {
    at.JSON_PING_FLOOD: 1, at.MESSAGE_FLOOD: 1, at.WS_PING_FLOOD: 1, at.NON_READER: 2,
    at.SLOWLORIS: 20, at.PENDING_PROBE: 1, at.HUGE_MESSAGE: 1, at.THREAD_ID: 1, at.CHURN: 1,
    at.LIMITS: 1,
}
"""How many abusers of each kind run (``pending_probe``: 1 runs the probes, 0 none)."""


class Refused(Exception):
    """The handshake was not answered with 101: ``status`` (0: the server closed first)."""

    def __init__(self, status: int, elapsed_s: float) -> None:
        super().__init__(f"handshake refused: {status or 'closed'} after {elapsed_s:.2f} s")
        self.status = status
        self.elapsed_s = elapsed_s


@attrs.frozen
class Limits:
    """The server's settings the abusers aim at (they must match the server's)."""

    max_message_bytes: int = attrs.field(default=65536, converter=int)
    max_connections_per_user: int = attrs.field(default=5, converter=int)
    max_active_runs_per_user: int = attrs.field(default=10, converter=int)
    max_queued_mib: float = attrs.field(default=8.0, converter=float)
    handshake_timeout_s: float = attrs.field(default=5.0, converter=float)
    max_pending_handshakes: int = attrs.field(default=1000, converter=int)
    close_timeout_s: float = attrs.field(default=10.0, converter=float)


@attrs.frozen
class Plan:
    """What every abuser does, and for how long."""

    host: str
    port: int
    path: str
    secret: str
    duration_s: float
    counts: dict[str, int]
    limits: Limits = Limits()
    start_delay_s: float = 0.0
    flood_messages: int = 20000
    flood_rate: int = 5000
    ws_ping_rate: int = 8000
    ws_ping_s: float = 5.0
    nonreader_runs: int = 5
    nonreader_context: dict[str, Any] = attrs.field(
        factory=lambda: {"tools": 1, "tokens": 200, "delay_ms": 10, "token_bytes": 16384}
    )
    hold_s: float = 2.0
    trickle_s: float = 0.5
    probe_every_s: float = 60.0
    probe_extra: int = 25
    churn_per_s: float = 20.0
    prefix: str = attrs.field(factory=lambda: f"abuse-{uuid.uuid4().hex[:6]}")

    def resource(self, user: str, secret: str | None = None) -> str:
        """Return the upgrade request target of ``user`` (path and token)."""
        token = wire.mint_token(secret or self.secret, user)
        return wire.url_with_token(self.path, token)

    def user(self, kind: str, index: int) -> str:
        """Return the user id of abuser ``index`` of ``kind`` (one user per abuser)."""
        return f"{self.prefix}-{kind}-{index}"


@attrs.frozen
class ReadResult:
    """What a read until the server's close brought."""

    code: int | None
    eof: bool
    texts: Counter[str]
    frames: list[dict[str, Any]]
    text_bytes: int


@final
class Conn:
    """One upgraded WebSocket over asyncio streams; reading can be paused (not reading)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 rest: bytes) -> None:
        self.reader = reader
        self.writer = writer
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.decoder = ws_frames.FrameDecoder()
        self.frames: list[tuple[int, bytes]] = self.decoder.feed(rest)

    def pause(self) -> None:
        """Stop reading from the socket (the kernel buffers fill, then the server's)."""
        self.transport.pause_reading()

    def resume(self) -> None:
        self.transport.resume_reading()

    def send_text(self, text: str) -> None:
        self.writer.write(ws_frames.client_frame(ws_frames.OP_TEXT, text.encode()))

    def send_json(self, frame: dict[str, Any]) -> None:
        self.send_text(json.dumps(frame))

    async def recv(self, timeout: float) -> tuple[int, bytes] | None:
        """Return the next message or control frame (server pings are answered and skipped);
        None at EOF.

        Raises:
            TimeoutError: nothing within ``timeout``.
        """
        while True:
            while self.frames:
                opcode, payload = self.frames.pop(0)
                if opcode == ws_frames.OP_PING:
                    self.writer.write(ws_frames.client_frame(ws_frames.OP_PONG, payload))
                    continue
                return opcode, payload
            data = await asyncio.wait_for(self.reader.read(READ_BYTES), timeout)
            if not data:
                return None
            self.frames.extend(self.decoder.feed(data))

    async def read_until_close(self, idle_s: float, total_s: float) -> ReadResult:
        """Read until the server's close frame, EOF, ``idle_s`` without a frame or
        ``total_s`` in all; keep the text frames that are not events."""
        self.resume()
        texts: Counter[str] = Counter()
        kept: list[dict[str, Any]] = []
        size, code, eof = 0, None, False
        end = time.monotonic() + total_s
        while (left := end - time.monotonic()) > 0:
            try:
                got = await self.recv(min(idle_s, left))
            except TimeoutError:
                break
            if got is None:
                eof = True
                break
            opcode, payload = got
            if opcode == ws_frames.OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                break
            size += len(payload)
            frame = json.loads(payload)
            texts[str(frame.get("type"))] += 1
            keep = not wire.is_event(frame) or frame.get("type") == "agent_completed"
            if keep and len(kept) < 1000:
                kept.append(frame)
        return ReadResult(code, eof, texts, kept, size)

    async def close(self) -> int | None:
        """Close politely (1000) and wait up to 5 s for the server's reply; returns its code."""
        try:
            self.writer.write(ws_frames.close_frame(1000))
            result = await self.read_until_close(5.0, 5.0)
            return result.code
        except (OSError, ValueError):
            return None
        finally:
            self.abort()

    def abort(self) -> None:
        self.writer.transport.abort()


async def open_tcp(plan: Plan, rcvbuf: int = 0
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a TCP connection to the server; ``rcvbuf`` > 0 caps the kernel's receive buffer
    (set before the connect, so the window the server sees is small from the start)."""
    if not rcvbuf:
        return await asyncio.wait_for(asyncio.open_connection(plan.host, plan.port), CONNECT_S)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(sock, (plan.host, plan.port)), CONNECT_S
        )
        return await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise


async def connect(plan: Plan, user: str, *, secret: str | None = None,
                  rcvbuf: int = 0) -> Conn:
    """Open a WebSocket for ``user`` (a token signed with ``secret`` when given; ``rcvbuf``:
    see :func:`open_tcp`).

    Raises:
        Refused: any answer but 101, or the server closed before answering.
        OSError, TimeoutError: the TCP connection failed or nothing came in time.
    """
    started = time.monotonic()
    reader, writer = await open_tcp(plan, rcvbuf)
    key = ws_frames.new_key()
    netloc = f"{plan.host}:{plan.port}"
    writer.write(ws_frames.handshake_request(netloc, plan.resource(user, secret), key))
    head = b""
    try:
        while True:
            try:
                data = await asyncio.wait_for(reader.read(READ_BYTES), CONNECT_S)
            except ConnectionResetError:  # dropped unanswered (sent bytes unread: a reset)
                data = b""
            if not data:
                raise Refused(0, time.monotonic() - started)
            head += data
            try:
                complete, rest = ws_frames.read_handshake(head, key)
            except ws_frames.HandshakeRefused as exc:
                raise Refused(at.status_of(str(exc)), time.monotonic() - started) from exc
            if complete:
                return Conn(reader, writer, rest)
    except BaseException:
        writer.transport.abort()
        raise


@final
@attrs.define(eq=False)
class Abuse:
    """The abusers' shared state: plan, tally, deadline, the probes' results."""

    plan: Plan
    tally: at.AbuseTally = attrs.field(factory=at.AbuseTally)
    deadline: float = 0.0
    probes: list[dict[str, Any]] = attrs.field(factory=list)
    began: float = attrs.field(factory=time.monotonic)

    def going(self) -> bool:
        return time.monotonic() < self.deadline

    async def attempt(self, kind: str, body: Callable[[], Awaitable[str]]) -> None:
        """Run one attempt of ``kind``; count the outcome it names, or the failure."""
        started = time.monotonic()
        try:
            outcome = await body()
        except Refused as exc:
            outcome = self.refusal(exc)
        except (ConnectionResetError, BrokenPipeError):
            outcome = at.RESET
        except TimeoutError:
            outcome = "timeout"
        except Exception as exc:  # a soak goes on: an attempt that broke is counted
            outcome = f"failed:{type(exc).__name__}"
            self.tally.note(f"{kind}: {exc!r}")
        self.tally.add(kind, outcome, time.monotonic() - started)
        expected = at.EXPECTED[kind] | at.TOLERATED[kind]
        if outcome not in expected and kind != at.PENDING_PROBE:
            now = time.monotonic()
            self.tally.note(f"{kind}: {outcome} after {now - started:.2f} s, "
                            f"{now - self.began:.1f} s into the abuse")

    def refusal(self, exc: Refused) -> str:
        """Name a refused handshake: its status, or how soon the server dropped it."""
        if exc.status:
            return f"http:{exc.status}"
        timeout = self.plan.limits.handshake_timeout_s
        return at.pending_outcome(exc.elapsed_s, timeout, closed=True)

    async def repeat(self, kind: str, body: Callable[[], Awaitable[str]],
                     pause_s: float = 0.0) -> None:
        """Attempt ``kind`` again and again until the deadline."""
        while self.going():
            await self.attempt(kind, body)
            if pause_s:
                await asyncio.sleep(pause_s)


# ---------------------------------------------------------------------- floods
async def flood(abuse: Abuse, kind: str, index: int) -> None:
    """JSON ``ping`` (or junk) flood without reading, then ``hold_s`` more without reading
    once the server has taken every byte (it catches up with the flood), then read; doubles
    a flood that was absorbed."""
    plan = abuse.plan
    size = [plan.flood_messages]  # doubled after a flood the server absorbed
    if kind == at.JSON_PING_FLOOD:
        batch = at.text_frames(at.big_ping(), 100)
    else:
        batch = b"".join(at.text_frames(at.junk_message(i), 1) for i in range(3)) * 33
    per_batch = 100 if kind == at.JSON_PING_FLOOD else 99

    async def once() -> str:
        conn = await connect(plan, plan.user(kind, index), rcvbuf=NOT_READING_RCVBUF)
        conn.pause()
        sent = await write_batches(conn, batch, per_batch, size[0], plan.flood_rate)
        await drained(conn, plan.limits.close_timeout_s)
        await asyncio.sleep(plan.hold_s)
        result = await conn.read_until_close(2.0, plan.limits.close_timeout_s + 10)
        conn.abort()
        answered = sum(result.texts.values())
        abuse.tally.count(kind, "messages_sent", sent)
        abuse.tally.count(kind, "answers_read", answered)
        outcome = at.flood_outcome(result.code, eof=result.eof, answered=answered, sent=sent)
        if outcome == at.ABSORBED:
            size[0] = min(size[0] * 2, 16 * plan.flood_messages)
        return outcome

    await abuse.repeat(kind, once, 0.2)


async def drained(conn: Conn, within_s: float) -> None:
    """Wait until everything written has left this process (at most ``within_s``)."""
    end = time.monotonic() + within_s
    while conn.transport.get_write_buffer_size() and time.monotonic() < end:
        await asyncio.sleep(0.05)


async def write_batches(conn: Conn, batch: bytes, per_batch: int, total: int,
                        rate: float) -> int:
    """Write ``batch`` (``per_batch`` messages) until ``total`` messages at about ``rate`` a
    second, never more than 256 KiB unsent in this process; return the messages written."""
    sent, started = 0, time.monotonic()
    transport = conn.writer.transport
    while sent < total and not transport.is_closing():
        ahead = sent - (time.monotonic() - started) * rate
        if ahead > 0 or transport.get_write_buffer_size() > 256 * 1024:
            await asyncio.sleep(max(0.002, ahead / rate if ahead > 0 else 0.01))
            continue
        conn.writer.write(batch)
        sent += per_batch
    return sent


async def ws_ping_flood(abuse: Abuse, index: int) -> None:
    """WebSocket ping control frames without reading for ``ws_ping_s``, then read: every pong
    the server owes is bytes it holds; over ``max_queued_mib`` the bound says 4008. A flood
    answered in full (``absorbed``: the kernel's socket buffers, several MiB on loopback,
    took what the server's queue did not hold) makes the next one twice as long."""
    plan = abuse.plan
    batch = at.ws_ping_frames(100)
    seconds = [plan.ws_ping_s]  # doubled after a flood that was absorbed

    async def once() -> str:
        conn = await connect(plan, plan.user(at.WS_PING_FLOOD, index),
                             rcvbuf=NOT_READING_RCVBUF)
        conn.pause()
        total = int(plan.ws_ping_rate * seconds[0])
        sent = await write_batches(conn, batch, 100, total, plan.ws_ping_rate)
        pongs, code, eof = await read_pongs(conn, plan.limits.close_timeout_s + 10)
        conn.abort()
        abuse.tally.count(at.WS_PING_FLOOD, "pings_sent", sent)
        abuse.tally.count(at.WS_PING_FLOOD, "pongs_read", pongs)
        abuse.tally.count(at.WS_PING_FLOOD, "pong_bytes_read", pongs * 127)
        outcome = at.flood_outcome(code, eof=eof, answered=pongs, sent=sent)
        if outcome == at.ABSORBED:
            seconds[0] = min(seconds[0] * 2, 16 * plan.ws_ping_s)
        return outcome

    await abuse.repeat(at.WS_PING_FLOOD, once, 0.2)


async def read_pongs(conn: Conn, total_s: float) -> tuple[int, int | None, bool]:
    """Read pong control frames until a close, EOF or 3 s of silence; returns (pongs, close
    code, eof)."""
    conn.resume()
    pongs, end = 0, time.monotonic() + total_s
    while (left := end - time.monotonic()) > 0:
        try:
            got = await conn.recv(min(3.0, left))
        except TimeoutError:
            break
        if got is None:
            return pongs, None, True
        opcode, payload = got
        if opcode == ws_frames.OP_CLOSE:
            return pongs, int.from_bytes(payload[:2], "big") if payload else 1005, False
        pongs += opcode == ws_frames.OP_PONG
    return pongs, None, False


async def non_reader(abuse: Abuse, index: int) -> None:
    """Start runs of large events, stop reading for ``hold_s``, then read: 4008. A socket the
    server still kept open (``absorbed``: it kept up, or was still sending when the read
    gave up) makes the next hold twice as long, up to four times ``hold_s``."""
    plan = abuse.plan
    hold = [plan.hold_s]

    async def once() -> str:
        conn = await connect(plan, plan.user(at.NON_READER, index),
                             rcvbuf=NOT_READING_RCVBUF)
        for _ in range(plan.nonreader_runs):
            start = wire.start_agent(uuid.uuid4().hex, "scripted", "m", plan.nonreader_context)
            conn.send_json(start)
        conn.pause()
        await asyncio.sleep(hold[0])
        result = await conn.read_until_close(5.0, plan.limits.close_timeout_s + 10)
        conn.abort()
        abuse.tally.count(at.NON_READER, "events_read", sum(result.texts.values()))
        abuse.tally.count(at.NON_READER, "runs_accepted", result.texts["run_accepted"])
        if result.code is None and not result.eof:
            hold[0] = min(2 * hold[0], 4 * plan.hold_s)
            return at.ABSORBED
        hold[0] = plan.hold_s
        return at.close_outcome(result.code, eof=result.eof)

    await abuse.repeat(at.NON_READER, once, 0.2)


# ---------------------------------------------------------------------- handshakes
def partial_upgrade(plan: Plan, user: str) -> bytes:
    """Return a valid upgrade request without its final blank line."""
    netloc = f"{plan.host}:{plan.port}"
    request = ws_frames.handshake_request(netloc, plan.resource(user), ws_frames.new_key())
    return request[:-2]


async def hold_handshake(plan: Plan, data: bytes, trickle_s: float) -> str:
    """Open a TCP connection, send ``data`` a byte every ``trickle_s`` (all of it at once when
    0) and never finish; name how the server ended it."""
    started = time.monotonic()  # before the connect: a busy loop may resume us late
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(plan.host, plan.port), CONNECT_S
    )
    give_up = plan.limits.handshake_timeout_s + 10
    closed = asyncio.ensure_future(reader.read(READ_BYTES))
    try:
        if trickle_s:
            await trickle(writer, data, trickle_s, closed, started + give_up)
        else:
            writer.write(data)
        await asyncio.wait({closed}, timeout=max(0.0, give_up - (time.monotonic() - started)))
        elapsed = time.monotonic() - started
        answered = closed.done() and not closed.exception() and closed.result()
        if answered:  # the server sent something: not a silent drop
            return f"answered:{bytes(closed.result()[:12])!r}"
        return at.pending_outcome(elapsed, plan.limits.handshake_timeout_s, closed=closed.done())
    finally:
        closed.cancel()
        writer.transport.abort()


async def trickle(writer: asyncio.StreamWriter, data: bytes, every_s: float,
                  closed: asyncio.Future[bytes], until: float) -> None:
    """Write ``data`` a byte every ``every_s`` until it is all sent, ``closed`` is done or
    the monotonic clock passes ``until``."""
    for at_byte in range(len(data)):
        await asyncio.wait({closed}, timeout=every_s)
        if closed.done() or time.monotonic() > until:
            return
        writer.write(data[at_byte : at_byte + 1])


async def slowloris(abuse: Abuse, index: int) -> None:
    plan = abuse.plan
    data = partial_upgrade(plan, plan.user(at.SLOWLORIS, index))
    await abuse.repeat(at.SLOWLORIS, lambda: hold_handshake(plan, data, plan.trickle_s), 0.1)


async def pending_probes(abuse: Abuse) -> None:
    """Every ``probe_every_s`` (the first after half of it), ``max_pending_handshakes +
    probe_extra`` handshakes at once, each sending its request head but its last line."""
    plan = abuse.plan
    data = partial_upgrade(plan, plan.user(at.PENDING_PROBE, 0))
    await asyncio.sleep(min(plan.probe_every_s / 2, max(0.0, abuse.deadline - time.monotonic())))
    while abuse.going():
        began = time.monotonic()
        probe = at.AbuseTally()
        count = plan.limits.max_pending_handshakes + plan.probe_extra

        prober = Abuse(plan, probe, abuse.deadline)
        await asyncio.gather(*(
            prober.attempt(at.PENDING_PROBE, lambda: hold_handshake(plan, data, 0.0))
            for _ in range(count)
        ))
        outcomes = probe.outcomes.get(at.PENDING_PROBE, Counter())
        abuse.tally.merge(probe.to_dict())
        abuse.probes.append({"opened": count, **outcomes})
        await asyncio.sleep(max(0.0, plan.probe_every_s - (time.monotonic() - began)))


# ---------------------------------------------------------------------- messages
async def huge_message(abuse: Abuse, index: int) -> None:
    """A message one byte over ``max_message_bytes``, in turn in each shape: 1009."""
    plan, turn = abuse.plan, [index]

    async def once() -> str:
        variant, turn[0] = turn[0], turn[0] + 1
        conn = await connect(plan, plan.user(at.HUGE_MESSAGE, index))
        conn.writer.write(at.huge_message(variant, plan.limits.max_message_bytes))
        result = await conn.read_until_close(10.0, 15.0)
        conn.abort()
        outcome = at.close_outcome(result.code, eof=result.eof)
        abuse.tally.count(at.HUGE_MESSAGE, f"{at.huge_shape(variant)}:{outcome}")
        return outcome

    await abuse.repeat(at.HUGE_MESSAGE, once, 0.2)


async def thread_ids(abuse: Abuse, index: int) -> None:
    """Each thread_id case on one socket: its error frame (short), or its run to the end."""
    plan = abuse.plan
    cases = at.thread_id_cases()
    turn = [0]

    async def once() -> str:
        name, thread_id = cases[turn[0] % len(cases)]
        turn[0] += 1
        conn = await connect(plan, plan.user(at.THREAD_ID, index))
        try:
            return await ask_thread_id(abuse, conn, name, thread_id)
        finally:
            await conn.close()

    await abuse.repeat(at.THREAD_ID, once, 0.1)


async def ask_thread_id(abuse: Abuse, conn: Conn, name: str, thread_id: str) -> str:
    """Send one ``start_agent`` with ``thread_id``; name the answer (a run read to its end)."""
    request_id = uuid.uuid4().hex
    frame = wire.start_agent(request_id, "echo", "hello")
    frame["thread_id"] = thread_id
    conn.send_json(frame)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        got = await conn.recv(end - time.monotonic())
        if got is None or got[0] == ws_frames.OP_CLOSE:
            return at.close_outcome(None, eof=True)
        answer = json.loads(got[1])
        valid = name == "128"
        if answer.get("type") == "error" and answer.get("request_id") in (request_id, None):
            abuse.tally.count(at.THREAD_ID, f"{name}:error")
            if valid:
                return f"refused_valid:{at.error_outcome(answer)}"
            too_long = len(got[1]) > at.ERROR_FRAME_LIMIT
            return at.ERROR_TOO_LONG if too_long else at.error_outcome(answer)
        if answer.get("type") == "agent_completed":
            abuse.tally.count(at.THREAD_ID, f"{name}:accepted")
            if not valid:
                return "accepted_invalid"
            return at.ACCEPTED if answer.get("thread_id") == thread_id else "wrong_thread_id"
    return "timeout"


# ---------------------------------------------------------------------- churn and limits
async def churn(abuse: Abuse, index: int) -> None:
    """Connect-and-close, ``churn_per_s`` a second, three ways in turn."""
    plan, turn = abuse.plan, [0]

    async def once() -> str:
        variant, turn[0] = turn[0] % 3, turn[0] + 1
        if variant == 2:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(plan.host, plan.port), CONNECT_S
            )
            writer.close()
            return at.TCP_CLOSED
        conn = await connect(plan, plan.user(at.CHURN, index))
        if variant == 1:
            conn.abort()
            return at.ABORTED
        return at.close_outcome(await conn.close())

    await abuse.repeat(at.CHURN, once, 1 / plan.churn_per_s)


async def limits(abuse: Abuse, index: int) -> None:
    """A bad token; then one socket over the per-user bound; then one run over it."""
    plan, turn = abuse.plan, [0]

    async def once() -> str:
        variant, turn[0] = turn[0] % 3, turn[0] + 1
        user = plan.user(at.LIMITS, index)
        if variant == 0:
            conn = await connect(plan, user, secret="not-the-server-secret-" + "x" * 16)
            await conn.close()
            return "accepted_bad_token"
        if variant == 1:
            return await one_socket_too_many(abuse, user)
        return await one_run_too_many(plan, user)

    await abuse.repeat(at.LIMITS, once, 0.3)


async def one_socket_too_many(abuse: Abuse, user: str) -> str:
    """Open ``max_connections_per_user`` sockets, then one more (429); close them all."""
    plan, opened = abuse.plan, list[Conn]()
    try:
        for _ in range(plan.limits.max_connections_per_user):
            try:
                opened.append(await connect(plan, user))
            except Refused as exc:
                return f"early_refusal:{exc.status}" if exc.status else abuse.refusal(exc)
        try:
            extra = await connect(plan, user)
        except Refused as exc:
            return abuse.refusal(exc)
        opened.append(extra)
        return "accepted_over_limit"
    finally:
        await asyncio.gather(*(conn.close() for conn in opened))


async def one_run_too_many(plan: Plan, user: str) -> str:
    """Start ``max_active_runs_per_user`` runs of about 2 s and one more (``rate_limited``);
    cancel them and read them to their ends."""
    conn = await connect(plan, user)
    try:
        context = {"tools": 0, "tokens": 10, "delay_ms": 200}
        ids = [uuid.uuid4().hex for _ in range(plan.limits.max_active_runs_per_user + 1)]
        for request_id in ids:
            conn.send_json(wire.start_agent(request_id, "scripted", "m", context))
        outcome, runs = await answers_for(conn, ids)
        for run_id in runs:
            conn.send_json({"type": "cancel", "run_id": run_id})
        return outcome
    finally:
        await conn.close()


async def answers_for(conn: Conn, ids: Sequence[str]) -> tuple[str, list[str]]:
    """Read until every request of ``ids`` is answered; returns the last one's outcome and
    the run ids accepted."""
    answers: dict[str, str] = {}
    runs: list[str] = []
    end = time.monotonic() + 10
    while len(answers) < len(ids) and time.monotonic() < end:
        got = await conn.recv(end - time.monotonic())
        if got is None or got[0] == ws_frames.OP_CLOSE:
            break
        frame = json.loads(got[1])
        if frame.get("type") == "run_accepted":
            answers[frame["request_id"]] = "accepted_over_limit"
            runs.append(frame["run_id"])
        elif frame.get("type") == "error" and frame.get("request_id") in ids:
            answers[frame["request_id"]] = at.error_outcome(frame)
    return answers.get(ids[-1], "timeout"), runs


# ---------------------------------------------------------------------- the process
async def drive(plan: Plan) -> dict[str, Any]:
    """Run every abuser until the deadline; return the tally and the probes."""
    await asyncio.sleep(plan.start_delay_s)
    began = time.time()
    abuse = Abuse(plan, deadline=time.monotonic() + plan.duration_s)
    makers: dict[str, Callable[[int], Coroutine[Any, Any, None]]] = {
        at.JSON_PING_FLOOD: lambda i: flood(abuse, at.JSON_PING_FLOOD, i),
        at.MESSAGE_FLOOD: lambda i: flood(abuse, at.MESSAGE_FLOOD, i),
        at.WS_PING_FLOOD: lambda i: ws_ping_flood(abuse, i),
        at.NON_READER: lambda i: non_reader(abuse, i),
        at.SLOWLORIS: lambda i: slowloris(abuse, i),
        at.PENDING_PROBE: lambda i: pending_probes(abuse),
        at.HUGE_MESSAGE: lambda i: huge_message(abuse, i),
        at.THREAD_ID: lambda i: thread_ids(abuse, i),
        at.CHURN: lambda i: churn(abuse, i),
        at.LIMITS: lambda i: limits(abuse, i),
    }
    counts = {kind: plan.counts.get(kind, 0) for kind in at.KINDS}
    counts[at.PENDING_PROBE] = min(counts[at.PENDING_PROBE], 1)
    async with asyncio.TaskGroup() as group:
        for kind, count in counts.items():
            for index in range(count):
                group.create_task(makers[kind](index))
    kinds = [kind for kind, count in counts.items() if count]
    tally = abuse.tally.to_dict()
    return {
        "started": began,
        "ended": time.time(),
        "counts": counts,
        "plan": {k: v for k, v in attrs.asdict(plan).items() if k != "secret"},
        "tally": tally,
        "verdict": at.verdict(tally, kinds),
        "probes": abuse.probes,
        "probe_bound_held": (
            at.probe_bound_held(abuse.probes, plan.limits.max_pending_handshakes)
            if abuse.probes else None
        ),
    }


def parse_counts(pairs: Sequence[str]) -> dict[str, int]:
    """Return :data:`DEFAULT_COUNTS` changed by ``KIND=N`` pairs (``all=N`` sets every kind).

    Raises:
        SystemExit: an unknown kind or a count that is not a whole number >= 0.
    """
    counts = dict(DEFAULT_COUNTS)
    for pair in pairs:
        kind, _, value = pair.partition("=")
        if not value.isdigit() or (kind not in at.KINDS and kind != "all"):
            raise SystemExit(f"--count {pair!r}: KIND=N with KIND among {', '.join(at.KINDS)}")
        for name in at.KINDS if kind == "all" else (kind,):
            counts[name] = int(value)
    return counts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.abusers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--url", required=True, help="ws://127.0.0.1:PORT/ws")
    add("--duration", type=float, required=True, help="seconds the abuse goes on")
    add("--start-delay", type=float, default=0.0, help="seconds to wait before starting")
    add("--count", action="append", default=[], metavar="KIND=N",
        help=f"abusers of one kind (defaults {DEFAULT_COUNTS})")
    add("--limits", default="{}", help="JSON object: the server's settings (Limits fields)")
    for name, kind in (("flood-messages", int), ("flood-rate", int), ("ws-ping-rate", int),
                       ("ws-ping-s", float), ("nonreader-runs", int), ("hold-s", float),
                       ("trickle-s", float), ("probe-every-s", float), ("probe-extra", int),
                       ("churn-per-s", float)):
        default = attrs.fields_dict(Plan)[name.replace("-", "_")].default
        add(f"--{name}", type=kind, default=default, help=f"default {default}")
    add("--nonreader-context", default=None, help="JSON: the non-readers' scripted context")
    add("--out", type=Path, required=True, help="JSON results file")
    return parser.parse_args(argv)


def plan_of(args: argparse.Namespace) -> Plan:
    url = urlsplit(args.url)
    extra: dict[str, Any] = {}
    if args.nonreader_context:
        extra["nonreader_context"] = json.loads(args.nonreader_context)
    return Plan(
        host=url.hostname or "127.0.0.1", port=url.port or 80, path=url.path or "/ws",
        secret=os.environ.get("REGISTRY_AUTH_SECRET", ""), duration_s=args.duration,
        counts=parse_counts(args.count), limits=Limits(**json.loads(args.limits)),
        start_delay_s=args.start_delay, flood_messages=args.flood_messages,
        flood_rate=args.flood_rate, ws_ping_rate=args.ws_ping_rate, ws_ping_s=args.ws_ping_s,
        nonreader_runs=args.nonreader_runs, hold_s=args.hold_s, trickle_s=args.trickle_s,
        probe_every_s=args.probe_every_s, probe_extra=args.probe_extra,
        churn_per_s=args.churn_per_s, **extra,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: abuse, write the JSON results, exit 0."""
    args = parse_args(argv)
    genkit.raise_fd_limit()
    data = asyncio.run(drive(plan_of(args)))
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
