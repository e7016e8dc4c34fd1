"""Pure helpers the comparison servers share: handshake auth and client-frame validation.

The baseline (trio-websocket) and the two peers (python-socketio, websockets) speak the subset of
PROTOCOL.md the benchmarks need. What they have in common lives here, without any I/O.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

import jwt

from benchmarks.agents import InvalidField, Step, steps_for


def token_from(target: str, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Return the JWT of a handshake: ``Authorization: Bearer`` header, else ``?token=``."""
    for name, value in headers:
        if name.lower() == b"authorization" and value.startswith(b"Bearer "):
            return value[7:].decode("latin-1").strip()
    query = urllib.parse.urlsplit(target).query
    tokens = urllib.parse.parse_qs(query).get("token")
    return tokens[0] if tokens else None


def user_for(token: str | None, secret: str | None) -> str | None:
    """Return the user id of a valid token, or None.

    With no ``secret`` configured auth is off (JWT optional): any token, or none, is accepted
    and the user id is the token's unverified ``sub`` or ``"anonymous"``.
    """
    if secret is None:
        return _unverified_sub(token) or "anonymous"
    if token is None:
        return None
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp"]})
    except jwt.PyJWTError:
        return None
    sub = claims.get("sub")
    return sub if isinstance(sub, str) and sub else None


def _unverified_sub(token: str | None) -> str | None:
    """Return a token's ``sub`` without checking it (auth off), or None."""
    if token is None:
        return None
    try:
        sub = jwt.decode(token, options={"verify_signature": False}).get("sub")
    except jwt.PyJWTError:
        return None
    return sub if isinstance(sub, str) and sub else None


def path_of(target: str) -> str:
    """Return the path of a request target without its query string."""
    return urllib.parse.urlsplit(target).path


def error(code: str, message: str, **about: Any) -> dict[str, Any]:
    """Build an ``error`` frame (``about`` adds ``request_id``, ``run_id`` or ``field``)."""
    return {"type": "error", "code": code, "message": message, **about}


def parse_frame(text: str | bytes) -> dict[str, Any] | dict[str, str]:
    """Decode a client frame; returns an ``error`` frame for bad JSON or an unknown type."""
    if isinstance(text, bytes):
        return error("bad_json", "binary frame")
    try:
        frame = json.loads(text)
    except ValueError:
        return error("bad_json", "not JSON")
    if not isinstance(frame, dict):
        return error("bad_json", "not an object")
    if frame.get("type") not in {"start_agent", "resume", "ack", "cancel", "ping"}:
        return error("unknown_type", f"unknown type {frame.get('type')!r}")
    return frame


def start_error(frame: Mapping[str, Any]) -> dict[str, Any] | None:
    """Return the ``invalid_field`` error of a ``start_agent`` frame, or None when valid."""
    request_id = frame.get("request_id")
    if not isinstance(request_id, str) or not 1 <= len(request_id) <= 128:
        return error("invalid_field", "bad request_id", field="request_id")
    for name in ("agent", "message"):
        if not isinstance(frame.get(name), str):
            return error("invalid_field", f"bad {name}", field=name, request_id=request_id)
    if not isinstance(frame.get("context", {}), dict):
        return error("invalid_field", "bad context", field="context", request_id=request_id)
    if not isinstance(frame.get("thread_id", ""), str):
        return error("invalid_field", "bad thread_id", field="thread_id", request_id=request_id)
    return None


def seq_field_error(frame: Mapping[str, Any], field: str) -> dict[str, Any] | None:
    """Return the error of a ``resume``/``ack`` frame's ``run_id`` and ``field``, or None."""
    if not isinstance(frame.get("run_id"), str):
        return error("invalid_field", "bad run_id", field="run_id")
    value = frame.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return error("invalid_field", f"bad {field}", field=field, run_id=frame["run_id"])
    return None


def listening_line(host: str, port: int) -> str:
    """Return the first stdout line every server of this project prints once it accepts."""
    return f"listening on ws://{host}:{port}/ws"


def plan(frame: dict[str, Any]) -> list[Step] | dict[str, Any]:
    """Return the steps a valid ``start_agent`` asks for, else the error frame to answer."""
    problem = start_error(frame)
    if problem is not None:
        return problem
    request_id = frame["request_id"]
    try:
        steps = steps_for(frame["agent"], frame["message"], frame.get("context", {}))
    except InvalidField as exc:
        return error("invalid_field", str(exc), field=exc.field, request_id=request_id)
    if steps is None:
        return error("unknown_agent", "no such agent", request_id=request_id)
    return steps


def accepted(request_id: Any, run: Any, duplicate: bool) -> dict[str, Any]:
    """Build the ``run_accepted`` answer for ``run`` (anything with run_id and thread_id)."""
    return {
        "type": "run_accepted",
        "request_id": request_id,
        "run_id": run.run_id,
        "thread_id": run.thread_id,
        "duplicate": duplicate,
    }
