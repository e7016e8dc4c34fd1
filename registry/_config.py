"""The one configuration object, and the only code that reads the environment."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Literal, TypeAlias, final

import attrs

__all__ = ["ENV_PREFIX", "Config", "ConfigError", "DeliveryMode", "Scope", "Setting"]

ENV_PREFIX: Final = "REGISTRY_"

#: Who reads a setting: the registry itself, or only a transport (the WebSocket server).
Scope: TypeAlias = Literal["registry", "server"]
#: ``registry``: the retained, retried delivery; ``direct``: the legacy path (PROTOCOL v2).
DeliveryMode: TypeAlias = Literal["registry", "direct"]

_DELIVERY_MODES: Final[tuple[DeliveryMode, ...]] = ("registry", "direct")
_REDIS_SCHEMES: Final = ("redis://", "rediss://", "unix://")
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
_INF: Final = float("inf")
_DEFAULT_PORTS: Final = {"http": 80, "ws": 80, "https": 443, "wss": 443}


class ConfigError(ValueError):
    """A setting has a value it cannot take.

    Attributes:
        setting: The name of the setting (``agent_timeout_s``), as PROTOCOL.md writes it.
        source: Where the value came from (``REGISTRY_AGENT_TIMEOUT_S``, ``--agent-timeout-s``).
    """

    def __init__(self, setting: str, source: str, message: str) -> None:
        super().__init__(f"{source}: {message}")
        self.setting = setting
        self.source = source


# Parsers: text (an environment variable, a flag) to the typed value, or ValueError.

_WHOLE: Final = re.compile(r"\s*[0-9]+\s*")
_DECIMAL: Final = re.compile(r"\s*\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?\s*")
_ORIGIN: Final = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://"
    r"(?P<host>[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
)


def _positive_int(raw: str) -> int:
    if not _WHOLE.fullmatch(raw) or int(raw) < 1:
        raise ValueError(f"expected a whole number >= 1, got {raw!r}")
    return int(raw)


def _positive_decimal(raw: str, unit: str) -> float:
    if not _DECIMAL.fullmatch(raw) or not 0 < float(raw) < _INF:
        raise ValueError(f"expected a number of {unit} > 0, got {raw!r}")
    return float(raw)


def _seconds(raw: str) -> float:
    return _positive_decimal(raw, "seconds")


def _mebibytes(raw: str) -> float:
    return _positive_decimal(raw, "MiB")


def _secret(raw: str) -> str:
    if not raw:
        raise ValueError("expected a non-empty secret")
    return raw


def _boolean(raw: str) -> bool:
    word = raw.strip().lower()
    if word not in _TRUE | _FALSE:
        raise ValueError(f"expected 1/true/yes/on or 0/false/no/off, got {raw!r}")
    return word in _TRUE


def normalise_origin(raw: str) -> str:
    """``scheme://host[:port]``, scheme and host lower-cased, a default port dropped."""
    match = _ORIGIN.fullmatch(raw)
    port = int(match["port"]) if match and match["port"] else None
    if not match or port == 0 or (port or 0) > 65535:
        raise ValueError(f"expected an origin like https://chat.example[:port], got {raw!r}")
    scheme, host = match["scheme"].lower(), match["host"].lower()
    shown = "" if port in (None, _DEFAULT_PORTS.get(scheme)) else f":{port}"
    return f"{scheme}://{host}{shown}"


def _origins(raw: str) -> tuple[str, ...]:
    return tuple(normalise_origin(item.strip()) for item in raw.split(",") if item.strip())


def _delivery_mode(raw: str) -> DeliveryMode:
    word = raw.strip()
    for mode in _DELIVERY_MODES:
        if word == mode:
            return mode
    raise ValueError(f"expected registry or direct, got {raw!r}")


def _redis_url(raw: str) -> str:
    if not raw.startswith(_REDIS_SCHEMES):
        raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {raw!r}")
    return raw


# Validators and converters: the same rules for a Config built directly.


def _refuse(attribute: attrs.Attribute[Any], wanted: str, value: object) -> ConfigError:
    return ConfigError(attribute.name, attribute.name, f"must be {wanted}, got {value!r}")


def _check_count(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _refuse(attribute, "a whole number >= 1", value)


def _check_positive(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < _INF:
        raise _refuse(attribute, "a finite number > 0", value)


def _check_secret(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise _refuse(attribute, "None or a non-empty string", value)


def _check_bool(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise _refuse(attribute, "True or False", value)


def _check_delivery_mode(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value not in _DELIVERY_MODES:
        raise _refuse(attribute, "'registry' or 'direct'", value)


def _check_redis_url(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not (isinstance(value, str) and value.startswith(_REDIS_SCHEMES)):
        raise _refuse(attribute, "None or a redis://, rediss:// or unix:// URL", value)


def _to_origins(value: str | Iterable[str]) -> tuple[str, ...]:
    """Comma-separated text or an iterable of origins, normalized like the environment's."""
    try:
        if isinstance(value, str):
            return _origins(value)
        items = list(value)
        if not all(isinstance(item, str) for item in items):
            raise ValueError(f"expected origins as strings, got {items!r}")
        return tuple(normalise_origin(item) for item in items)
    except (TypeError, ValueError) as exc:
        raise ConfigError("allowed_origins", "allowed_origins", f"invalid origins: {exc}") from None


# Fields: each carries its parser, its scope and its one-line meaning, in one place.

_DOC: Final = "registry.setting"


@attrs.frozen
class _Doc:
    parse: Callable[[str], Any]
    about: str
    scope: Scope


def _doc(parse: Callable[[str], Any], about: str, scope: Scope) -> dict[str, _Doc]:
    return {_DOC: _Doc(parse, about, scope)}


def _field(
    default: object, parse: Callable[[str], Any], about: str, scope: Scope, **kwargs: Any
) -> Any:
    return attrs.field(default=default, metadata=_doc(parse, about, scope), **kwargs)


def _count(default: int, about: str, scope: Scope = "registry") -> Any:
    return _field(default, _positive_int, about, scope, validator=_check_count)


def _duration(default: float, about: str, scope: Scope = "registry") -> Any:
    return _field(default, _seconds, about, scope, validator=_check_positive)


def _size(default: float, about: str, scope: Scope = "registry") -> Any:
    return _field(default, _mebibytes, about, scope, validator=_check_positive)


def _switch(about: str, scope: Scope = "registry") -> Any:
    return _field(False, _boolean, about, scope, validator=_check_bool)


def _token(about: str, scope: Scope = "registry") -> Any:
    return _field(None, _secret, about, scope, validator=_check_secret)


@final
@attrs.frozen
class Setting:
    """How one field of :class:`Config` is named, described and parsed from text.

    Attributes:
        name: The field name (``agent_timeout_s``), as PROTOCOL.md writes it.
        parse: Turns text into the typed value; raises ``ValueError`` on a bad value.
        scope: ``"server"`` when only a transport (the WebSocket server) reads it.
        about: One line saying what the setting bounds or switches.
        default: The value a :class:`Config` has unless told otherwise.
    """

    name: str
    parse: Callable[[str], Any]
    scope: Scope
    about: str
    default: object

    @property
    def env_var(self) -> str:
        """The environment variable, ``REGISTRY_`` + the name in upper case."""
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        """The command-line flag, ``--`` + the name with dashes."""
        return "--" + self.name.replace("_", "-")

    @property
    def help(self) -> str:
        """``[scope] default X; meaning``, for ``--help`` and the README."""
        return f"[{self.scope}] default {_show(self.default)}; {self.about}"


def _show(value: object) -> str:
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@final
@attrs.frozen(kw_only=True)
class Config:
    """Every timeout and limit of the registry and the server. Build it once and pass it down.

    Durations are seconds, counts are whole numbers, sizes are MiB. :meth:`from_env` reads
    ``REGISTRY_*``; nothing else in the project reads the environment. Direct construction
    applies the same rules and raises :class:`ConfigError` naming the field.
    """

    auth_secret: str | None = _token(
        "secret that signs the clients' HS256 JWTs", "server")
    metrics_token: str | None = _token(
        "bearer token for /metrics and /dashboard (none: open)", "server")
    max_connections_per_user: int = _count(
        5, "open WebSocket connections per user")
    max_active_runs_per_user: int = _count(
        10, "runs in flight per user")
    max_active_runs: int = _count(
        10000, "runs in flight in all")
    max_message_bytes: int = _count(
        65536, "largest client frame in bytes (bigger: close 1009)", "server")
    max_queued_messages: int = _count(
        1000, "frames queued for one socket before it is closed with 4008", "server")
    max_queued_mib: float = _size(
        8.0, "MiB queued for one socket before it is closed with 4008", "server")
    ping_interval_s: float = _duration(
        20.0, "seconds between keepalive pings", "server")
    ping_timeout_s: float = _duration(
        10.0, "seconds a ping may go unanswered", "server")
    agent_timeout_s: float = _duration(
        120.0, "seconds a run may take before it times out")
    detached_run_timeout_s: float = _duration(
        60.0, "seconds a run may go on with no socket subscribed")
    retention_s: float = _duration(
        120.0, "seconds an ended run stays resumable")
    max_retained_events_per_run: int = _count(
        100000, "events one run retains for resume")
    max_retained_runs_per_user: int = _count(
        100, "ended runs retained per user, oldest dropped first")
    max_retained_mib: float = _size(
        256.0, "MiB of retained events in all, oldest runs dropped first")
    shutdown_grace_s: float = _duration(
        5.0, "seconds runs get to end on SIGTERM/SIGINT", "server")
    delivery_retries: int = _count(
        3, "attempts to hand an event to one connection")
    retry_delay_s: float = _duration(
        0.1, "seconds between delivery attempts")
    event_delivery_timeout_s: float = _duration(
        0.5, "seconds one delivery attempt may take")
    stale_context_age_s: float = _duration(
        600.0, "age in seconds at which a run is swept")
    sweep_interval_s: float = _duration(
        30.0, "seconds between sweeps for stale runs")
    backpressure_pause_s: float = _duration(
        0.002, "seconds a run waits per event for a full socket to drain", "server")
    close_timeout_s: float = _duration(
        10.0, "seconds a closed socket gets to read its close frame", "server")
    handshake_timeout_s: float = _duration(
        5.0, "seconds a connection gets to complete its WebSocket upgrade", "server")
    max_pending_handshakes: int = _count(
        1000, "WebSocket upgrades in progress at once", "server")
    allowed_origins: tuple[str, ...] = attrs.field(
        default=(), converter=_to_origins,
        metadata=_doc(_origins, "comma-separated browser origins allowed (none: any)", "server"))
    expose_errors: bool = _switch(
        "send agent and tool exception texts to clients (development)", "server")
    delivery_mode: Literal["registry", "direct"] = _field(
        "registry", _delivery_mode, "registry, or direct: the legacy path with no retention",
        "registry", validator=_check_delivery_mode)
    redis_url: str | None = _field(
        None, _redis_url, "Redis URL shared by all nodes of one service (none: state in-process)",
        "registry", validator=_check_redis_url)
    node_lease_s: float = _duration(
        10.0, "seconds after which a silent node's runs are ended")
    strict: bool = _switch(
        "raise, instead of returning False, on an event the registry refuses")

    @classmethod
    def settings(cls, scope: Scope | None = None) -> tuple[Setting, ...]:
        """Every setting with its environment variable, flag, parser and help.

        Args:
            scope: Only the settings of this scope (``"registry"`` or ``"server"``); all if None.
        """
        return SETTINGS if scope is None else tuple(s for s in SETTINGS if s.scope == scope)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, str] | None = None,
    ) -> Config:
        """Builds a config from ``REGISTRY_*`` variables, then textual overrides (CLI flags).

        Args:
            environ: The environment to read; ``os.environ`` when omitted.
            overrides: Setting name to raw text; these win over the environment, even over
                an invalid value of it.

        Raises:
            ConfigError: A value is malformed or out of range, or a ``REGISTRY_*`` variable or
                an override names no setting; the message names its source and, for an
                unknown name, suggests the closest known one.
        """
        env = os.environ if environ is None else environ
        overrides = overrides or {}
        _refuse_unknown(env, overrides)
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            if setting.env_var in env and setting.name not in overrides:
                values[setting.name] = _parse(setting, env[setting.env_var], setting.env_var)
        for name, raw in overrides.items():
            values[name] = _parse(_BY_NAME[name], raw, _BY_NAME[name].flag)
        return cls(**values)


def _refuse_unknown(env: Mapping[str, str], overrides: Mapping[str, str]) -> None:
    """Raises on the first (sorted) ``REGISTRY_*`` variable, then override, naming no setting."""
    for var in sorted(env):
        if var.startswith(ENV_PREFIX) and var not in _BY_ENV_VAR:
            name = var.removeprefix(ENV_PREFIX).lower()
            raise ConfigError(name, var, "unknown setting" + _did_you_mean(name, env_var=True))
    for name in sorted(overrides):
        if name not in _BY_NAME:
            raise ConfigError(name, name, "unknown setting" + _did_you_mean(name, env_var=False))


def _did_you_mean(name: str, *, env_var: bool) -> str:
    """``"; did you mean X?"`` with the closest setting, or ``""``.

    Names are compared without the shared ``REGISTRY_`` prefix, which would make every
    variable look close to every other.
    """
    close = difflib.get_close_matches(name.lower(), _BY_NAME, n=1)
    if not close:
        return ""
    setting = _BY_NAME[close[0]]
    return f"; did you mean {setting.env_var if env_var else setting.name}?"


def _parse(setting: Setting, raw: str, source: str) -> Any:
    try:
        return setting.parse(raw)
    except ValueError as exc:
        raise ConfigError(setting.name, source, f"invalid {setting.name}: {exc}") from None


def _settings(fields: Iterable[attrs.Attribute[Any]]) -> tuple[Setting, ...]:
    out = []
    for field in fields:
        doc: _Doc = field.metadata[_DOC]
        out.append(Setting(field.name, doc.parse, doc.scope, doc.about, field.default))
    return tuple(out)


SETTINGS: Final = _settings(attrs.fields(Config))
_BY_NAME: Final = {s.name: s for s in SETTINGS}
_BY_ENV_VAR: Final = {s.env_var: s for s in SETTINGS}
