"""The run-event envelope of PROTOCOL.md: its wire encoding (once per event) and a decoded view."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, final

import attrs

from registry._payloads import Payload, payload_from_dict, validate_payload
from registry._vocabulary import EventType

__all__ = ["Event", "dump_payload", "encode_event", "envelope_prefix"]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=str, allow_nan=False)


def dump_payload(payload: Mapping[str, Any]) -> str:
    """A payload as strict JSON, whatever an agent put in it.

    Values JSON cannot hold become strings, NaN and infinities null; a structure that
    refers to itself (or nests too deeply to walk) keeps its top-level keys, each value as
    its text.
    """
    try:
        return _dumps(payload)
    except ValueError:
        pass
    try:
        return _dumps(_finite(payload))
    except (ValueError, RecursionError):
        return _dumps({str(k): v if isinstance(v, str) else repr(v) for k, v in payload.items()})


def envelope_prefix(run_id: str, thread_id: str) -> str:
    """The part of a run's envelope that is the same for each of its events (built once a run)."""
    return f',"run_id":{_dumps(run_id)},"thread_id":{_dumps(thread_id)},"seq":'


def encode_event(
    prefix: str, event_type: str, seq: int, ts: float, payload: Mapping[str, Any]
) -> bytes:
    """The UTF-8 wire form of one event, encoded once and shared by every reader.

    Equal to ``json.dumps(event.to_dict(), separators=(",", ":"))`` field for field, in the
    envelope's order: type, run_id, thread_id, seq, ts, payload.
    """
    return (
        f'{{"type":"{event_type}"{prefix}{seq},"ts":{ts!r},"payload":{dump_payload(payload)}}}'
    ).encode()


def _finite(obj: Any) -> Any:
    """A copy of ``obj`` with NaN and infinite floats replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


@final
@attrs.frozen
class Event:
    """One run event as it travels on the wire.

    Attributes:
        type: The event type.
        run_id: The run it belongs to.
        thread_id: The conversation thread of the run.
        seq: Its position in the run, from 1, without gaps.
        ts: Server Unix time (seconds) when the agent emitted it.
        payload: The event's fields, shaped per :func:`validate_payload`.
    """

    type: EventType
    run_id: str
    thread_id: str
    seq: int
    ts: float
    payload: Mapping[str, Any]

    @property
    def json(self) -> str:
        """The wire form (see :func:`encode_event`)."""
        return encode_event(
            envelope_prefix(self.run_id, self.thread_id), self.type, self.seq, self.ts,
            self.payload,
        ).decode()

    def typed_payload(self) -> Payload:
        """The payload as its attrs type (``AgentStarted``, ``ToolCompleted``, ...)."""
        return payload_from_dict(self.type, self.payload)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": str(self.type),
            "run_id": self.run_id,
            "thread_id": self.thread_id,
            "seq": self.seq,
            "ts": self.ts,
            "payload": dict(self.payload),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        """Parses the wire form.

        Raises:
            ValueError: a field is missing or malformed (the message names it).
        """
        try:
            event_type = EventType(data["type"])
        except (KeyError, ValueError):
            raise ValueError(f"not a run event type: {data.get('type')!r}") from None
        for name, types in (("run_id", str), ("thread_id", str), ("seq", int), ("payload", dict)):
            if not isinstance(data.get(name), types) or isinstance(data.get(name), bool):
                raise ValueError(f"run event needs {name!r} of type {types.__name__}")
        ts = data.get("ts")
        if not isinstance(ts, int | float) or isinstance(ts, bool):
            raise ValueError("run event needs 'ts' as a number")
        validate_payload(event_type, data["payload"])
        return cls(event_type, data["run_id"], data["thread_id"], data["seq"], float(ts),
                   data["payload"])

    @classmethod
    def from_json(cls, text: str | bytes) -> Event:
        """Parses one JSON frame; raises ValueError when it is not a valid run event."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a run event is a JSON object")
        return cls.from_dict(data)
