"""The configuration: one frozen class, built from defaults, a TOML file, the environment and flags.

Precedence, highest first: flags, ``MAYHEM_*`` environment variables, the TOML file, defaults.
Every value is converted and validated here; a bad one raises :class:`ConfigError` with one
line that names the setting and where the value came from.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import attrs

from mayhem import topology
from mayhem.amqp.url import UrlError, endpoints, join_hosts
from mayhem.exceptions import ConfigError
from mayhem.redact import mask_url
from mayhem.setting import (
    DAEMON,
    EVERY_COMMAND,
    Setting,
    gather,
    named,
    setting,
    settings_of,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

# RabbitMQ closes a channel whose delivery stays unacked past consumer_timeout (30 min by
# default); a handler must be cancelled well before that.
CONSUMER_TIMEOUT: Final = 1800.0
MAX_HANDLER_TIMEOUT: Final = CONSUMER_TIMEOUT / 2


def _parse_int(low: int, high: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool):
            raise TypeError
        number = int(value) if isinstance(value, int) else int(str(value).strip())
        if not low <= number <= high:
            raise ValueError
        return number

    parse.__doc__ = f"an integer from {low} to {high}"
    return parse


def _parse_float(low: float, high: float) -> Callable[[object], float]:
    def parse(value: object) -> float:
        if isinstance(value, bool):
            raise TypeError
        number = float(value) if isinstance(value, int | float) else float(str(value).strip())
        if not math.isfinite(number) or not low <= number <= high:
            raise ValueError
        return number

    parse.__doc__ = f"a number of seconds from {low:g} to {high:g}"
    return parse


def _parse_bool(value: object) -> bool:
    """true or false."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError


def _parse_choice(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError
        return text

    parse.__doc__ = "one of " + ", ".join(choices)
    return parse


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value.strip()


def _parse_name(value: object) -> str:
    """a non-empty AMQP name of at most 200 characters."""
    text = _text(value)
    if not text or len(text) > 200 or not text.isprintable():  # noqa: PLR2004
        raise ValueError
    return text


def _parse_optional(value: object) -> str | None:
    """a string, or empty for none."""
    text = _text(value)
    return text or None


def _parse_amqp_url(value: object) -> str:
    """an amqp:// or amqps:// URL (a cluster's: amqp://user:pass@host1:port1,host2:port2/)."""
    # A list names a cluster's nodes, a URL each (a repeated --amqp-url, a TOML array): joined
    # into one URL, which may then differ only in its host list.
    text = join_hosts([_text(v) for v in value]) if isinstance(value, list) else _text(value)
    # The one parser both broker connections use, on every node; UrlError says why.
    endpoints(text)
    return text


def _parse_db_url(value: object) -> str:
    """sqlite:///relative.db, sqlite:////absolute.db or postgresql://user@host/db."""
    text = _text(value)
    parts = urlsplit(text)
    if parts.scheme == "sqlite":
        if not parts.path.startswith("/") or len(parts.path) < 2 or parts.netloc:  # noqa: PLR2004
            raise ValueError
    elif parts.scheme in {"postgresql", "postgres"}:
        if not parts.hostname and not parts.path.strip("/"):
            raise ValueError
    else:
        raise ValueError
    return text


def _parse_addr(value: object) -> str | None:
    """HOST:PORT, or 'off' to disable the endpoint."""
    text = _text(value)
    if text.lower() in {"", "off", "none"}:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:  # noqa: PLR2004
        raise ValueError
    return text


def _parse_level(value: object) -> str:
    """one of DEBUG, INFO, WARNING, ERROR, CRITICAL."""
    text = str(value).strip().upper()
    if text not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError
    return text


def _parse_handler(value: object) -> str | None:
    """an import path of the form package.module:attribute."""
    text = _text(value)
    if not text:
        return None
    module, sep, attr = text.partition(":")
    if not sep or not module or not attr:
        raise ValueError
    if not all(part.isidentifier() for part in (*module.split("."), *attr.split("."))):
        raise ValueError
    return text


def _parse_delays(value: object) -> tuple[float, ...]:
    """a comma-separated list of seconds, each from 0 to 86400."""
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    parse = _parse_float(0.0, 86400.0)
    delays = tuple(parse(item) for item in items if str(item).strip())
    if not delays:
        raise ValueError
    return delays


def _default_log_format() -> str:
    return "text" if os.isatty(2) else "json"


@attrs.frozen(kw_only=True, field_transformer=named)
class Config:
    """The daemon's effective configuration. Build it with :meth:`Config.load`.

    Each field is a setting, declared once with :func:`~mayhem.setting.setting`: its TOML key,
    ``MAYHEM_*`` variable, flag, parser, help, masking and reloading all come from here.
    """

    amqp_url: str = setting(
        "amqp://guest:guest@localhost:5672/",
        parse=_parse_amqp_url,
        doc=(
            "broker URL; for a cluster, name every node: repeat the flag (a TOML array), a URL "
            "each, or amqp://user:pass@host1:port1,host2:port2/"
        ),
        commands=EVERY_COMMAND,
        secret=True,
        repeatable=True,
    )
    queue: str = setting("mayhem", parse=_parse_name, doc="work queue name", commands=EVERY_COMMAND)
    exchange: str = setting(
        "mayhem", parse=_parse_name, doc="exchange name", commands=EVERY_COMMAND
    )
    queue_type: str = setting(
        "quorum", parse=_parse_choice("quorum", "classic"), doc="quorum or classic", commands=DAEMON
    )
    declare: bool = setting(
        default=True, parse=_parse_bool, doc="declare the queues and exchange at start"
    )
    handler: str | None = setting(
        None,
        parse=_parse_handler,
        doc="handler as package.module:attribute",
        commands=DAEMON,
        default_text="the demo handler",
    )
    concurrency: int = setting(
        16,
        parse=_parse_int(1, 4096),
        doc="handlers running at once",
        commands=DAEMON,
        reloadable=True,
    )
    prefetch: int | None = setting(
        None,
        parse=_parse_int(1, 65535),
        doc="broker prefetch window",
        commands=DAEMON,
        default_text="2 x concurrency",
    )
    drain_timeout: float = setting(
        30.0,
        parse=_parse_float(0.0, 3600.0),
        doc="seconds to wait for handlers on shutdown",
        commands=DAEMON,
    )
    handler_timeout: float = setting(
        300.0,
        parse=_parse_float(0.001, 86400.0),
        doc="seconds before a handler is cancelled",
        commands=DAEMON,
    )
    max_attempts: int = setting(
        5,
        parse=_parse_int(1, 100),
        doc="attempts before a message is dead-lettered",
        commands=DAEMON,
    )
    retry_delays: tuple[float, ...] | None = setting(
        None,
        parse=_parse_delays,
        doc="comma-separated seconds between attempts",
        commands=DAEMON,
        default_text="1 s doubling up to 300 s, one per retry",
    )
    max_message_bytes: int = setting(
        1024 * 1024,
        parse=_parse_int(1, 128 * 1024 * 1024),
        doc="larger bodies are dead-lettered",
        commands=DAEMON,
    )
    missing_id: str = setting(
        "dead-letter",
        parse=_parse_choice("dead-letter", "content-hash"),
        doc="a message without a message_id: dead-letter, or content-hash (the body's hash)",
    )
    db_url: str = setting(
        "sqlite:///mayhem.db",
        parse=_parse_db_url,
        doc="sqlite:///file.db or postgresql://user@host/db",
        commands=DAEMON,
        secret=True,
    )
    inbox_retention: float = setting(
        7 * 86400.0,
        parse=_parse_float(0.0, 10 * 365 * 86400.0),
        doc="seconds an inbox row is kept",
    )
    metrics_addr: str | None = setting(
        "127.0.0.1:9464",
        parse=_parse_addr,
        doc="HOST:PORT for /metrics, /healthz, /readyz, or off",
        commands=DAEMON,
    )
    metrics_textfile: str | None = setting(
        None,
        parse=_parse_optional,
        doc="write final metrics here on shutdown",
        commands=DAEMON,
    )
    pushgateway: str | None = setting(
        None,
        parse=_parse_optional,
        doc="push final metrics to this Pushgateway on shutdown",
        commands=DAEMON,
        secret=True,
    )
    log_format: str = setting(
        attrs.Factory(_default_log_format),
        parse=_parse_choice("json", "text"),
        doc="json or text",
        commands=EVERY_COMMAND,
        default_text="text on a terminal, else json",
    )
    log_level: str = setting(
        "INFO",
        parse=_parse_level,
        doc="DEBUG, INFO, WARNING or ERROR",
        commands=EVERY_COMMAND,
        reloadable=True,
    )
    loop: str = setting(
        "uvloop",
        parse=_parse_choice("uvloop", "asyncio"),
        doc="uvloop or asyncio",
        commands=DAEMON | {"publish"},
    )
    demo: bool = setting(
        default=False, parse=_parse_bool, doc="also publish demo messages", commands={"run"}
    )
    demo_rate: float = setting(
        20.0, parse=_parse_float(0.001, 100000.0), doc="demo messages per second"
    )
    demo_max_delay: float = setting(
        0.5,
        parse=_parse_float(0.0, 3600.0),
        doc="the demo handler's longest simulated restart, in seconds",
    )

    @property
    def effective_prefetch(self) -> int:
        """The broker's prefetch window: by default twice the concurrency."""
        return self.prefetch if self.prefetch is not None else 2 * self.concurrency

    @property
    def effective_retry_delays(self) -> tuple[float, ...]:
        """The delay before each retry: by default 1 s doubling, capped at 5 minutes."""
        if self.retry_delays is not None:
            return self.retry_delays
        return tuple(min(2.0**i, 300.0) for i in range(max(self.max_attempts - 1, 1)))

    @property
    def dead_queue(self) -> str:
        """The dead-letter queue's name."""
        return topology.dead_queue(self.queue)

    def masked(self) -> dict[str, Any]:
        """The configuration as a dict, secrets masked: for display and logs."""
        shown = {key: show(SETTINGS[key], value) for key, value in attrs.asdict(self).items()}
        shown["prefetch"] = self.effective_prefetch
        shown["retry_delays"] = list(self.effective_retry_delays)
        return shown

    @classmethod
    def load(
        cls,
        *,
        file: str | None = None,
        flags: Mapping[str, object] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Config:
        """Build the configuration from its sources, highest first: flags, environment, file.

        Between the file and the environment come systemd credentials: a file in
        ``$CREDENTIALS_DIRECTORY`` (``LoadCredential=``) named like a secret setting
        (``amqp_url``, ``db_url``, ``pushgateway``), so secrets stay out of the unit and the
        process's environment.

        Args:
            file: a TOML file, or ``None``; ``MAYHEM_CONFIG`` names one when this is ``None``.
            flags: values given on the command line, by setting name; ``None`` values are
                ignored.
            environ: the environment; ``os.environ`` when ``None``.

        Raises:
            ConfigError: a value, the file or a combination of settings is invalid.
        """
        env = os.environ if environ is None else environ
        raw = gather(SETTINGS, file=file, flags=flags or {}, environ=env)
        values: dict[str, Any] = {}
        for key, (value, origin) in raw.items():
            each = SETTINGS[key]
            try:
                values[key] = each.parse(value)
            except (TypeError, ValueError, OverflowError) as exc:
                what = (each.parse.__doc__ or "valid").rstrip(".")
                why = f": {exc}" if isinstance(exc, UrlError) else ""  # never quotes the URL
                msg = f"{key} must be {what}, got {_shown(each, value)!r} ({origin}){why}"
                raise ConfigError(msg) from None
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        """Check the settings against each other.

        Raises:
            ConfigError: two settings contradict each other.
        """
        if self.effective_prefetch < self.concurrency:
            msg = (
                f"prefetch ({self.effective_prefetch}) must be at least concurrency "
                f"({self.concurrency}), or workers would sit idle"
            )
            raise ConfigError(msg)
        if self.handler_timeout > MAX_HANDLER_TIMEOUT:
            msg = (
                f"handler_timeout ({self.handler_timeout:g} s) must be at most "
                f"{MAX_HANDLER_TIMEOUT:g} s, well below RabbitMQ's {CONSUMER_TIMEOUT:g} s "
                "consumer_timeout"
            )
            raise ConfigError(msg)


SETTINGS: Final[Mapping[str, Setting]] = settings_of(Config)
SECRET_SETTINGS: Final = tuple(key for key, each in SETTINGS.items() if each.secret)


def show(each: Setting, value: object) -> object:
    """``value`` as it may be shown (printed, logged, in an error): a secret's password masked.

    The one rule for secrets: a setting declared ``secret=True`` is shown through
    :func:`mask_url`, everywhere.
    """
    if each.secret and isinstance(value, str):
        return mask_url(value)
    if each.secret and isinstance(value, list | tuple):
        return [show(each, item) for item in value]
    return value


def _shown(each: Setting, value: object) -> str:
    """A raw value in an error message: a repeated setting's values joined, secrets masked."""
    if isinstance(value, list | tuple):
        return ", ".join(str(show(each, str(item))) for item in value)
    return str(show(each, str(value)))


def reloadable_settings() -> frozenset[str]:
    """The settings that SIGHUP applies without a restart (declared ``reloadable=True``)."""
    return frozenset(key for key, each in SETTINGS.items() if each.reloadable)
