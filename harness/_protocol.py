"""Client frames of PROTOCOL.md, sans-IO: text in, a typed command or a ProtocolError out.

Checks run in the order PROTOCOL.md ranks errors: ``bad_json``, then ``unknown_type``, then
``invalid_field`` field by field in the order of the table. Server frames are built here too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any, Final, final

import attrs

from registry import quote

__all__ = [
    "Ack",
    "Cancel",
    "ClientCommand",
    "Ping",
    "ProtocolError",
    "Refresh",
    "Resume",
    "StartAgent",
    "error_frame",
    "parse_client_frame",
    "pong_frame",
    "quote",
    "refreshed_frame",
    "run_accepted_frame",
]

MAX_REQUEST_ID: Final = 128
MAX_THREAD_ID: Final = 128


@final
class ProtocolError(Exception):
    """A client frame that breaks PROTOCOL.md; becomes an ``error`` frame, the socket stays open.

    Attributes:
        code: The PROTOCOL.md error code.
        field: The offending field for ``invalid_field``.
        request_id / run_id: Echoed in the error when the frame carried a valid one.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        field: str | None = None,
        request_id: str | None = None,
        run_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.request_id = request_id
        self.run_id = run_id

    def frame(self) -> bytes:
        return error_frame(self.code, self.message, field=self.field,
                           request_id=self.request_id, run_id=self.run_id)


@final
@attrs.frozen
class StartAgent:
    request_id: str
    agent: str
    message: str
    thread_id: str | None = None
    context: Mapping[str, Any] = attrs.field(factory=dict)


@final
@attrs.frozen
class Resume:
    run_id: str
    after_seq: int


@final
@attrs.frozen
class Ack:
    run_id: str
    seq: int


@final
@attrs.frozen
class Cancel:
    run_id: str


@final
@attrs.frozen
class Ping:
    id: Any = None


@final
@attrs.frozen
class Refresh:
    token: str


ClientCommand = StartAgent | Resume | Ack | Cancel | Ping | Refresh


def parse_client_frame(frame: str | bytes) -> ClientCommand:
    """Parses one client frame.

    Raises:
        ProtocolError: the first error in PROTOCOL.md's order that applies.
    """
    if isinstance(frame, bytes):
        raise ProtocolError("bad_json", "binary frames are not accepted; send JSON text")
    try:
        data = json.loads(frame, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise ProtocolError("bad_json", "the frame is not valid JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_json", "the frame must be a JSON object")
    kind = data.get("type")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise ProtocolError("unknown_type", f"unknown message type {quote(kind)}")
    command: ClientCommand = parser(data)
    return command


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is out of range for a JSON number here")
    return value


def _parse_start(data: dict[str, Any]) -> StartAgent:
    request_id = data.get("request_id")
    if not isinstance(request_id, str) or not 1 <= len(request_id) <= MAX_REQUEST_ID:
        raise _invalid("request_id", f"must be a string of 1..{MAX_REQUEST_ID} characters")
    ids = {"request_id": request_id}
    agent = _required_str(data, "agent", ids)
    message = _required_str(data, "message", ids)
    thread_id = data.get("thread_id")
    if thread_id is not None and (
        not isinstance(thread_id, str) or not 1 <= len(thread_id) <= MAX_THREAD_ID
    ):
        raise _invalid("thread_id", f"must be a string of 1..{MAX_THREAD_ID} characters", **ids)
    context = data.get("context")
    if context is not None and not isinstance(context, dict):
        raise _invalid("context", "must be a JSON object", **ids)
    return StartAgent(request_id, agent, message, thread_id, context or {})


def _parse_resume(data: dict[str, Any]) -> Resume:
    run_id = _required_str(data, "run_id", {})
    return Resume(run_id, _seq(data, "after_seq", run_id))


def _parse_ack(data: dict[str, Any]) -> Ack:
    run_id = _required_str(data, "run_id", {})
    return Ack(run_id, _seq(data, "seq", run_id))


def _parse_cancel(data: dict[str, Any]) -> Cancel:
    return Cancel(_required_str(data, "run_id", {}))


def _parse_ping(data: dict[str, Any]) -> Ping:
    return Ping(data.get("id"))


def _parse_refresh(data: dict[str, Any]) -> Refresh:
    return Refresh(_required_str(data, "token", {}))


_PARSERS: Final[dict[str, Callable[[dict[str, Any]], ClientCommand]]] = {
    "start_agent": _parse_start,
    "resume": _parse_resume,
    "ack": _parse_ack,
    "cancel": _parse_cancel,
    "ping": _parse_ping,
    "refresh": _parse_refresh,
}


def _required_str(data: Mapping[str, Any], name: str, ids: Mapping[str, str]) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise _invalid(name, "must be a string", **ids)
    return value


def _seq(data: Mapping[str, Any], name: str, run_id: str) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _invalid(name, "must be a whole number >= 0", run_id=run_id)
    return value


def _invalid(name: str, problem: str, **ids: str) -> ProtocolError:
    return ProtocolError("invalid_field", f"{name}: {problem}", field=name, **ids)


# ------------------------------------------------------------------ server frames
def _dump(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str, allow_nan=False).encode()


def error_frame(
    code: str,
    message: str,
    *,
    field: str | None = None,
    request_id: str | None = None,
    run_id: str | None = None,
) -> bytes:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    extras = {"field": field, "request_id": request_id, "run_id": run_id}
    frame.update({k: v for k, v in extras.items() if v is not None})
    return _dump(frame)


def run_accepted_frame(request_id: str, run_id: str, thread_id: str, duplicate: bool) -> bytes:
    return _dump({"type": "run_accepted", "request_id": request_id, "run_id": run_id,
                  "thread_id": thread_id, "duplicate": duplicate})


def pong_frame(ping_id: Any) -> bytes:
    return _dump({"type": "pong", "id": ping_id})


def refreshed_frame(exp: float) -> bytes:
    return _dump({"type": "refreshed", "exp": exp})
