"""The command line's usage errors, check-config and --version, in process (no broker)."""

from __future__ import annotations

import argparse
import os
import re

import attrs
import pytest

from mayhem import __version__
from mayhem.cli import EXIT_OK, EXIT_USAGE, _flags, build_parser, main
from mayhem.config import SETTINGS, Config


@pytest.fixture(autouse=True)
def no_mayhem_environment(monkeypatch):
    """The tests' own MAYHEM_* variables must not leak into the configuration."""
    for name in list(os.environ):
        if name.startswith("MAYHEM_"):
            monkeypatch.delenv(name)


def usage_error(capsys, argv: list[str]) -> list[str]:
    """main(argv) must exit 2 with an error line and a hint line; return the lines."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 2
    assert re.match(r"^mayhem( [\w-]+)?: error: ", lines[0])
    assert re.match(r"^Try 'mayhem( [\w-]+)? --help'\.$", lines[1])
    return lines


def config_error(capsys, argv: list[str]) -> str:
    """main(argv) must return 2 with one 'configuration error' line; return it."""
    assert main(argv) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("mayhem: configuration error: ")
    return lines[0]


def check_config(capsys, argv: list[str]) -> dict[str, str]:
    """Run check-config: it must exit 0 and print only 'key = value' lines; return them."""
    assert main(["check-config", *argv]) == EXIT_OK
    captured = capsys.readouterr()
    assert captured.err == ""
    shown: dict[str, str] = {}
    for line in captured.out.splitlines():
        key, sep, value = line.partition(" = ")
        assert sep
        assert re.fullmatch(r"[a-z_]+", key)
        assert key not in shown
        shown[key] = value
    return shown


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["run", "--bogus"], "mayhem: error: unrecognized arguments: --bogus"),
        (["check-config", "--bogus"], "mayhem: error: unrecognized arguments: --bogus"),
        (["run", "--concurency", "4"], "mayhem: error: unrecognized arguments: --concurency 4"),
        ([], "mayhem: error: the following arguments are required: command"),
    ],
)
def test_unknown_flag_is_a_usage_error(capsys, argv, error):
    """An unknown flag or a missing command exits 2 with one error line and one hint line."""
    lines = usage_error(capsys, argv)
    assert lines == [error, "Try 'mayhem --help'."]


def test_unknown_flag_without_command(capsys):
    """An unknown flag before any command exits 2 with two lines (argparse names the command)."""
    [line, hint] = usage_error(capsys, ["--bogus"])
    assert line == "mayhem: error: the following arguments are required: command"
    assert hint == "Try 'mayhem --help'."


def test_unknown_command(capsys):
    """An unknown command exits 2 naming it."""
    [line, _] = usage_error(capsys, ["serve"])
    assert "invalid choice: 'serve'" in line


def test_flag_without_value(capsys):
    """A flag missing its value exits 2, with the subcommand's hint."""
    lines = usage_error(capsys, ["run", "--concurrency"])
    assert lines[0] == "mayhem run: error: argument --concurrency: expected one argument"
    assert lines[1] == "Try 'mayhem run --help'."


def test_version(capsys):
    """--version prints 'mayhem <version>' and exits 0."""
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"mayhem {__version__}\n"


def test_check_config_prints_every_setting_masked(capsys):
    """check-config prints one 'key = value' line per setting, the password masked."""
    shown = check_config(capsys, ["--amqp-url", "amqp://u:secret@h/", "--concurrency", "3"])
    assert set(shown) == {field.name for field in attrs.fields(Config)}
    assert shown["amqp_url"] == '"amqp://u:***@h/"'
    assert shown["concurrency"] == "3"
    assert shown["prefetch"] == "6"
    assert shown["retry_delays"] == "[1.0, 2.0, 4.0, 8.0]"
    assert shown["declare"] == "true"
    assert shown["demo"] == "false"
    assert shown["handler"] == '""  # not set'
    assert shown["queue"] == '"mayhem"'
    assert "secret" not in repr(shown)


def test_check_config_masks_db_url(capsys):
    """check-config masks the password of a PostgreSQL db_url."""
    shown = check_config(capsys, ["--db-url", "postgresql://u:pg-secret@db/app"])
    assert shown["db_url"] == '"postgresql://u:***@db/app"'


def test_check_config_masks_passwords_in_url_options(capsys):
    """A password passed as ?password= (or ?sslpassword=) and a Pushgateway's are masked."""
    shown = check_config(
        capsys,
        [
            "--db-url", "postgresql://u@db/app?sslpassword=key-secret&password=pg-secret",
            "--pushgateway", "http://pusher:push-secret@push/",
        ],
    )  # fmt: skip
    assert shown["db_url"] == '"postgresql://u@db/app?sslpassword=***&password=***"'
    assert shown["pushgateway"] == '"http://pusher:***@push/"'
    assert "secret" not in repr(shown)


def test_check_config_sources(capsys, tmp_path, monkeypatch):
    """check-config shows the flag over MAYHEM_* over the file."""
    path = tmp_path / "mayhem.toml"
    path.write_text('[mayhem]\nqueue = "file-q"\nexchange = "file-x"\nconcurrency = 2\n')
    monkeypatch.setenv("MAYHEM_EXCHANGE", "env-x")
    monkeypatch.setenv("MAYHEM_CONCURRENCY", "5")
    shown = check_config(capsys, ["--config", str(path), "--concurrency", "7"])
    assert shown["queue"] == '"file-q"'
    assert shown["exchange"] == '"env-x"'
    assert shown["concurrency"] == "7"


def test_bad_flag_value(capsys):
    """--concurrency abc returns 2 with one line naming concurrency, the value and the flag."""
    line = config_error(capsys, ["check-config", "--concurrency", "abc"])
    assert "concurrency must be an integer from 1 to 4096" in line
    assert "'abc'" in line
    assert line.endswith("(from --concurrency)")


def test_bad_flag_value_for_run(capsys):
    """Run with a bad value fails before starting anything, with exit 2."""
    line = config_error(capsys, ["run", "--concurrency", "0"])
    assert line.endswith("(from --concurrency)")


def test_bad_environment_value(capsys, monkeypatch):
    """A bad MAYHEM_* value returns 2 with one line naming the variable."""
    monkeypatch.setenv("MAYHEM_PREFETCH", "-1")
    line = config_error(capsys, ["check-config"])
    assert line.startswith("mayhem: configuration error: prefetch must be ")
    assert line.endswith("(from MAYHEM_PREFETCH)")


def test_missing_config_file(capsys, tmp_path):
    """A --config file that does not exist returns 2 with one line naming it."""
    path = tmp_path / "missing.toml"
    line = config_error(capsys, ["check-config", "--config", str(path)])
    assert line.endswith(f"cannot read config file {path}: No such file or directory")


def test_bad_url_error_masks_password(capsys):
    """A bad --amqp-url is reported with its password masked."""
    line = config_error(capsys, ["check-config", "--amqp-url", "http://u:secret@h/"])
    assert "secret" not in line
    assert "amqp_url" in line


def test_contradicting_settings(capsys):
    """A prefetch below the concurrency returns 2 with one line."""
    line = config_error(capsys, ["check-config", "--concurrency", "8", "--prefetch", "4"])
    assert "prefetch (4) must be at least concurrency (8)" in line


@pytest.mark.parametrize(
    ("argv", "flag"),
    [(["--count", "abc"], "--count"), (["--count", "-1"], "--count"), (["--rate", "0"], "--rate")],
)
def test_publish_bad_numbers(capsys, restored_logging, argv, flag):
    """Publish with a bad --count or --rate returns 2 before connecting."""
    with restored_logging():
        line = config_error(capsys, ["publish", "--loop", "asyncio", *argv])
    assert line.startswith(f"mayhem: configuration error: {flag} must be ")


# -- flags derived from the declarations ---------------------------------------------------


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by its command line: run, publish, dead list, ... check-config."""
    found = {}
    todo = [("", build_parser())]
    while todo:
        prefix, parser = todo.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    todo.append((f"{prefix} {name}".strip(), sub))
        if prefix:
            found[prefix] = parser
    # `init` takes no settings: it writes files (tests/unit/test_scaffold.py).
    return {name: parser for name, parser in found.items() if name not in {"dead", "init"}}


# Each command's own flags, which are not settings.
OWN_FLAGS = {
    "run": set(),
    "check-config": set(),
    "publish": {"--count", "--rate", "--file", "--progress", "--no-progress"},
    "dead list": {"--limit"},
    "dead replay": {"--id", "--all"},
    "dead purge": {"--id", "--all"},
}


def test_setting_flags_are_derived_from_the_declarations():
    """Each command has exactly the flags its settings declare, plus --config and its own."""
    parsers = subcommands()
    assert set(parsers) == set(OWN_FLAGS)
    for command, parser in parsers.items():
        declared = {each.flag for each in SETTINGS.values() if command.split()[0] in each.commands}
        flags = {flag for action in parser._actions for flag in action.option_strings}
        assert flags == declared | OWN_FLAGS[command] | {"-h", "--help", "--config"}, command


def test_each_setting_flag_has_help_with_default_and_env():
    """A setting's flag help says what it does, its default and its MAYHEM_* variable."""
    for command, parser in subcommands().items():
        for action in parser._actions:
            if action.dest not in SETTINGS:
                continue
            each = SETTINGS[action.dest]
            assert action.option_strings == [each.flag], command
            assert action.help is not None
            assert action.help.startswith(each.doc)
            assert "(default: " in action.help
            assert action.help.endswith(f"; env: {each.env})")


def test_run_help_shows_every_setting(capsys):
    """`mayhem run --help` shows every setting's default and env name, flag or not."""
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for each in SETTINGS.values():
        assert f"env: {each.env})" in text
    assert "handlers running at once (default: 16; env: MAYHEM_CONCURRENCY)" in text
    assert "(default: 2 x concurrency; env: MAYHEM_PREFETCH)" in text
    assert "(default: 30; env: MAYHEM_DRAIN_TIMEOUT)" in text
    assert "(default: false; env: MAYHEM_DEMO)" in text
    assert "declare: declare the queues and exchange at start (default: true;" in text
    # The default's password is masked like any secret's.
    assert "(default: amqp://guest:***@localhost:5672/; env: MAYHEM_AMQP_URL)" in text


def test_design_command_lines_keep_working():
    """The command lines of shared/DESIGN.md parse, each flag reaching its setting."""
    run = [
        "run", "--config", "m.toml", "--amqp-url", "amqp://u:p@h/", "--queue", "q",
        "--handler", "m:f", "--concurrency", "3", "--prefetch", "9", "--db-url", "sqlite:///x.db",
        "--metrics-addr", "off", "--drain-timeout", "5", "--max-attempts", "4",
        "--retry-delays", "1,2", "--handler-timeout", "60", "--metrics-textfile", "m.prom",
        "--pushgateway", "http://h:9091", "--loop", "asyncio", "--demo", "--log-format", "json",
        "--log-level", "DEBUG",
    ]  # fmt: skip
    args = build_parser().parse_args(run)
    assert args.config == "m.toml"
    assert _flags(args) == {
        "amqp_url": "amqp://u:p@h/",
        "queue": "q",
        "handler": "m:f",
        "concurrency": "3",
        "prefetch": "9",
        "db_url": "sqlite:///x.db",
        "metrics_addr": "off",
        "drain_timeout": "5",
        "max_attempts": "4",
        "retry_delays": "1,2",
        "handler_timeout": "60",
        "metrics_textfile": "m.prom",
        "pushgateway": "http://h:9091",
        "loop": "asyncio",
        "demo": True,
        "log_format": "json",
        "log_level": "DEBUG",
    }
    publish = ["publish", "--count", "5", "--rate", "2", "--file", "x.jsonl", "--queue", "q"]
    args = build_parser().parse_args(publish)
    assert (args.count, args.rate, args.file) == ("5", "2", "x.jsonl")
    assert _flags(args) == {"queue": "q"}
    args = build_parser().parse_args(["check-config", "--config", "m.toml"])
    assert (args.config, _flags(args)) == ("m.toml", {})


def test_flags_not_given_leave_lower_sources():
    """Flags left off the command line are not passed on (None), so MAYHEM_* and the file rule."""
    assert _flags(build_parser().parse_args(["run"])) == {}


def test_check_config_masks_every_secret(capsys):
    """check-config masks the password of each setting declared secret."""
    secrets = {key for key, each in SETTINGS.items() if each.secret}
    assert secrets == {"amqp_url", "db_url", "pushgateway"}
    shown = check_config(
        capsys,
        [
            "--amqp-url", "amqp://u:amqp-secret@h/",
            "--db-url", "postgresql://u:db-secret@h/app",
            "--pushgateway", "http://u:push-secret@h:9091",
        ],
    )  # fmt: skip
    assert "secret" not in repr(shown)
    assert shown["pushgateway"] == '"http://u:***@h:9091"'
