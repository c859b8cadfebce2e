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
import threading
import time
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeVar

from mayhem import logs
from mayhem._version import __version__
from mayhem.config import Config, mask_url
from mayhem.exceptions import ConfigError, StartupError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)
N = TypeVar("N", int, float)

EXIT_OK: Final = 0
EXIT_FATAL: Final = 1
EXIT_USAGE: Final = 2
THREAD_GRACE: Final = 0.5


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line plus one hint line, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\nTry '{self.prog} --help'.\n")


# (flag, setting, help); every value is a string here, converted and checked by Config.
_CONNECTION_FLAGS: Final = (
    (
        "--amqp-url",
        "amqp_url",
        (
            "broker URL (default amqp://guest:guest@localhost:5672/); a cluster: repeat it, "
            "one per node, or amqp://user:pass@host1:port1,host2:port2/"
        ),
    ),
    ("--queue", "queue", "work queue name (default mayhem)"),
    ("--exchange", "exchange", "exchange name (default mayhem)"),
)
_RUN_FLAGS: Final = (
    ("--handler", "handler", "handler as package.module:attribute (default: the demo handler)"),
    ("--concurrency", "concurrency", "handlers running at once (default 16)"),
    ("--prefetch", "prefetch", "broker prefetch window (default 2 x concurrency)"),
    ("--db-url", "db_url", "sqlite:///file.db or postgresql://user@host/db"),
    ("--metrics-addr", "metrics_addr", "HOST:PORT for /metrics, /healthz, /readyz, or off"),
    ("--drain-timeout", "drain_timeout", "seconds to wait for handlers on shutdown (default 30)"),
    ("--max-attempts", "max_attempts", "attempts before a message is dead-lettered (default 5)"),
    ("--retry-delays", "retry_delays", "comma-separated seconds between attempts"),
    ("--handler-timeout", "handler_timeout", "seconds before a handler is cancelled"),
    ("--max-message-bytes", "max_message_bytes", "larger bodies are dead-lettered"),
    ("--queue-type", "queue_type", "quorum or classic (default quorum)"),
    ("--metrics-textfile", "metrics_textfile", "write final metrics here on shutdown"),
    ("--pushgateway", "pushgateway", "push final metrics to this Pushgateway on shutdown"),
    ("--loop", "loop", "uvloop or asyncio (default uvloop)"),
    ("--log-format", "log_format", "json or text (default: text on a terminal)"),
    ("--log-level", "log_level", "DEBUG, INFO, WARNING or ERROR (default INFO)"),
)


def _add_flags(parser: argparse.ArgumentParser, flags: Sequence[tuple[str, str, str]]) -> None:
    for flag, dest, text in flags:
        # Repeated, the broker URL names the nodes of a cluster (Config joins them).
        action = "append" if dest == "amqp_url" else "store"
        parser.add_argument(
            flag, dest=dest, default=None, metavar=dest.upper(), help=text, action=action
        )


def build_parser() -> argparse.ArgumentParser:
    """The ``mayhem`` argument parser."""
    parser = _Parser(prog="mayhem", description="A RabbitMQ consumer daemon that loses nothing.")
    parser.add_argument("--version", action="version", version=f"mayhem {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", help="TOML configuration file")
    _add_flags(run, _CONNECTION_FLAGS + _RUN_FLAGS)
    run.add_argument("--demo", action="store_true", default=None, help="also publish demo messages")

    publish = commands.add_parser("publish", help="publish messages with publisher confirms")
    publish.add_argument("--config", help="TOML configuration file")
    _add_flags(publish, _CONNECTION_FLAGS)
    _add_flags(publish, [f for f in _RUN_FLAGS if f[1] in {"log_format", "log_level", "loop"}])
    publish.add_argument("--count", default="10", help="demo messages to publish (default 10)")
    publish.add_argument("--rate", default=None, help="messages per second (default: no limit)")
    publish.add_argument(
        "--file", default=None, help="publish one message per line of a JSONL file"
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
    for action in (listing, *actions.choices.values()):
        if not any(a.dest == "amqp_url" for a in action._actions):  # noqa: SLF001
            action.add_argument("--config", help="TOML configuration file")
            _add_flags(action, _CONNECTION_FLAGS)
            _add_flags(action, [f for f in _RUN_FLAGS if f[1] in {"log_format", "log_level"}])

    check = commands.add_parser("check-config", help="validate and print the configuration")
    check.add_argument("--config", help="TOML configuration file")
    _add_flags(check, _CONNECTION_FLAGS + _RUN_FLAGS)
    return parser


_NOT_SETTINGS: Final = frozenset(
    {"command", "config", "count", "rate", "file", "action", "limit", "ids", "all"}
)


def _flags(args: argparse.Namespace) -> dict[str, object]:
    return {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS and v is not None}


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop to run on: uvloop unless asked for plain asyncio."""
    if name == "uvloop":
        import uvloop  # noqa: PLC0415 -- only imported when chosen

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    if argv is None:
        _mask_process_title()
    args = build_parser().parse_args(argv)
    try:
        config = Config.load(file=args.config, flags=_flags(args))
        if args.command == "check-config":
            return _check_config(config)
        logs.setup(config.log_format, config.log_level)
        if args.command == "publish":
            return _publish(config, args)
        if args.command == "dead":
            return _dead(config, args)
        return _run(config, args)
    except ConfigError as exc:
        print(f"mayhem: configuration error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    except StartupError as exc:
        print(f"mayhem: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_FATAL


def _mask_process_title() -> None:
    """Rewrite the process title (``ps``, ``/proc/PID/cmdline``) with passwords masked."""
    import setproctitle  # noqa: PLC0415 -- only for the real command line

    words = [mask_url(word) if "@" in word else word for word in sys.argv]
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
    try:
        code = run_daemon(daemon, loop_factory(config.loop))
    except (ConfigError, StartupError):
        raise
    except Exception:
        log.exception("fatal error")
        code = EXIT_FATAL
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
        log.warning("exiting with %d handler threads still running: %s", len(stuck), stuck)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _publish(config: Config, args: argparse.Namespace) -> int:
    from mayhem.publisher import publish  # noqa: PLC0415 -- keeps --help fast

    count = _number(args.count, "--count", int, 0)
    rate = _number(args.rate, "--rate", float, 0.001) if args.rate is not None else None
    with asyncio.Runner(loop_factory=loop_factory(config.loop)) as runner:
        report = runner.run(publish(config, count=count, rate=rate, file=args.file))
    print(report.summary())  # noqa: T201
    return EXIT_OK if report.failed == 0 else EXIT_FATAL


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
