"""The configuration: one frozen class, built from defaults, a TOML file, the environment and flags.

Precedence, highest first: flags, ``MAYHEM_*`` environment variables, the TOML file, defaults.
Every value is converted and validated here; a bad one raises :class:`ConfigError` with one
line that names the setting and where the value came from.
"""

from __future__ import annotations

import math
import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import attrs

from mayhem.amqp.url import join_hosts, split_hosts
from mayhem.exceptions import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

ENV_PREFIX: Final = "MAYHEM_"
# RabbitMQ closes a channel whose delivery stays unacked past consumer_timeout (30 min by
# default); a handler must be cancelled well before that.
CONSUMER_TIMEOUT: Final = 1800.0
MAX_HANDLER_TIMEOUT: Final = CONSUMER_TIMEOUT / 2
SECRET_MASK: Final = "***"  # noqa: S105 -- the mask, not a password


def mask_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***``.

    Works on the raw text, not on a parse: a password with an unencoded ``#``, ``/`` or ``?``
    confuses URL parsers, and masking too much is safe.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    if not colon:
        return url
    return f"{scheme}{sep}{user}:{SECRET_MASK}@{host}"


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
    """an amqp:// or amqps:// URL, for a cluster amqp://user:pass@host1:port1,host2:port2/."""
    # A list: the nodes of a cluster, one URL each (a repeated --amqp-url, a TOML array).
    text = join_hosts([_text(v) for v in value]) if isinstance(value, list) else _text(value)
    for url in split_hosts(text):  # raises ValueError on an empty host in the list
        parts = urlsplit(url)
        if parts.scheme not in {"amqp", "amqps"} or not parts.hostname:
            raise ValueError
        _ = parts.port  # raises ValueError on a port that is not a number
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


@attrs.frozen(kw_only=True)
class Config:
    """The daemon's effective configuration. Build it with :meth:`Config.load`."""

    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    queue: str = "mayhem"
    exchange: str = "mayhem"
    queue_type: str = "quorum"
    declare: bool = True
    handler: str | None = None
    concurrency: int = 16
    prefetch: int | None = None
    drain_timeout: float = 30.0
    handler_timeout: float = 300.0
    max_attempts: int = 5
    retry_delays: tuple[float, ...] | None = None
    max_message_bytes: int = 1024 * 1024
    missing_id: str = "dead-letter"
    db_url: str = "sqlite:///mayhem.db"
    inbox_retention: float = 7 * 86400.0
    metrics_addr: str | None = "127.0.0.1:9464"
    metrics_textfile: str | None = None
    pushgateway: str | None = None
    log_format: str = attrs.field(factory=_default_log_format)
    log_level: str = "INFO"
    loop: str = "uvloop"
    demo: bool = False
    demo_rate: float = 20.0
    demo_max_delay: float = 0.5

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
        return f"{self.queue}.dead"

    def masked(self) -> dict[str, Any]:
        """The configuration as a dict, passwords masked: for display and logs."""
        shown = attrs.asdict(self)
        shown["amqp_url"] = mask_url(self.amqp_url)
        shown["db_url"] = mask_url(self.db_url)
        if self.pushgateway is not None:
            shown["pushgateway"] = mask_url(self.pushgateway)
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

        Between the file and the environment come systemd credentials: files named
        ``amqp_url``, ``db_url`` or ``pushgateway`` in ``$CREDENTIALS_DIRECTORY``
        (``LoadCredential=``), so secrets stay out of the unit and the process's environment.

        Args:
            file: a TOML file, or ``None``; ``MAYHEM_CONFIG`` names one when this is ``None``.
            flags: values given on the command line, by setting name; ``None`` values are
                ignored.
            environ: the environment; ``os.environ`` when ``None``.

        Raises:
            ConfigError: a value, the file or a combination of settings is invalid.
        """
        env = os.environ if environ is None else environ
        raw: dict[str, tuple[object, str]] = {}
        path = file if file is not None else env.get(f"{ENV_PREFIX}CONFIG")
        if path:
            for key, value in _read_toml(path).items():
                raw[key] = (value, f"in {path}")
        for key, value in _read_credentials(env.get("CREDENTIALS_DIRECTORY")).items():
            raw[key] = (value, f"from credential {key}")
        for key in _FIELDS:
            name = f"{ENV_PREFIX}{key.upper()}"
            if name in env:
                raw[key] = (env[name], f"from {name}")
        for key, value in (flags or {}).items():
            if value is not None:
                raw[key] = (value, f"from --{key.replace('_', '-')}")
        values: dict[str, Any] = {}
        for key, (value, origin) in raw.items():
            parse = _PARSERS[key]
            try:
                values[key] = parse(value)
            except (TypeError, ValueError, OverflowError):
                shown = (
                    ", ".join(mask_url(str(v)) for v in value)
                    if isinstance(value, list)
                    else mask_url(str(value))
                    if key.endswith("url")
                    else str(value)
                )
                what = (parse.__doc__ or "valid").rstrip(".")
                msg = f"{key} must be {what}, got {shown!r} ({origin})"
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


_FIELDS: Final = tuple(field.name for field in attrs.fields(Config))

_PARSERS: Final[dict[str, Callable[[object], Any]]] = {
    "amqp_url": _parse_amqp_url,
    "queue": _parse_name,
    "exchange": _parse_name,
    "queue_type": _parse_choice("quorum", "classic"),
    "declare": _parse_bool,
    "handler": _parse_handler,
    "concurrency": _parse_int(1, 4096),
    "prefetch": _parse_int(1, 65535),
    "drain_timeout": _parse_float(0.0, 3600.0),
    "handler_timeout": _parse_float(0.001, 86400.0),
    "max_attempts": _parse_int(1, 100),
    "retry_delays": _parse_delays,
    "max_message_bytes": _parse_int(1, 128 * 1024 * 1024),
    "missing_id": _parse_choice("dead-letter", "content-hash"),
    "db_url": _parse_db_url,
    "inbox_retention": _parse_float(0.0, 10 * 365 * 86400.0),
    "metrics_addr": _parse_addr,
    "metrics_textfile": _parse_optional,
    "pushgateway": _parse_optional,
    "log_format": _parse_choice("json", "text"),
    "log_level": _parse_level,
    "loop": _parse_choice("uvloop", "asyncio"),
    "demo": _parse_bool,
    "demo_rate": _parse_float(0.001, 100000.0),
    "demo_max_delay": _parse_float(0.0, 3600.0),
}
assert set(_PARSERS) == set(_FIELDS), "every setting needs a parser"  # noqa: S101


SECRET_SETTINGS: Final = ("amqp_url", "db_url", "pushgateway")


def _read_credentials(directory: str | None) -> dict[str, str]:
    if not directory:
        return {}
    found = {}
    for key in SECRET_SETTINGS:
        path = Path(directory) / key
        try:
            found[key] = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read credential {path}: {exc}") from None
    return found


def _read_toml(path: str) -> dict[str, object]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    section = data.get("mayhem", data)
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: [mayhem] must be a table")
    if section is not data and len(data) > 1:
        outside = min(key for key in data if key != "mayhem")
        raise ConfigError(f"config file {path}: setting {outside!r} is outside the [mayhem] table")
    unknown = sorted(set(section) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting {unknown[0]!r}")
    return section
