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
    # v2 additions
    "close_timeout_s": 10,
    "metrics_token": None,
    "delivery_mode": "registry",
    "redis_url": None,
    "node_lease_s": 10,
    "handshake_timeout_s": 5,
    "max_pending_handshakes": 1000,
    "max_retained_runs_per_user": 100,
    "max_retained_mib": 256,
    "max_queued_mib": 8,
    "expose_errors": False,
    "allowed_origins": (),
}
COUNTS = ["max_connections_per_user", "max_active_runs_per_user", "max_active_runs",
          "max_message_bytes", "max_queued_messages", "max_retained_events_per_run",
          "delivery_retries", "max_pending_handshakes", "max_retained_runs_per_user"]
DURATIONS = ["ping_interval_s", "ping_timeout_s", "agent_timeout_s", "detached_run_timeout_s",
             "retention_s", "shutdown_grace_s", "retry_delay_s", "event_delivery_timeout_s",
             "stale_context_age_s", "sweep_interval_s", "backpressure_pause_s",
             "close_timeout_s", "handshake_timeout_s", "node_lease_s"]
SIZES = ["max_retained_mib", "max_queued_mib"]
SWITCHES = ["expose_errors", "strict"]
#: The settings only a transport reads, as the lead engineer listed them.
SERVER_SETTINGS = {"auth_secret", "metrics_token", "max_message_bytes", "max_queued_messages",
                   "max_queued_mib", "ping_interval_s", "ping_timeout_s", "backpressure_pause_s",
                   "close_timeout_s", "handshake_timeout_s", "max_pending_handshakes",
                   "allowed_origins", "shutdown_grace_s", "expose_errors"}
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


@pytest.mark.parametrize("name", COUNTS + DURATIONS + SIZES)
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


@pytest.mark.parametrize(("build", "names"), [
    (lambda: Config.from_env({"REGISTRY_AGENT_TIMEOUT_S": "soon"}), "REGISTRY_AGENT_TIMEOUT_S"),
    (lambda: Config.from_env({}, {"max_active_runs": "many"}), "--max-active-runs"),
    (lambda: Config.from_env({"REGISTRY_RETENTION": "3"}), "REGISTRY_RETENTION"),
    (lambda: Config(agent_timeout_s=0), "agent_timeout_s"),
])
def test_start_up_code_catching_value_error_catches_a_bad_setting(
    build: Any, names: str,
) -> None:
    """A service that guards start-up with ``except ValueError`` reports a bad setting too."""
    try:
        build()
    except ValueError as exc:
        caught = str(exc)
    else:
        raise AssertionError("the bad setting was accepted")
    assert caught.startswith(names)


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


# --- v2 settings -------------------------------------------------------------------------


def test_strict_is_off_by_default() -> None:
    assert Config().strict is False
    assert Config.from_env({}).strict is False


def test_counts_stay_whole_and_sizes_take_decimals() -> None:
    config = Config.from_env({"REGISTRY_MAX_PENDING_HANDSHAKES": "12",
                              "REGISTRY_MAX_RETAINED_MIB": "0.5", "REGISTRY_MAX_QUEUED_MIB": ".25"})
    assert (config.max_pending_handshakes, config.max_retained_mib, config.max_queued_mib) == (
        12, 0.5, 0.25)
    assert type(config.max_pending_handshakes) is int


@pytest.mark.parametrize("raw", BAD_COUNTS)
@pytest.mark.parametrize("name", ["max_pending_handshakes", "max_retained_runs_per_user"])
def test_an_invalid_new_count_is_refused_naming_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({env_var(name): raw})
    assert (info.value.setting, info.value.source) == (name, env_var(name))
    assert str(info.value).startswith(env_var(name) + ": ")


@pytest.mark.parametrize("raw", BAD_DURATIONS)
@pytest.mark.parametrize("name", ["handshake_timeout_s", "node_lease_s", *SIZES])
def test_an_invalid_duration_or_size_is_refused_naming_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({env_var(name): raw})
    assert (info.value.setting, info.value.source) == (name, env_var(name))
    assert env_var(name) in str(info.value)


def test_a_bad_size_is_reported_in_mib() -> None:
    with pytest.raises(ConfigError, match="MiB"):
        Config.from_env({"REGISTRY_MAX_QUEUED_MIB": "-1"})


@pytest.mark.parametrize(("raw", "value"), [
    ("1", True), ("true", True), ("TRUE", True), ("Yes", True), ("on", True), (" oN ", True),
    ("0", False), ("false", False), ("False", False), ("NO", False), ("off", False),
])
@pytest.mark.parametrize("name", SWITCHES)
def test_switches_take_the_usual_words(name: str, raw: str, value: bool) -> None:
    assert getattr(Config.from_env({env_var(name): raw}), name) is value
    assert getattr(Config.from_env({}, {name: raw}), name) is value


@pytest.mark.parametrize("raw", ["", "2", "-1", "y", "n", "tru", "enabled", "none", "1.0"])
@pytest.mark.parametrize("name", SWITCHES)
def test_any_other_switch_text_is_refused_naming_the_setting(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({env_var(name): raw})
    assert (info.value.setting, info.value.source) == (name, env_var(name))
    assert env_var(name) in str(info.value)
    with pytest.raises(ConfigError, match=flag(name)):
        Config.from_env({}, {name: raw})


@pytest.mark.parametrize("name", SWITCHES)
@pytest.mark.parametrize("value", ["true", 1, 0, None])
def test_switches_built_directly_must_be_bools(name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=name):
        Config(**{name: value})


def test_a_metrics_token_is_read_and_must_not_be_empty() -> None:
    assert Config.from_env({"REGISTRY_METRICS_TOKEN": "t0ken"}).metrics_token == "t0ken"
    with pytest.raises(ConfigError, match="REGISTRY_METRICS_TOKEN") as info:
        Config.from_env({"REGISTRY_METRICS_TOKEN": ""})
    assert info.value.setting == "metrics_token"
    with pytest.raises(ConfigError, match="--metrics-token"):
        Config.from_env({}, {"metrics_token": ""})


@pytest.mark.parametrize("name", ["auth_secret", "metrics_token"])
@pytest.mark.parametrize("value", ["", 3])
def test_secrets_built_directly_must_be_non_empty_text(name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=name):
        Config(**{name: value})


@pytest.mark.parametrize(("raw", "origins"), [
    ("", ()),
    (" , ,", ()),
    ("https://chat.example", ("https://chat.example",)),
    (" https://a.example, https://b.example ", ("https://a.example", "https://b.example")),
    ("HTTPS://Chat.Example:8443", ("https://chat.example:8443",)),
    ("https://a.example:443,http://b.example:80", ("https://a.example", "http://b.example")),
    ("http://localhost:3000,,http://127.0.0.1:5173", ("http://localhost:3000",
                                                      "http://127.0.0.1:5173")),
    ("http://[::1]:8080", ("http://[::1]:8080",)),
])
def test_allowed_origins_are_parsed_and_normalized(raw: str, origins: tuple[str, ...]) -> None:
    assert Config.from_env({"REGISTRY_ALLOWED_ORIGINS": raw}).allowed_origins == origins
    assert Config.from_env({}, {"allowed_origins": raw}).allowed_origins == origins


@pytest.mark.parametrize("raw", [
    "chat.example", "https://chat.example/", "https://chat.example/app", "https://",
    "https://chat.example?x=1", "https://user@chat.example", "https://chat.example:0",
    "https://chat.example:65536", "https://chat.example:port", "//chat.example", "*",
    "https://a.example, b.example", "https://ch at.example", "null",
])
def test_a_malformed_origin_is_refused_naming_the_setting(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({"REGISTRY_ALLOWED_ORIGINS": raw})
    assert (info.value.setting, info.value.source) == ("allowed_origins",
                                                       "REGISTRY_ALLOWED_ORIGINS")
    assert "REGISTRY_ALLOWED_ORIGINS" in str(info.value)


def test_allowed_origins_built_directly_are_normalized_and_checked() -> None:
    assert Config(allowed_origins=["HTTPS://A.example"]).allowed_origins == ("https://a.example",)
    assert Config(allowed_origins="https://a.example, https://b.example").allowed_origins == (
        "https://a.example", "https://b.example")
    for bad in (("https://a.example/",), (1,), 5):
        with pytest.raises(ConfigError, match="allowed_origins"):
            Config(allowed_origins=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("raw", "mode"), [("registry", "registry"), ("direct", "direct"),
                                          (" direct ", "direct")])
def test_delivery_mode_is_read(raw: str, mode: str) -> None:
    assert Config.from_env({"REGISTRY_DELIVERY_MODE": raw}).delivery_mode == mode
    assert Config.from_env({}, {"delivery_mode": raw}).delivery_mode == mode


@pytest.mark.parametrize("raw", ["", "legacy", "registry,direct", "redis", "0"])
def test_any_other_delivery_mode_is_refused_naming_the_setting(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({"REGISTRY_DELIVERY_MODE": raw})
    assert (info.value.setting, info.value.source) == ("delivery_mode", "REGISTRY_DELIVERY_MODE")
    assert "REGISTRY_DELIVERY_MODE" in str(info.value)
    with pytest.raises(ConfigError, match="--delivery-mode"):
        Config.from_env({}, {"delivery_mode": raw})


def test_delivery_mode_built_directly_is_checked() -> None:
    assert Config(delivery_mode="direct").delivery_mode == "direct"
    with pytest.raises(ConfigError, match="delivery_mode"):
        Config(delivery_mode="legacy")  # type: ignore[arg-type]


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://cache.example:6380",
                                 "unix:///run/redis.sock"])
def test_a_redis_url_is_read(url: str) -> None:
    assert Config.from_env({"REGISTRY_REDIS_URL": url}).redis_url == url
    assert Config(redis_url=url).redis_url == url


@pytest.mark.parametrize("raw", ["", "127.0.0.1:6379", "http://127.0.0.1:6379", "redis:/x",
                                 "memcached://x"])
def test_a_redis_url_of_another_kind_is_refused(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({"REGISTRY_REDIS_URL": raw})
    assert (info.value.setting, info.value.source) == ("redis_url", "REGISTRY_REDIS_URL")
    with pytest.raises(ConfigError, match="redis_url"):
        Config(redis_url=raw)


def test_a_valid_flag_wins_over_an_invalid_variable_of_a_v2_setting() -> None:
    config = Config.from_env(
        {"REGISTRY_DELIVERY_MODE": "legacy", "REGISTRY_EXPOSE_ERRORS": "maybe"},
        {"delivery_mode": "direct", "expose_errors": "on"},
    )
    assert (config.delivery_mode, config.expose_errors) == ("direct", True)


# --- unknown names -------------------------------------------------------------------------


@pytest.mark.parametrize(("var", "suggestion"), [
    ("REGISTRY_AGENT_TIMEOUT", "REGISTRY_AGENT_TIMEOUT_S"),
    ("REGISTRY_MAX_QUEUED_MB", "REGISTRY_MAX_QUEUED_MIB"),
    ("REGISTRY_REDIS", "REGISTRY_REDIS_URL"),
    ("REGISTRY_ALLOWED_ORIGIN", "REGISTRY_ALLOWED_ORIGINS"),
    ("REGISTRY_agent_timeout_s", "REGISTRY_AGENT_TIMEOUT_S"),
])
def test_an_unknown_variable_stops_start_up_suggesting_the_closest(
    var: str, suggestion: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({var: "2", "REGISTRY_RETENTION_S": "3"})
    assert str(info.value) == f"{var}: unknown setting; did you mean {suggestion}?"
    assert info.value.source == var


def test_an_unknown_variable_with_nothing_close_is_refused_without_a_guess() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({"REGISTRY_ZQXJ": "1"})
    assert str(info.value) == "REGISTRY_ZQXJ: unknown setting"


def test_an_unknown_variable_is_refused_even_when_flags_are_given() -> None:
    with pytest.raises(ConfigError, match="REGISTRY_RETENTION"):
        Config.from_env({"REGISTRY_RETENTION": "3"}, {"retention_s": "3"})


def test_an_unknown_variable_in_os_environ_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGISTRY_DELIVERY", "direct")
    with pytest.raises(ConfigError, match="did you mean REGISTRY_DELIVERY_MODE"):
        Config.from_env()


def test_only_the_exact_registry_prefix_counts() -> None:
    config = Config.from_env({"registry_bogus": "1", "Registry_Bogus": "1", "REGISTRYBOGUS": "1",
                              "MY_REGISTRY_BOGUS": "1", "REGISTRY_RETENTION_S": "7"})
    assert config.retention_s == 7


def test_an_unknown_override_suggests_the_closest_setting() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({}, {"agent_timeout": "3"})
    assert str(info.value) == "agent_timeout: unknown setting; did you mean agent_timeout_s?"
    assert info.value.setting == "agent_timeout"


# --- scope and help ------------------------------------------------------------------------


def test_transport_only_settings_are_marked_server() -> None:
    scopes = {s.name: s.scope for s in Config.settings()}
    assert {name for name, scope in scopes.items() if scope == "server"} == SERVER_SETTINGS
    assert {name for name, scope in scopes.items() if scope != "server"} == (
        {f.name for f in attrs.fields(Config)} - SERVER_SETTINGS)
    assert set(scopes.values()) == {"registry", "server"}


def test_settings_filter_by_scope() -> None:
    server = [s.name for s in Config.settings("server")]
    registry = [s.name for s in Config.settings(scope="registry")]
    assert set(server) == SERVER_SETTINGS
    assert {"max_connections_per_user", "delivery_mode", "redis_url", "strict"} <= set(registry)
    assert sorted(server + registry) == sorted(s.name for s in Config.settings())


@pytest.mark.parametrize(("name", "start"), [
    ("close_timeout_s", "[server] default 10; "),
    ("auth_secret", "[server] default none; "),
    ("allowed_origins", "[server] default none; "),
    ("expose_errors", "[server] default false; "),
    ("max_connections_per_user", "[registry] default 5; "),
    ("retry_delay_s", "[registry] default 0.1; "),
    ("max_retained_mib", "[registry] default 256; "),
    ("delivery_mode", "[registry] default registry; "),
])
def test_help_starts_with_the_scope_and_the_default(name: str, start: str) -> None:
    (setting,) = [s for s in Config.settings() if s.name == name]
    assert setting.help.startswith(start)


def test_every_help_carries_its_own_one_line_description() -> None:
    descriptions = []
    for setting in Config.settings():
        head, _, description = setting.help.partition("; ")
        assert head == f"[{setting.scope}] default " + head.split(" default ")[1]
        assert len(description) >= 15 and "\n" not in setting.help and "%" not in setting.help
        descriptions.append(description)
    assert len(set(descriptions)) == len(descriptions)


@pytest.mark.parametrize(("name", "raw", "value"), [
    ("max_pending_handshakes", " 42 ", 42),
    ("max_retained_mib", "0.5", 0.5),
    ("node_lease_s", "2.5", 2.5),
    ("strict", "Yes", True),
    ("expose_errors", "off", False),
    ("allowed_origins", "HTTPS://A.EXAMPLE", ("https://a.example",)),
    ("delivery_mode", "direct", "direct"),
    ("redis_url", "redis://h:6379/1", "redis://h:6379/1"),
])
def test_a_setting_parses_its_text_into_the_typed_value(name: str, raw: str, value: Any) -> None:
    (setting,) = [s for s in Config.settings() if s.name == name]
    parsed = setting.parse(raw)
    assert parsed == value
    assert type(parsed) is type(value)
