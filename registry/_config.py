"""The one configuration object, and the only code that reads the environment."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, final

import attrs

__all__ = ["ENV_PREFIX", "Config", "ConfigError", "Setting"]

ENV_PREFIX: Final = "REGISTRY_"


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


_WHOLE: Final = re.compile(r"\s*[0-9]+\s*")
_DECIMAL: Final = re.compile(r"\s*\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?\s*")


def _positive_int(raw: str) -> int:
    if not _WHOLE.fullmatch(raw) or int(raw) < 1:
        raise ValueError(f"expected a whole number >= 1, got {raw!r}")
    return int(raw)


def _positive_float(raw: str) -> float:
    if not _DECIMAL.fullmatch(raw) or not 0 < float(raw) < float("inf"):
        raise ValueError(f"expected a number of seconds > 0, got {raw!r}")
    return float(raw)


def _secret(raw: str) -> str:
    if not raw:
        raise ValueError("expected a non-empty secret")
    return raw


@final
@attrs.frozen
class Setting:
    """How one field of :class:`Config` is named and parsed from text."""

    name: str
    parse: Callable[[str], Any]
    help: str

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _check_positive(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    whole = attribute.type in ("int", int)
    kinds = int if whole else int | float
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value < float("inf"):
        wanted = "a whole number >= 1" if whole else "a finite number > 0"
        raise ConfigError(attribute.name, attribute.name, f"must be {wanted}, got {value!r}")


_pos = _check_positive


@final
@attrs.frozen(kw_only=True)
class Config:
    """Every timeout and limit of the registry and the server. Build it once and pass it down.

    Durations are seconds, counts are whole numbers. :meth:`from_env` reads ``REGISTRY_*``;
    nothing else in the project reads the environment.
    """

    auth_secret: str | None = None
    max_connections_per_user: int = attrs.field(default=5, validator=_pos)
    max_active_runs_per_user: int = attrs.field(default=10, validator=_pos)
    max_active_runs: int = attrs.field(default=10000, validator=_pos)
    max_message_bytes: int = attrs.field(default=65536, validator=_pos)
    max_queued_messages: int = attrs.field(default=1000, validator=_pos)
    ping_interval_s: float = attrs.field(default=20.0, validator=_pos)
    ping_timeout_s: float = attrs.field(default=10.0, validator=_pos)
    agent_timeout_s: float = attrs.field(default=120.0, validator=_pos)
    detached_run_timeout_s: float = attrs.field(default=60.0, validator=_pos)
    retention_s: float = attrs.field(default=120.0, validator=_pos)
    max_retained_events_per_run: int = attrs.field(default=100000, validator=_pos)
    shutdown_grace_s: float = attrs.field(default=5.0, validator=_pos)
    delivery_retries: int = attrs.field(default=3, validator=_pos)
    retry_delay_s: float = attrs.field(default=0.1, validator=_pos)
    event_delivery_timeout_s: float = attrs.field(default=0.5, validator=_pos)
    stale_context_age_s: float = attrs.field(default=600.0, validator=_pos)
    sweep_interval_s: float = attrs.field(default=30.0, validator=_pos)
    backpressure_pause_s: float = attrs.field(default=0.002, validator=_pos)
    close_timeout_s: float = attrs.field(default=2.0, validator=_pos)

    @classmethod
    def settings(cls) -> tuple[Setting, ...]:
        """Every setting with its environment variable, flag and parser."""
        return SETTINGS

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, str] | None = None,
    ) -> Config:
        """Builds a config from ``REGISTRY_*`` variables, then textual overrides (CLI flags).

        Args:
            environ: The environment to read; ``os.environ`` when omitted.
            overrides: Setting name to raw text; these win over the environment.

        Raises:
            ConfigError: A value is malformed or out of range; the message names its source.
        """
        env = os.environ if environ is None else environ
        overrides = overrides or {}
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            if setting.env_var in env and setting.name not in overrides:
                values[setting.name] = _parse(setting, env[setting.env_var], setting.env_var)
        for name, raw in overrides.items():
            if name not in _BY_NAME:
                raise ConfigError(name, name, "unknown setting")
            values[name] = _parse(_BY_NAME[name], raw, _BY_NAME[name].flag)
        return cls(**values)


def _parse(setting: Setting, raw: str, source: str) -> Any:
    try:
        return setting.parse(raw)
    except ValueError as exc:
        raise ConfigError(setting.name, source, f"invalid {setting.name}: {exc}") from None


def _settings(fields: Iterable[attrs.Attribute[Any]]) -> tuple[Setting, ...]:
    out = []
    for field in fields:
        if field.name == "auth_secret":
            parse: Callable[[str], Any] = _secret
        elif field.type in ("int", int):
            parse = _positive_int
        else:
            parse = _positive_float
        out.append(Setting(field.name, parse, f"default {field.default}"))
    return tuple(out)


SETTINGS: Final = _settings(attrs.fields(Config))
_BY_NAME: Final = {s.name: s for s in SETTINGS}
