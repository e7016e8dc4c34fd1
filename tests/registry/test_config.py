"""Config: PROTOCOL.md's defaults, REGISTRY_* variables, flag overrides and refusals."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from registry import Config, ConfigError

#: The defaults PROTOCOL.md lists, copied from the page.
PROTOCOL_DEFAULTS: dict[str, Any] = {
    "auth_secret": None,
    "max_connections_per_user": 5,
    "max_active_runs_per_user": 10,
    "max_active_runs": 10000,
    "max_message_bytes": 65536,
    "max_queued_messages": 1000,
    "ping_interval_s": 20,
    "ping_timeout_s": 10,
    "agent_timeout_s": 120,
    "detached_run_timeout_s": 60,
    "retention_s": 120,
    "max_retained_events_per_run": 100000,
    "shutdown_grace_s": 5,
}
COUNTS = ["max_connections_per_user", "max_active_runs_per_user", "max_active_runs",
          "max_message_bytes", "max_queued_messages", "max_retained_events_per_run",
          "delivery_retries"]
DURATIONS = ["ping_interval_s", "ping_timeout_s", "agent_timeout_s", "detached_run_timeout_s",
             "retention_s", "shutdown_grace_s", "retry_delay_s", "event_delivery_timeout_s",
             "stale_context_age_s", "sweep_interval_s"]
BAD_COUNTS = ["0", "-1", "abc", "1.5", "nan", "inf", ""]
BAD_DURATIONS = ["0", "-1", "abc", "nan", "inf", "-inf", "1e400", ""]


def env_var(name: str) -> str:
    return "REGISTRY_" + name.upper()


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize(("name", "value"), PROTOCOL_DEFAULTS.items())
def test_defaults_are_the_protocol_ones(name: str, value: Any) -> None:
    assert getattr(Config(), name) == value
    assert getattr(Config.from_env({}), name) == value


def test_every_setting_is_a_config_field_with_its_env_var_and_flag() -> None:
    settings = {s.name: s for s in Config.settings()}
    assert set(settings) == {f.name for f in attrs.fields(Config)}
    assert set(PROTOCOL_DEFAULTS) <= set(settings)
    for name, setting in settings.items():
        assert (setting.env_var, setting.flag) == (env_var(name), flag(name))


def test_from_env_reads_registry_variables_only() -> None:
    config = Config.from_env({
        "REGISTRY_AGENT_TIMEOUT_S": "2.5",
        "REGISTRY_MAX_ACTIVE_RUNS": " 7 ",
        "REGISTRY_AUTH_SECRET": "s3cret",
        "AGENT_TIMEOUT_S": "99",
        "registry_retention_s": "99",
    })
    assert config.agent_timeout_s == 2.5
    assert config.max_active_runs == 7
    assert isinstance(config.max_active_runs, int)
    assert config.auth_secret == "s3cret"
    assert config.retention_s == 120


@pytest.mark.parametrize("name", COUNTS + DURATIONS)
def test_each_setting_is_read_from_its_variable(name: str) -> None:
    assert getattr(Config.from_env({env_var(name): "3"}), name) == 3


def test_from_env_without_environ_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGISTRY_RETENTION_S", "4")
    assert Config.from_env().retention_s == 4


def test_overrides_win_over_the_environment() -> None:
    config = Config.from_env(
        {"REGISTRY_AGENT_TIMEOUT_S": "2", "REGISTRY_RETENTION_S": "9"},
        {"agent_timeout_s": "3", "max_active_runs": "4"},
    )
    assert (config.agent_timeout_s, config.retention_s, config.max_active_runs) == (3, 9, 4)


@pytest.mark.parametrize("raw", BAD_COUNTS)
@pytest.mark.parametrize("name", ["max_active_runs", "max_retained_events_per_run"])
def test_an_invalid_count_is_refused_naming_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({env_var(name): raw})
    assert env_var(name) in str(info.value)
    assert (info.value.setting, info.value.source) == (name, env_var(name))


@pytest.mark.parametrize("raw", BAD_DURATIONS)
@pytest.mark.parametrize("name", ["agent_timeout_s", "retention_s"])
def test_an_invalid_duration_is_refused_naming_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({env_var(name): raw})
    assert env_var(name) in str(info.value)
    assert info.value.setting == name


@pytest.mark.parametrize("raw", ["0", "-1", "abc", "1.5", "nan", "inf"])
def test_an_invalid_flag_is_refused_naming_the_flag(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({}, {"max_connections_per_user": raw})
    assert "--max-connections-per-user" in str(info.value)
    assert info.value.source == "--max-connections-per-user"


def test_an_invalid_flag_is_refused_even_when_the_variable_is_valid() -> None:
    with pytest.raises(ConfigError, match="--agent-timeout-s"):
        Config.from_env({"REGISTRY_AGENT_TIMEOUT_S": "2"}, {"agent_timeout_s": "0"})


def test_a_valid_flag_wins_over_an_invalid_variable() -> None:
    config = Config.from_env({"REGISTRY_AGENT_TIMEOUT_S": "abc"}, {"agent_timeout_s": "4"})
    assert config.agent_timeout_s == 4
    with pytest.raises(ConfigError, match="REGISTRY_RETENTION_S"):
        Config.from_env({"REGISTRY_RETENTION_S": "abc"}, {"agent_timeout_s": "4"})


def test_an_empty_secret_is_refused() -> None:
    with pytest.raises(ConfigError, match="REGISTRY_AUTH_SECRET"):
        Config.from_env({"REGISTRY_AUTH_SECRET": ""})
    with pytest.raises(ConfigError, match="--auth-secret"):
        Config.from_env({}, {"auth_secret": ""})


def test_an_unknown_override_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match="max_runz") as info:
        Config.from_env({}, {"max_runz": "3"})
    assert info.value.setting == "max_runz"


def test_a_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), True, "3"])
def test_direct_construction_validates_too(value: Any) -> None:
    with pytest.raises(ConfigError, match="agent_timeout_s"):
        Config(agent_timeout_s=value)


def test_decimal_durations_are_allowed() -> None:
    assert Config.from_env({"REGISTRY_RETRY_DELAY_S": "0.05"}).retry_delay_s == 0.05


def test_config_is_frozen() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        Config().agent_timeout_s = 1  # type: ignore[misc]


def test_counts_and_durations_take_ascii_digits_only() -> None:
    from registry import Config, ConfigError

    for raw in ("\u0663", "\uff13", "1_0"):  # Arabic-Indic 3, fullwidth 3
        try:
            Config.from_env({"REGISTRY_MAX_ACTIVE_RUNS": raw})
        except ConfigError as exc:
            assert "REGISTRY_MAX_ACTIVE_RUNS" in str(exc)
        else:
            raise AssertionError(f"{raw!r} was accepted as a count")
    assert Config.from_env({"REGISTRY_RETENTION_S": "+2.5"}).retention_s == 2.5
