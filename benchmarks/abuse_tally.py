"""Pure parts of the abuse soak's abusive clients: what each abuse expects, the frames it sends,
how an attempt's ending is named, and the tally of those names.

Every abusive client (:mod:`benchmarks.abusers`) repeats one abuse for the whole phase and
names how each attempt ended (an *outcome*): ``close:4008`` (the server's close frame and its
code), ``http:429`` (the handshake answer), ``error:rate_limited`` or
``error:invalid_field:thread_id`` (an ``error`` frame), ``handshake_timeout`` (the server
dropped a connection that never finished its upgrade, about ``handshake_timeout_s`` after it
opened), ``closed_at_once`` (dropped before ``handshake_timeout_s`` could apply: the
``max_pending_handshakes`` bound), ``absorbed`` (the server answered everything and never had
to close: the abuse was too small to matter), ``no_close``, ``eof``, ``reset``...

Each kind of abuse has the outcomes PROTOCOL.md promises (:data:`EXPECTED`) and the ones that
are explained without a fault (:data:`TOLERATED`: ``closed_at_once`` while a probe holds every
pending-handshake slot, ``absorbed``); anything else is *unexpected*, and :func:`verdict` says,
per kind, whether every promised answer was seen and what else came. No I/O, no clock.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Final, final

import attrs

from benchmarks import ws_frames

# ---------------------------------------------------------------------- kinds and outcomes
JSON_PING_FLOOD: Final = "json_ping_flood"
MESSAGE_FLOOD: Final = "message_flood"
WS_PING_FLOOD: Final = "ws_ping_flood"
NON_READER: Final = "non_reader"
SLOWLORIS: Final = "slowloris"
PENDING_PROBE: Final = "pending_probe"
HUGE_MESSAGE: Final = "huge_message"
THREAD_ID: Final = "thread_id"
CHURN: Final = "churn"
LIMITS: Final = "limits"

KINDS: Final = (
    JSON_PING_FLOOD, MESSAGE_FLOOD, WS_PING_FLOOD, NON_READER, SLOWLORIS, PENDING_PROBE,
    HUGE_MESSAGE, THREAD_ID, CHURN, LIMITS,
)
"""Every kind of abuse, in report order."""

ABSORBED: Final = "absorbed"
CLOSED_AT_ONCE: Final = "closed_at_once"
HANDSHAKE_TIMEOUT: Final = "handshake_timeout"
ACCEPTED: Final = "accepted"
ABORTED: Final = "aborted"
TCP_CLOSED: Final = "tcp_closed"
NO_CLOSE: Final = "no_close"
EOF: Final = "eof"
RESET: Final = "reset"
ERROR_TOO_LONG: Final = "error_frame_too_long"

EXPECTED: Final[Mapping[str, frozenset[str]]] = {
    JSON_PING_FLOOD: frozenset({"close:4008"}),
    MESSAGE_FLOOD: frozenset({"close:4008"}),
    WS_PING_FLOOD: frozenset({"close:4008"}),
    NON_READER: frozenset({"close:4008"}),
    SLOWLORIS: frozenset({HANDSHAKE_TIMEOUT}),
    PENDING_PROBE: frozenset({CLOSED_AT_ONCE, HANDSHAKE_TIMEOUT}),
    HUGE_MESSAGE: frozenset({"close:1009"}),
    THREAD_ID: frozenset({"error:invalid_field:thread_id", ACCEPTED}),
    CHURN: frozenset({"close:1000", ABORTED, TCP_CLOSED}),
    LIMITS: frozenset({"http:429", "http:401", "error:rate_limited"}),
}
"""The answers PROTOCOL.md promises each abuse; every one must be seen at least once."""

TOLERATED: Final[Mapping[str, frozenset[str]]] = {
    JSON_PING_FLOOD: frozenset({ABSORBED, CLOSED_AT_ONCE}),
    MESSAGE_FLOOD: frozenset({ABSORBED, CLOSED_AT_ONCE}),
    WS_PING_FLOOD: frozenset({ABSORBED, CLOSED_AT_ONCE}),
    NON_READER: frozenset({ABSORBED, CLOSED_AT_ONCE}),
    SLOWLORIS: frozenset({CLOSED_AT_ONCE}),
    PENDING_PROBE: frozenset(),
    HUGE_MESSAGE: frozenset({CLOSED_AT_ONCE}),
    THREAD_ID: frozenset({CLOSED_AT_ONCE}),
    CHURN: frozenset({CLOSED_AT_ONCE}),
    LIMITS: frozenset({CLOSED_AT_ONCE}),
}
"""Outcomes explained without a fault: ``closed_at_once`` (a new connection while a probe holds
every ``max_pending_handshakes`` slot) and ``absorbed`` (the server kept up: nothing to bound)."""

SECONDS_KEPT: Final = 2
"""Decimals of the seconds figures in :meth:`AbuseTally.to_dict`."""
ERROR_FRAME_LIMIT: Final = 1024
"""An ``error`` frame quotes at most 128 characters of the client's input: one longer than this
many characters quotes too much."""


def close_outcome(code: int | None, *, eof: bool = False) -> str:
    """Name the end of an attempt that read until the server closed: ``close:<code>`` for a
    close frame, ``eof`` for a TCP close without one, else ``no_close``."""
    if code is not None:
        return f"close:{code}"
    return EOF if eof else NO_CLOSE


def flood_outcome(code: int | None, *, eof: bool, answered: int, sent: int) -> str:
    """Name a flood's end: the close code when the server closed, ``absorbed`` when every
    message was answered and the socket stayed open, else as :func:`close_outcome`."""
    if code is None and not eof and answered >= sent:
        return ABSORBED
    return close_outcome(code, eof=eof)


def pending_outcome(elapsed_s: float, timeout_s: float, *, closed: bool) -> str:
    """Name how the server ended a connection that never finished its upgrade, ``elapsed_s``
    after the client began to connect.

    ``closed_at_once`` under half of ``timeout_s`` (the only reason to drop a handshake that
    soon is the ``max_pending_handshakes`` bound; on a loaded machine the client may notice
    a second or two late), ``handshake_timeout`` from one second before ``timeout_s`` to
    twice it plus two, ``closed_early`` / ``closed_late`` around that, and ``no_close`` when
    it was still open when the client gave up.
    """
    if not closed:
        return NO_CLOSE
    if elapsed_s < timeout_s / 2:
        return CLOSED_AT_ONCE
    if elapsed_s < timeout_s - 1.0:
        return "closed_early"
    return HANDSHAKE_TIMEOUT if elapsed_s <= 2 * timeout_s + 2.0 else "closed_late"


def error_outcome(frame: Mapping[str, Any]) -> str:
    """Name an ``error`` frame: ``error:<code>``, with ``:<field>`` for ``invalid_field``."""
    code = str(frame.get("code"))
    if code == "invalid_field":
        return f"error:{code}:{frame.get('field')}"
    return f"error:{code}"


def status_of(status_line: str) -> int:
    """Return the status code of an HTTP status line (``HTTP/1.1 429 Too Many``); 0 if none."""
    parts = status_line.split(" ", 2)
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0


# ---------------------------------------------------------------------- what abusers send
def text_frames(text: str, count: int) -> bytes:
    """Return ``count`` masked text frames carrying ``text`` (one mask: the server cannot
    tell, and a flood is built once)."""
    return ws_frames.client_frame(ws_frames.OP_TEXT, text.encode()) * count


def big_ping(id_chars: int = 1000) -> str:
    """Return a ``ping`` whose ``id`` has ``id_chars`` characters: its ``pong`` echoes them,
    so what a flood makes the server owe grows by bytes as well as by messages."""
    return json.dumps({"type": "ping", "id": "i" * id_chars})


def ws_ping_frames(count: int, size: int = 125) -> bytes:
    """Return ``count`` masked WebSocket ping control frames of ``size`` (<= 125) bytes."""
    return ws_frames.client_frame(ws_frames.OP_PING, b"p" * min(size, 125)) * count


def junk_message(index: int) -> str:
    """Return a message the server answers with an ``error`` frame: an unknown type with a
    100-character name, bad JSON or a ``start_agent`` without a request_id, in turn."""
    variants = (
        json.dumps({"type": "x" * 100, "n": index}),
        "{not json " + "y" * 60,
        json.dumps({"type": "start_agent", "agent": "echo", "message": "m"}),
    )
    return variants[index % len(variants)]


def huge_message(variant: int, limit: int) -> bytes:
    """Return the bytes of a message one byte over ``limit`` (``max_message_bytes``), in one of
    three shapes by ``variant``: a single text frame; two fragments that are each under the
    limit; a frame whose header claims 1 GiB, followed by ``limit + 1`` payload bytes (the
    server must not wait for the rest)."""
    payload = b"h" * (limit + 1)
    shape = variant % 3
    if shape == 0:
        return ws_frames.client_frame(ws_frames.OP_TEXT, payload)
    if shape == 1:
        half = len(payload) // 2
        first = _fragment(ws_frames.OP_TEXT, payload[:half], fin=False)
        return first + _fragment(ws_frames.OP_CONTINUATION, payload[half:], fin=True)
    head = bytes([0x80 | ws_frames.OP_TEXT, 0x80 | 127]) + (1 << 30).to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00" + payload  # mask key 0: the payload goes as it is


def huge_shape(variant: int) -> str:
    """Return the name of :func:`huge_message`'s shape ``variant``."""
    return ("single", "fragmented", "claimed_1gib")[variant % 3]


def _fragment(opcode: int, payload: bytes, *, fin: bool) -> bytes:
    """Return one masked frame (fin or not) with a zero mask key."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        head = bytes([first, 0x80 | size])
    elif size < 65536:
        head = bytes([first, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head = bytes([first, 0x80 | 127]) + size.to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00" + payload


def thread_id_cases() -> tuple[tuple[str, str], ...]:
    """Return (name, thread_id) pairs: three out of bounds (empty, 129 characters, 60,000
    characters), then 128 characters, which must be accepted."""
    return (("empty", ""), ("129", "t" * 129), ("60000", "t" * 60000), ("128", "t" * 128))


# ---------------------------------------------------------------------- the tally
@final
@attrs.define(eq=False)
class AbuseTally:
    """Outcomes by kind, with how long each took, and a few examples of what went wrong.

    Mergeable (:meth:`merge` of :meth:`to_dict` copies), so several abuser processes add up.
    """

    outcomes: dict[str, Counter[str]] = attrs.field(factory=dict)
    #: (kind, outcome) -> [count, total seconds, longest seconds]
    timing: dict[tuple[str, str], list[float]] = attrs.field(factory=dict)
    #: Per kind, anything else worth a count (pongs read, bytes sent, runs started...).
    figures: dict[str, Counter[str]] = attrs.field(factory=dict)
    examples: list[str] = attrs.field(factory=list)
    max_examples: int = 30

    def add(self, kind: str, outcome: str, seconds: float | None = None) -> None:
        """Count one attempt of ``kind`` that ended with ``outcome`` after ``seconds``."""
        self.outcomes.setdefault(kind, Counter())[outcome] += 1
        if seconds is None:
            return
        entry = self.timing.setdefault((kind, outcome), [0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += seconds
        entry[2] = max(entry[2], seconds)

    def count(self, kind: str, figure: str, amount: int = 1) -> None:
        """Add ``amount`` to a figure of ``kind`` (not an outcome)."""
        self.figures.setdefault(kind, Counter())[figure] += amount

    def note(self, text: str) -> None:
        """Keep an example of something unexpected (the first ``max_examples``)."""
        if len(self.examples) < self.max_examples:
            self.examples.append(text[:300])

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready copy: per kind its outcomes, their seconds and its figures."""
        kinds: dict[str, Any] = {}
        for kind in sorted(set(self.outcomes) | set(self.figures), key=_kind_order):
            seconds = {
                outcome: {
                    "count": int(entry[0]),
                    "mean": round(entry[1] / entry[0], SECONDS_KEPT) if entry[0] else None,
                    "max": round(entry[2], SECONDS_KEPT),
                    "total": round(entry[1], SECONDS_KEPT),
                }
                for (k, outcome), entry in sorted(self.timing.items()) if k == kind
            }
            kinds[kind] = {
                "outcomes": dict(sorted(self.outcomes.get(kind, Counter()).items())),
                "seconds": seconds,
                "figures": dict(sorted(self.figures.get(kind, Counter()).items())),
            }
        return {"kinds": kinds, "examples": list(self.examples)}

    def merge(self, data: Mapping[str, Any]) -> None:
        """Add a :meth:`to_dict` copy."""
        for kind, part in data.get("kinds", {}).items():
            self.outcomes.setdefault(kind, Counter()).update(part.get("outcomes", {}))
            self.figures.setdefault(kind, Counter()).update(part.get("figures", {}))
            for outcome, secs in part.get("seconds", {}).items():
                entry = self.timing.setdefault((kind, outcome), [0, 0.0, 0.0])
                entry[0] += secs["count"]
                entry[1] += secs["total"]
                entry[2] = max(entry[2], secs["max"])
        for example in data.get("examples", []):
            self.note(example)


def _kind_order(kind: str) -> tuple[int, str]:
    return (KINDS.index(kind) if kind in KINDS else len(KINDS), kind)


def verdict(tally: Mapping[str, Any], kinds: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Judge each kind that ran: its promised answers seen, what else came.

    Args:
        tally: An :meth:`AbuseTally.to_dict` copy.
        kinds: The kinds that were run (a kind with no outcome at all is judged too).

    Returns:
        Per kind: ``ok`` (every expected outcome seen at least once, nothing unexpected),
        ``missing`` (expected outcomes never seen), ``unexpected`` and ``tolerated`` counts.
    """
    out: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        seen: Mapping[str, int] = tally.get("kinds", {}).get(kind, {}).get("outcomes", {})
        expected, tolerated = EXPECTED[kind], TOLERATED[kind]
        missing = sorted(outcome for outcome in expected if not seen.get(outcome))
        unexpected = {k: v for k, v in seen.items() if k not in expected | tolerated}
        out[kind] = {
            "ok": not missing and not unexpected,
            "expected": sorted(expected),
            "missing": missing,
            "unexpected": dict(sorted(unexpected.items())),
            "tolerated": {k: v for k, v in sorted(seen.items()) if k in tolerated},
        }
    return out


def probe_bound_held(probes: Iterable[Mapping[str, int]], bound: int) -> bool:
    """Return True when no pending-handshake probe saw more connections held until the
    handshake timeout than ``max_pending_handshakes`` (``bound``) and each probe saw some
    closed at once."""
    found = list(probes)
    return bool(found) and all(
        p.get(HANDSHAKE_TIMEOUT, 0) <= bound and p.get(CLOSED_AT_ONCE, 0) > 0 for p in found
    )
