"""One setting, declared once: a field of the configuration class and what is derived from it.

A setting is an attrs field made with :func:`setting`. Its name is the TOML key; the
``MAYHEM_*`` variable and the ``--flag`` are spelled from the name; its metadata holds a
:class:`Setting` with the parser, the help text, the commands that offer the flag, and whether
the value is a secret (masked wherever it is shown, readable from a systemd credential) or is
applied by SIGHUP without a restart. Everything else (the command line, ``--help``, masking,
the credentials, the reload set) reads these declarations instead of keeping its own list.

:func:`gather` collects each setting's raw value from its highest source (the TOML file,
systemd credentials, ``MAYHEM_*`` variables, flags); the configuration class parses them.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs

from mayhem.exceptions import ConfigError

T = TypeVar("T")

ENV_PREFIX: Final = "MAYHEM_"
# The key of a field's metadata that holds its Setting.
METADATA: Final = "mayhem.setting"
_DECLARED: Final = "mayhem.declared"

# The commands that can take a setting as a flag.
EVERY_COMMAND: Final = frozenset({"run", "check-config", "publish", "dead"})
DAEMON: Final = frozenset({"run", "check-config"})


@attrs.frozen(kw_only=True)
class Setting:
    """How one setting is read, offered on the command line, shown and changed.

    Attributes:
        name: the field's name, which is also the setting's TOML key.
        parse: turns a raw value (a string, or a TOML value) into the setting's type; raises
            ``TypeError`` or ``ValueError`` on a bad one. Its docstring completes the error
            message "<name> must be ...".
        doc: what the setting does, for ``--help``.
        default: the default value (``None`` when it is computed; ``default_text`` says how).
        default_text: the default in words, when the value alone does not say it.
        commands: the commands that offer the setting as a flag.
        secret: the value may hold a password: it is masked wherever it is shown and can come
            from a systemd credential of the setting's name.
        reloadable: SIGHUP applies a new value without a restart.
        repeatable: the flag may be given several times (a TOML array in the file); ``parse``
            then gets the list of values.
    """

    name: str
    parse: Callable[[object], Any]
    doc: str
    default: object
    default_text: str | None
    commands: frozenset[str]
    secret: bool
    reloadable: bool
    repeatable: bool

    @property
    def env(self) -> str:
        """The environment variable: ``MAYHEM_`` and the name in capitals."""
        return f"{ENV_PREFIX}{self.name.upper()}"

    @property
    def flag(self) -> str:
        """The command-line flag: the name with dashes."""
        return f"--{self.name.replace('_', '-')}"

    @property
    def switch(self) -> bool:
        """The flag takes no value: it turns on a setting that is off by default."""
        return self.default is False


def setting(
    default: T,
    *,
    parse: Callable[[object], Any],
    doc: str,
    commands: Iterable[str] = (),
    default_text: str | None = None,
    secret: bool = False,
    reloadable: bool = False,
    repeatable: bool = False,
) -> T:
    """Declare a setting: an attrs field of a class decorated with ``field_transformer=named``.

    Args:
        default: the default value, or ``attrs.Factory(...)`` (then give ``default_text``).
        parse: see :attr:`Setting.parse`.
        doc: see :attr:`Setting.doc`.
        commands: see :attr:`Setting.commands`; none means the setting has no flag.
        default_text: see :attr:`Setting.default_text`.
        secret: see :attr:`Setting.secret`.
        reloadable: see :attr:`Setting.reloadable`.
        repeatable: see :attr:`Setting.repeatable`.
    """
    declared = {
        "parse": parse,
        "doc": doc,
        "default_text": default_text,
        "commands": frozenset(commands),
        "secret": secret,
        "reloadable": reloadable,
        "repeatable": repeatable,
    }
    return attrs.field(default=default, metadata={_DECLARED: declared})


def named(_cls: type, fields: list[attrs.Attribute[Any]]) -> list[attrs.Attribute[Any]]:
    """Complete each field's :class:`Setting` with the field's name and default.

    The ``field_transformer`` of the configuration class: a declaration does not know its own
    name, so the Setting is built here, once the class is.
    """
    complete = []
    for field in fields:
        declared = field.metadata.get(_DECLARED)
        if declared is None:
            msg = f"field {field.name} is not declared with setting()"
            raise TypeError(msg)
        computed = isinstance(field.default, attrs.Factory)  # type: ignore[arg-type]
        if computed and declared["default_text"] is None:
            msg = f"setting {field.name}: a computed default needs default_text"
            raise TypeError(msg)
        default = None if computed else field.default
        done = Setting(name=field.name, default=default, **declared)
        complete.append(field.evolve(metadata={METADATA: done}))
    return complete


def settings_of(cls: type) -> dict[str, Setting]:
    """The settings of a class declared with :func:`setting`, by name, in declaration order."""
    return {field.name: field.metadata[METADATA] for field in attrs.fields(cls)}


def gather(
    settings: Mapping[str, Setting],
    *,
    file: str | None,
    flags: Mapping[str, object],
    environ: Mapping[str, str],
) -> dict[str, tuple[object, str]]:
    """Each setting's raw value from its highest source, with where it came from.

    The sources, lowest first: the TOML file (``file``, else the one ``MAYHEM_CONFIG`` names),
    systemd credentials of the secret settings, ``MAYHEM_*`` variables, then ``flags`` (by
    setting name; ``None`` values are ignored). A setting no source gives is left out.

    Raises:
        ConfigError: the file or a credential cannot be read, or the file is not valid.
    """
    raw: dict[str, tuple[object, str]] = {}
    path = file if file is not None else environ.get(f"{ENV_PREFIX}CONFIG")
    if path:
        for key, value in _read_toml(path, settings).items():
            raw[key] = (value, f"in {path}")
    secrets = [key for key, each in settings.items() if each.secret]
    for key, value in _read_credentials(environ.get("CREDENTIALS_DIRECTORY"), secrets).items():
        raw[key] = (value, f"from credential {key}")
    for each in settings.values():
        if each.env in environ:
            raw[each.name] = (environ[each.env], f"from {each.env}")
    for key, value in flags.items():
        if value is not None:
            raw[key] = (value, f"from {settings[key].flag}")
    return raw


def _read_credentials(directory: str | None, secrets: Iterable[str]) -> dict[str, str]:
    if not directory:
        return {}
    found = {}
    for key in secrets:
        path = Path(directory) / key
        try:
            found[key] = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read credential {path}: {exc}") from None
    return found


def _read_toml(path: str, settings: Mapping[str, Setting]) -> dict[str, object]:
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
    unknown = sorted(set(section) - set(settings))
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting {unknown[0]!r}")
    return section
