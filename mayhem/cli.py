"""The command line: argv to Config, logging, the loop (uvloop by default), and the exit code.

Exit codes: 0 after a clean run or shutdown; 2 for a usage or configuration error, printed as
one line without a traceback; 1 for a fatal runtime error such as an unreachable broker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeVar

from mayhem import logs, tracing
from mayhem._version import __version__
from mayhem.config import SECRET_SETTINGS, SETTINGS, Config, show
from mayhem.exceptions import ConfigError, StartupError
from mayhem.redact import install, mask_url, redact, url_secrets
from mayhem.setting import DAEMON, ENV_PREFIX, Setting

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)
N = TypeVar("N", int, float)

EXIT_OK: Final = 0
EXIT_FATAL: Final = 1
EXIT_USAGE: Final = 2
THREAD_GRACE: Final = 0.5
EPILOG_WIDTH: Final = 78


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line plus one hint line, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\nTry '{self.prog} --help'.\n")


def _words(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def setting_help(each: Setting) -> str:
    """A setting's help: what it does, its default (a secret's masked) and its variable."""
    default = each.default_text or _words(show(each, each.default))
    return f"{each.doc} (default: {default}; env: {each.env})"


def _add_settings(parser: argparse.ArgumentParser, command: str) -> None:
    """Add ``--config`` and a flag for each setting that ``command`` offers.

    Every value stays a string here (``None`` when not given); Config converts and checks it.
    Settings without a flag for the command are listed after the options.
    """
    parser.add_argument("--config", help=f"TOML configuration file (env: {ENV_PREFIX}CONFIG)")
    unflagged = []
    for each in SETTINGS.values():
        if command not in each.commands:
            unflagged.append(each)
            continue
        # argparse %-formats help text; a default may hold a '%' (a URL's %2f).
        text = setting_help(each).replace("%", "%%")
        if each.switch:
            parser.add_argument(
                each.flag, dest=each.name, action="store_true", default=None, help=text
            )
        else:
            parser.add_argument(
                each.flag,
                dest=each.name,
                default=None,
                metavar=each.name.upper(),
                help=text,
                # Repeated, the values come as a list, which the setting's parser takes.
                action="append" if each.repeatable else "store",
            )
    if command in DAEMON:
        lines = [
            textwrap.fill(
                f"{each.name}: {setting_help(each)}",
                width=EPILOG_WIDTH,
                initial_indent="  ",
                subsequent_indent="    ",
                break_long_words=False,
                break_on_hyphens=False,
            )
            for each in unflagged
        ]
        title = "settings without a flag (set them in the file or the environment):"
        parser.epilog = "\n".join([title, *lines])


def build_parser() -> argparse.ArgumentParser:
    """The ``mayhem`` argument parser, its setting flags derived from the declarations."""
    parser = _Parser(prog="mayhem", description="A RabbitMQ consumer daemon that loses nothing.")
    parser.add_argument("--version", action="version", version=f"mayhem {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    raw = argparse.RawDescriptionHelpFormatter  # keeps the epilog's one line per setting

    run = commands.add_parser("run", help="run the daemon in the foreground", formatter_class=raw)
    _add_settings(run, "run")

    publish = commands.add_parser("publish", help="publish messages with publisher confirms")
    _add_settings(publish, "publish")
    publish.add_argument("--count", default="10", help="demo messages to publish (default 10)")
    publish.add_argument("--rate", default=None, help="messages per second (default: no limit)")
    publish.add_argument(
        "--file",
        default=None,
        help="publish one message per line of a JSON-lines file ('-': standard input); "
        "every line is checked first, and a bad one publishes nothing",
    )
    publish.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar with the rate on stderr (default: when stderr is a terminal)",
    )

    dead = commands.add_parser("dead", help="inspect, replay or drop dead-lettered messages")
    actions = dead.add_subparsers(dest="action", required=True, parser_class=_Parser)
    listing = actions.add_parser("list", help="show dead-lettered messages (they stay)")
    listing.add_argument("--limit", default="100", help="show at most this many (default 100)")
    for name, text in (
        ("replay", "send messages back to the work queue, attempts reset"),
        ("purge", "drop messages for good"),
    ):
        action = actions.add_parser(name, help=text)
        which = action.add_mutually_exclusive_group(required=True)
        which.add_argument("--id", action="append", dest="ids", help="a message_id (repeatable)")
        which.add_argument("--all", action="store_true", help="every message in the queue")
    for action in actions.choices.values():
        _add_settings(action, "dead")

    check = commands.add_parser(
        "check-config", help="validate and print the configuration", formatter_class=raw
    )
    _add_settings(check, "check-config")

    init = commands.add_parser(
        "init",
        help="write a handler, its test and a configuration file to start from",
        description="Write NAME/handler.py, tests/test_handler.py and mayhem.toml (every "
        "setting, commented); nothing is overwritten.",
    )
    init.add_argument("name", help="the handler's package, such as myapp")
    init.add_argument("--directory", default=".", help="where to write (default: here)")
    return parser


def _flags(args: argparse.Namespace) -> dict[str, object]:
    """The settings given as flags, by name."""
    given = {key: getattr(args, key, None) for key in SETTINGS}
    # A repeatable flag given once is that one value; given more often, the list.
    return {
        key: value[0] if isinstance(value, list) and len(value) == 1 else value
        for key, value in given.items()
        if value is not None
    }


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop to run on: uvloop unless asked for plain asyncio."""
    if name == "uvloop":
        import uvloop  # noqa: PLC0415 -- only imported when chosen

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0911 -- a return per command
    """Run the command line; return the exit code."""
    if argv is None:
        _mask_process_title()
    args = build_parser().parse_args(argv)
    if args.command == "init":
        return _init(args)
    secrets: set[str] = set()
    try:
        config = Config.load(file=args.config, flags=_flags(args))
        if args.command == "check-config":
            return _check_config(config)
        secrets = config_secrets(config)
        logs.setup(config.log_format, config.log_level)
        # The safety net: a library's exception text or a traceback may quote a URL.
        install(secrets)
        if args.command == "publish":
            return _publish(config, args)
        if args.command == "dead":
            return _dead(config, args)
        return _run(config, args)
    except ConfigError as exc:
        print(f"mayhem: configuration error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    except StartupError as exc:
        print(f"mayhem: {redact(str(exc), secrets)}", file=sys.stderr)  # noqa: T201
        return EXIT_FATAL


def config_secrets(config: Config) -> set[str]:
    """The passwords in the configuration's URLs, to be masked wherever they would show."""
    return set().union(*(url_secrets(getattr(config, key)) for key in SECRET_SETTINGS))


def _mask_process_title() -> None:
    """Rewrite the process title (``ps``, ``/proc/PID/cmdline``) with passwords masked."""
    import setproctitle  # noqa: PLC0415 -- only for the real command line

    # Every word: a password can be in a URL's query (?password=) as well as before its '@'.
    words = [mask_url(word) for word in sys.argv]
    if words != sys.argv:
        setproctitle.setproctitle(" ".join(["mayhem", *words[1:]]))


def _check_config(config: Config) -> int:
    try:
        for key, value in config.masked().items():
            print(f"{key} = {_toml(value)}")  # noqa: T201
        sys.stdout.flush()
    except BrokenPipeError:
        # `mayhem check-config | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def _toml(value: Any) -> str:  # noqa: ANN401 -- any setting's value
    if value is None:
        return '""  # not set'
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def _run(config: Config, args: argparse.Namespace) -> int:
    from mayhem.daemon import Daemon, run_daemon  # noqa: PLC0415 -- keeps --help fast

    daemon = Daemon(config, config_file=args.config, flags=_flags(args))
    # Decided once the handler is imported: its module may set the tracer provider.
    tracing.active()
    try:
        code = run_daemon(daemon, loop_factory(config.loop))
    except (ConfigError, StartupError):
        raise
    except Exception:
        log.exception("fatal error")
        code = EXIT_FATAL
    finally:
        tracing.flush()
    _exit_despite_stuck_threads(code)
    return code


def _exit_despite_stuck_threads(code: int) -> None:
    """Exit now if a plain ``def`` handler is still stuck in its thread.

    Its message was requeued and its transaction rolled back at the drain deadline, but the
    interpreter would wait for the thread forever at exit; a thread cannot be cancelled.
    """
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    deadline = time.monotonic() + THREAD_GRACE
    for thread in others:
        # Idle pool threads leave at once; give them a moment before calling any stuck.
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t for t in others if t.is_alive()]
    if stuck:
        log.warning(
            "exiting with %d handler threads still running: %s",
            len(stuck),
            stuck,
            extra={"event": "handler_threads_left", "count": len(stuck)},
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _publish(config: Config, args: argparse.Namespace) -> int:
    from mayhem.publisher import InputError, publish  # noqa: PLC0415 -- keeps --help fast

    count = _number(args.count, "--count", int, 0)
    rate = _number(args.rate, "--rate", float, 0.001) if args.rate is not None else None
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    tracing.active()
    try:
        with asyncio.Runner(loop_factory=loop_factory(config.loop)) as runner:
            report = runner.run(
                publish(config, count=count, rate=rate, file=args.file, progress=progress)
            )
    except InputError as exc:
        print(f"mayhem: publish: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    finally:
        tracing.flush()
    print(report.summary())  # noqa: T201
    return EXIT_OK if report.failed == 0 else EXIT_FATAL


def _init(args: argparse.Namespace) -> int:
    from mayhem import scaffold  # noqa: PLC0415 -- keeps --help fast

    try:
        written = scaffold.init(args.name, Path(args.directory))
    except scaffold.ScaffoldError as exc:
        print(f"mayhem: init: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    for path in written:
        print(f"wrote {path}")  # noqa: T201
    where = "" if Path(args.directory) == Path() else f"cd {args.directory} && "
    print(  # noqa: T201
        f"next: {where}python -m pytest tests (no broker needed), "
        f"then mayhem run --config {scaffold.CONFIG_FILE}"
    )
    return EXIT_OK


def _dead(config: Config, args: argparse.Namespace) -> int:
    from mayhem import dead  # noqa: PLC0415 -- keeps --help fast

    ids = None if getattr(args, "all", False) else set(getattr(args, "ids", None) or ())
    with asyncio.Runner(loop_factory=loop_factory(config.loop)) as runner:
        if args.action == "list":
            limit = _number(args.limit, "--limit", int, 0)
            report = runner.run(dead.dead_list(config, limit=limit))
            print(dead.format_letters(report, config.dead_queue))  # noqa: T201
            return EXIT_OK
        if args.action == "replay":
            report = runner.run(dead.dead_replay(config, ids=ids))
            verb = "replayed to " + config.queue
        else:
            report = runner.run(dead.dead_purge(config, ids=ids))
            verb = "purged"
    print(  # noqa: T201
        f"{report.done} of {report.matched} matching messages {verb} "
        f"({report.total} were in {config.dead_queue})"
    )
    missing = (ids or set()) and report.matched < len(ids or ())
    return EXIT_FATAL if missing or report.done < report.matched else EXIT_OK


def _number(text: str, flag: str, kind: type[N], low: N) -> N:
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{flag} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{flag} must be a finite number, got {text!r}")
    if value < low:
        raise ConfigError(f"{flag} must be at least {low}, got {text!r}")
    return value
