"""Config.load: sources and their precedence, validation, the file, masking secrets."""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import pytest

from mayhem.config import (
    MAX_HANDLER_TIMEOUT,
    SECRET_SETTINGS,
    SETTINGS,
    Config,
    mask_url,
    reloadable_settings,
)
from mayhem.exceptions import ConfigError, MayhemError
from mayhem.setting import METADATA, Setting, named, setting


def toml_file(tmp_path: Path, text: str, name: str = "mayhem.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def load_error(**kwargs: object) -> str:
    """Config.load(**kwargs) must fail; return its message, checked to be one line."""
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as info:
        Config.load(**kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert message
    assert "\n" not in message
    return message


# -- defaults and sources -----------------------------------------------------------------


def test_defaults_run_on_one_machine():
    """With no file, no environment and no flags, the documented defaults apply."""
    config = Config.load(environ={})
    assert config.amqp_url == "amqp://guest:guest@localhost:5672/"
    assert config.queue == "mayhem"
    assert config.exchange == "mayhem"
    assert config.queue_type == "quorum"
    assert config.declare is True
    assert config.handler is None
    assert config.concurrency == 16
    assert config.prefetch is None
    assert config.db_url == "sqlite:///mayhem.db"
    assert config.metrics_addr == "127.0.0.1:9464"
    assert config.max_attempts == 5
    assert config.retry_delays is None
    assert config.drain_timeout == 30.0
    assert config.handler_timeout == 300.0
    assert config.log_level == "INFO"
    assert config.loop == "uvloop"
    assert config.demo is False
    assert config.demo_max_delay == 0.5
    assert config.dead_queue == "mayhem.dead"


@pytest.mark.parametrize(("tty", "expected"), [(True, "text"), (False, "json")])
def test_default_log_format_follows_the_terminal(monkeypatch, tty, expected):
    """The default log format is text when stderr is a terminal and JSON otherwise."""
    monkeypatch.setattr(os, "isatty", lambda fd: tty if fd == 2 else False)
    assert Config.load(environ={}).log_format == expected


def test_config_is_frozen():
    """A Config cannot be changed after it is built."""
    config = Config.load(environ={})
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.concurrency = 3  # type: ignore[misc]


def test_file_with_mayhem_table(tmp_path):
    """Settings are read from the [mayhem] table of a TOML file, with their TOML types."""
    path = toml_file(
        tmp_path,
        '[mayhem]\nqueue = "jobs"\nconcurrency = 4\ndeclare = false\n'
        "retry_delays = [1, 2.5]\ndrain_timeout = 5\n",
    )
    config = Config.load(file=path, environ={})
    assert config.queue == "jobs"
    assert config.concurrency == 4
    assert config.declare is False
    assert config.retry_delays == (1.0, 2.5)
    assert config.drain_timeout == 5.0
    assert isinstance(config.drain_timeout, float)


def test_file_without_mayhem_table(tmp_path):
    """A TOML file with no [mayhem] table is read from its top level."""
    path = toml_file(tmp_path, 'queue = "top"\nmax_attempts = 3\n')
    config = Config.load(file=path, environ={})
    assert config.queue == "top"
    assert config.max_attempts == 3


def test_empty_file_gives_defaults(tmp_path):
    """An empty TOML file changes nothing."""
    path = toml_file(tmp_path, "")
    assert Config.load(file=path, environ={}) == Config.load(environ={})


@pytest.mark.parametrize(
    ("use_file", "use_env", "use_flag", "expected"),
    [
        (False, False, False, 16),
        (True, False, False, 2),
        (True, True, False, 3),
        (False, True, False, 3),
        (True, True, True, 4),
        (True, False, True, 4),
        (False, False, True, 4),
    ],
)
def test_precedence_flags_env_file_defaults(tmp_path, use_file, use_env, use_flag, expected):
    """A flag beats MAYHEM_* in the environment, which beats the file, which beats the default."""
    file = toml_file(tmp_path, "[mayhem]\nconcurrency = 2\n") if use_file else None
    environ = {"MAYHEM_CONCURRENCY": "3"} if use_env else {}
    flags = {"concurrency": "4"} if use_flag else {}
    config = Config.load(file=file, flags=flags, environ=environ)
    assert config.concurrency == expected


def test_sources_combine_setting_by_setting(tmp_path):
    """Each setting comes from its highest source; the others keep theirs."""
    file = toml_file(tmp_path, '[mayhem]\nqueue = "from-file"\nconcurrency = 2\nprefetch = 50\n')
    config = Config.load(
        file=file,
        environ={"MAYHEM_CONCURRENCY": "5", "MAYHEM_EXCHANGE": "from-env"},
        flags={"prefetch": "60"},
    )
    assert config.queue == "from-file"
    assert config.exchange == "from-env"
    assert config.concurrency == 5
    assert config.prefetch == 60


def test_none_flags_are_ignored():
    """A flag given as None (not on the command line) leaves the lower source in effect."""
    config = Config.load(flags={"concurrency": None}, environ={"MAYHEM_CONCURRENCY": "7"})
    assert config.concurrency == 7


def test_mayhem_config_names_the_file(tmp_path):
    """MAYHEM_CONFIG names the file when none is given, and an explicit file wins over it."""
    env_file = toml_file(tmp_path, '[mayhem]\nqueue = "env-file"\n', "a.toml")
    given_file = toml_file(tmp_path, '[mayhem]\nqueue = "given-file"\n', "b.toml")
    environ = {"MAYHEM_CONFIG": env_file}
    assert Config.load(environ=environ).queue == "env-file"
    assert Config.load(file=given_file, environ=environ).queue == "given-file"


def test_environment_values_are_parsed():
    """MAYHEM_* strings become the settings' types."""
    config = Config.load(
        environ={
            "MAYHEM_DECLARE": "no",
            "MAYHEM_RETRY_DELAYS": "1, 2.5,",
            "MAYHEM_METRICS_ADDR": "off",
            "MAYHEM_HANDLER": "",
            "MAYHEM_LOG_LEVEL": "debug",
            "MAYHEM_QUEUE_TYPE": " Classic ",
            "MAYHEM_DEMO": "on",
            "MAYHEM_DEMO_MAX_DELAY": "0",
            "MAYHEM_DB_URL": "postgresql://u@db/mayhem",
        }
    )
    assert config.declare is False
    assert config.retry_delays == (1.0, 2.5)
    assert config.metrics_addr is None
    assert config.handler is None
    assert config.log_level == "DEBUG"
    assert config.queue_type == "classic"
    assert config.demo is True
    assert config.demo_max_delay == 0.0
    assert config.db_url == "postgresql://u@db/mayhem"


def test_only_mayhem_prefixed_variables_are_read():
    """Variables without the MAYHEM_ prefix (or in another case) do not configure mayhem."""
    config = Config.load(environ={"CONCURRENCY": "3", "mayhem_concurrency": "3", "QUEUE": "x"})
    assert config.concurrency == 16
    assert config.queue == "mayhem"


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("concurrency", "abc"),
        ("concurrency", "0"),
        ("concurrency", "4097"),
        ("concurrency", "2.5"),
        ("concurrency", True),
        ("concurrency", "9" * 5000),
        ("prefetch", "0"),
        ("prefetch", "65536"),
        ("drain_timeout", "-1"),
        ("drain_timeout", "nan"),
        ("drain_timeout", "inf"),
        ("drain_timeout", "1e400"),
        ("drain_timeout", "3601"),
        ("drain_timeout", "soon"),
        ("handler_timeout", "0"),
        ("max_attempts", "0"),
        ("max_attempts", "101"),
        ("retry_delays", ""),
        ("retry_delays", " , "),
        ("retry_delays", "1,x"),
        ("retry_delays", "-1"),
        ("retry_delays", "86401"),
        ("max_message_bytes", "0"),
        ("db_url", "mysql://h/db"),
        ("db_url", "sqlite://"),
        ("db_url", "sqlite:///"),
        ("db_url", "sqlite://host/x.db"),
        ("db_url", "postgresql://"),
        ("db_url", "mayhem.db"),
        ("amqp_url", "http://h/"),
        ("amqp_url", "amqp://"),
        ("amqp_url", "amqp://h:notaport/"),
        ("amqp_url", "amqp://h:99999/"),
        ("queue", ""),
        ("queue", "x" * 201),
        ("queue", "a\nb"),
        ("exchange", "  "),
        ("queue_type", "stream"),
        ("declare", "maybe"),
        ("handler", "nocolon"),
        ("handler", "mod:"),
        ("handler", ":attr"),
        ("handler", "my-mod:handle"),
        ("handler", "mod:1attr"),
        ("metrics_addr", "9464"),
        ("metrics_addr", ":9464"),
        ("metrics_addr", "h:99999"),
        ("metrics_addr", "h:port"),
        ("log_format", "xml"),
        ("log_level", "TRACE"),
        ("loop", "trio"),
        ("demo", "2"),
        ("demo_rate", "0"),
        ("demo_max_delay", "-0.1"),
        ("inbox_retention", "-1"),
    ],
)
def test_bad_flag_is_one_line_naming_setting_and_flag(key, value):
    """A bad value given as a flag fails with one line naming the setting and the flag."""
    message = load_error(flags={key: value})
    assert message.startswith(f"{key} must be ")
    assert f"(from --{key.replace('_', '-')})" in message


def test_bad_environment_value_names_the_variable():
    """A bad MAYHEM_* value fails with one line naming the setting and the variable."""
    message = load_error(environ={"MAYHEM_CONCURRENCY": "lots"})
    assert message.startswith("concurrency must be an integer from 1 to 4096")
    assert "'lots'" in message
    assert message.endswith("(from MAYHEM_CONCURRENCY)")


@pytest.mark.parametrize("value", ['"many"', "true", "2.5", "0", "[4]"])
def test_bad_file_value_names_the_file(tmp_path, value):
    """A bad value in the TOML file fails with one line naming the setting and the file."""
    path = toml_file(tmp_path, f"[mayhem]\nconcurrency = {value}\n")
    message = load_error(file=path)
    assert message.startswith("concurrency must be ")
    assert message.endswith(f"(in {path})")


def test_highest_source_is_the_one_validated(tmp_path):
    """A bad value in a lower source is not an error when a higher source overrides it."""
    path = toml_file(tmp_path, '[mayhem]\nconcurrency = "bad"\n')
    config = Config.load(
        file=path, environ={"MAYHEM_CONCURRENCY": "also bad"}, flags={"concurrency": "8"}
    )
    assert config.concurrency == 8


@pytest.mark.parametrize(
    ("key", "value"), [("amqp_url", "http://h/"), ("declare", "maybe"), ("log_level", "x")]
)
def test_error_message_has_no_stray_period(key, value):
    """A validation message reads '<description>, got <value>' without '., '."""
    assert "., got" not in load_error(flags={key: value})


# -- the file -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ['[mayhem]\nqueue = "q"\nconcurency = 4\n', "concurency = 4\n"])
def test_unknown_key_in_file(tmp_path, text):
    """An unknown key in the file (in the table or at the top level) names the key and file."""
    path = toml_file(tmp_path, text)
    message = load_error(file=path)
    assert "'concurency'" in message
    assert path in message


def test_missing_file(tmp_path):
    """A file that does not exist fails with one line naming it and the cause."""
    path = str(tmp_path / "nope.toml")
    message = load_error(file=path)
    assert message == f"cannot read config file {path}: No such file or directory"


def test_directory_as_file(tmp_path):
    """A directory given as the file fails with one line naming it."""
    message = load_error(file=str(tmp_path))
    assert message.startswith(f"cannot read config file {tmp_path}: ")


def test_file_not_utf8(tmp_path):
    """A file that is not UTF-8 text fails with one line naming it."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'queue = "caf\xe9"\n')
    assert load_error(file=str(path)) == f"config file {path} is not UTF-8 text"


@pytest.mark.parametrize(
    "text", ["[mayhem\n", "queue = \n", 'queue = "a"\nqueue = "b"\n', "concurrency = 4 4\n"]
)
def test_invalid_toml(tmp_path, text):
    """A file that is not valid TOML fails with one line naming it."""
    path = toml_file(tmp_path, text)
    message = load_error(file=path)
    assert message.startswith(f"config file {path} is not valid TOML: ")


def test_mayhem_key_not_a_table(tmp_path):
    """A top-level 'mayhem' that is not a table fails with one line."""
    path = toml_file(tmp_path, "mayhem = 5\n")
    assert load_error(file=path) == f"config file {path}: [mayhem] must be a table"


# -- settings against each other ----------------------------------------------------------


def test_prefetch_below_concurrency():
    """A prefetch window smaller than the concurrency is an error naming both values."""
    message = load_error(flags={"concurrency": "8", "prefetch": "4"})
    assert message.startswith("prefetch (4) must be at least concurrency (8)")


def test_prefetch_equal_to_concurrency_is_allowed():
    """A prefetch window equal to the concurrency is accepted."""
    config = Config.load(flags={"concurrency": "8", "prefetch": "8"}, environ={})
    assert config.effective_prefetch == 8


def test_handler_timeout_above_the_limit():
    """A handler_timeout above half RabbitMQ's consumer_timeout is an error."""
    message = load_error(flags={"handler_timeout": str(MAX_HANDLER_TIMEOUT + 1)})
    assert message.startswith(f"handler_timeout ({MAX_HANDLER_TIMEOUT + 1:g} s) must be at most")
    assert "consumer_timeout" in message


def test_handler_timeout_at_the_limit_is_allowed():
    """A handler_timeout equal to the limit is accepted."""
    config = Config.load(flags={"handler_timeout": str(MAX_HANDLER_TIMEOUT)}, environ={})
    assert config.handler_timeout == MAX_HANDLER_TIMEOUT == 900.0


def test_config_error_is_a_mayhem_error():
    """ConfigError derives from MayhemError, so callers can catch mayhem's errors at once."""
    assert issubclass(ConfigError, MayhemError)


# -- derived values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [({}, 32), ({"concurrency": "3"}, 6), ({"concurrency": "3", "prefetch": "5"}, 5)],
)
def test_effective_prefetch(flags, expected):
    """The prefetch window is twice the concurrency unless set."""
    assert Config.load(flags=flags, environ={}).effective_prefetch == expected


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({}, (1.0, 2.0, 4.0, 8.0)),
        ({"max_attempts": "1"}, (1.0,)),
        ({"max_attempts": "2"}, (1.0,)),
        (
            {"max_attempts": "12"},
            (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 300.0, 300.0),
        ),
        ({"retry_delays": "0.5,3"}, (0.5, 3.0)),
    ],
)
def test_effective_retry_delays(flags, expected):
    """Retry delays default to 1 s doubling, capped at 300 s, one per retry; explicit ones win."""
    assert Config.load(flags=flags, environ={}).effective_retry_delays == expected


# -- masking secrets -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://u:secret@h:5672/vhost", "amqp://u:***@h:5672/vhost"),
        (
            "amqps://user:pw@broker.example/%2f?heartbeat=5",
            "amqps://user:***@broker.example/%2f?heartbeat=5",
        ),
        ("postgresql://u:s3cret@db:5432/app", "postgresql://u:***@db:5432/app"),
        ("amqp://:secret@h/", "amqp://:***@h/"),
        ("amqp://u:p@ss@h/", "amqp://u:***@h/"),
        ("amqp://u:@h/", "amqp://u:***@h/"),
    ],
)
def test_mask_url_masks_the_password(url, expected):
    """mask_url replaces the password, and only the password, with ***."""
    assert mask_url(url) == expected


@pytest.mark.parametrize(
    "url",
    ["amqp://guest@localhost:5672/", "amqp://localhost/", "sqlite:///mayhem.db", "", "not a url"],
)
def test_mask_url_without_password_is_untouched(url):
    """A URL with no password is returned unchanged."""
    assert mask_url(url) == url


@pytest.mark.parametrize("url", ["amqp://u:secret@[h/", "u:secret@[::1", "amqp://u:secret@[::1/"])
def test_mask_url_garbage_still_hides_the_password(url):
    """A string that no URL parser accepts still has its password masked."""
    assert "secret" not in mask_url(url)
    assert "***" in mask_url(url)


def test_masked_never_contains_passwords():
    """Config.masked() hides the passwords of amqp_url, db_url and pushgateway."""
    config = Config.load(
        flags={
            "amqp_url": "amqp://mq:amqp-secret@h/",
            "db_url": "postgresql://pg:db-secret@h/db",
            "pushgateway": "http://pg:push-secret@push:9091",
        },
        environ={},
    )
    shown = config.masked()
    text = repr(shown)
    for secret in ("amqp-secret", "db-secret", "push-secret"):
        assert secret not in text
    assert shown["amqp_url"] == "amqp://mq:***@h/"
    assert shown["db_url"] == "postgresql://pg:***@h/db"
    assert shown["pushgateway"] == "http://pg:***@push:9091"
    # The object itself keeps the real values.
    assert config.amqp_url == "amqp://mq:amqp-secret@h/"


def test_masked_shows_every_setting_with_effective_values():
    """masked() has every setting, with the effective prefetch and retry delays."""
    config = Config.load(flags={"concurrency": "3"}, environ={})
    shown = config.masked()
    assert set(shown) == {field.name for field in attrs.fields(Config)}
    assert shown["prefetch"] == 6
    assert shown["retry_delays"] == [1.0, 2.0, 4.0, 8.0]
    assert shown["amqp_url"] == "amqp://guest:***@localhost:5672/"


@pytest.mark.parametrize(
    ("key", "url"),
    [
        ("amqp_url", "amqp://u:secret@h:badport/"),
        ("amqp_url", "http://u:secret@h/"),
        ("amqp_url", "amqp://u:secret@[h/"),
        ("db_url", "mysql://u:secret@h/db"),
        ("db_url", "sqlite://u:secret@h/x.db"),
    ],
)
def test_bad_url_error_does_not_reveal_password(key, url):
    """The error for a bad URL shows it with the password masked."""
    message = load_error(flags={key: url})
    assert "secret" not in message
    assert message.startswith(f"{key} must be ")


@pytest.mark.parametrize(
    "url",
    ["amqp://u:abc#secret@h/", "amqp://u:ab/secret@h/", "u:secret@h:5672", "amqp:/u:secret@h/"],
)
def test_malformed_url_error_does_not_reveal_password(url):
    """The error for a malformed amqp_url never shows what follows 'user:'."""
    assert "secret" not in load_error(flags={"amqp_url": url})


def test_masked_hides_password_with_hash():
    """A db_url whose password holds an unencoded '#' is still masked by masked()."""
    config = Config.load(flags={"db_url": "postgresql://u:pa#secret@h/db"}, environ={})
    assert "secret" not in config.masked()["db_url"]


# -- the declarations -------------------------------------------------------------------------


def test_every_field_is_a_declared_setting():
    """Each field carries its Setting, named after it, with a parser that says what it accepts."""
    for field in attrs.fields(Config):
        each = field.metadata[METADATA]
        assert isinstance(each, Setting)
        assert each.name == field.name
        assert SETTINGS[field.name] is each
        assert each.env == f"MAYHEM_{field.name.upper()}"
        assert each.flag == f"--{field.name.replace('_', '-')}"
        assert each.parse.__doc__
        assert each.doc
        if not isinstance(field.default, attrs.Factory):
            assert each.default == field.default


def test_a_computed_default_needs_words():
    """A setting whose default is a factory must say in words what the default is."""
    with pytest.raises(TypeError, match="needs default_text"):

        @attrs.frozen(field_transformer=named)
        class Bad:
            value: str = setting(attrs.Factory(str), parse=str, doc="a value")


def test_secrets_come_from_the_declarations():
    """The secret settings (masked, read from credentials) are those declared secret=True."""
    declared = {key for key, each in SETTINGS.items() if each.secret}
    assert declared == {"amqp_url", "db_url", "pushgateway"}
    assert set(SECRET_SETTINGS) == declared


def test_reload_set_comes_from_the_declarations():
    """SIGHUP applies the settings declared reloadable=True: the log level and concurrency."""
    declared = {key for key, each in SETTINGS.items() if each.reloadable}
    assert reloadable_settings() == declared == {"log_level", "concurrency"}


def test_bad_secret_of_another_type_is_masked_in_the_error(tmp_path):
    """A secret of the wrong type in the file is reported masked, whatever its setting's name."""
    path = toml_file(tmp_path, '[mayhem]\npushgateway = ["http://u:push-secret@h:9091"]\n')
    message = load_error(file=path)
    assert message.startswith("pushgateway must be ")
    assert "push-secret" not in message


def test_credentials_are_read_for_each_secret(tmp_path):
    """Each secret setting can come from a systemd credential file of its name."""
    (tmp_path / "amqp_url").write_text("amqp://u:a@broker/\n")
    (tmp_path / "db_url").write_text("postgresql://u:d@db/app")
    (tmp_path / "pushgateway").write_text("http://u:p@push:9091")
    (tmp_path / "queue").write_text("not-a-secret")
    config = Config.load(environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert config.amqp_url == "amqp://u:a@broker/"
    assert config.db_url == "postgresql://u:d@db/app"
    assert config.pushgateway == "http://u:p@push:9091"
    assert config.queue == "mayhem"
