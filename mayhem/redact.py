"""Secrets out of what mayhem shows: URLs, exception text and log lines.

Two layers. :func:`mask_url` masks a URL wherever mayhem itself formats one (logs,
``check-config``, the process title, error messages). :func:`install` is the safety net for
text mayhem does not format itself, such as a library's exception message or a traceback: every
log line is searched for the configured secrets before it is written.
"""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote, unquote_plus

if TYPE_CHECKING:
    from collections.abc import Iterable

SECRET_MASK: Final = "***"  # noqa: S105 -- the mask, not a password
# Query options whose value is a secret: libpq's password and sslpassword (the passphrase of
# the client key), and anything else named like a password or a token. passfile and sslkey
# name files, not secrets. Masking an option that is not secret is harmless.
_SECRET_OPTION: Final = re.compile(
    r"(?i)(?P<key>[?&;][^=&;#?]*(?:password|passwd|pwd|secret|token)=)(?P<value>[^&;#]*)"
)
# A secret shorter than this is not searched for in log lines: it would mask every occurrence
# of a common short word. mask_url masks such secrets in URLs all the same.
MIN_SECRET_LENGTH: Final = 4


def mask_url(url: str) -> str:
    """Return ``url`` with its password and secret query options replaced by ``***``.

    The password is the one in the user information (``user:password@host``); secret query
    options are ``password``, ``sslpassword`` and others named like a password, secret or
    token (``postgresql://u@h/db?password=...``).

    Works on the raw text, not on a parse: a password with an unencoded ``#``, ``/``, ``?``
    or ``@`` confuses URL parsers, and masking too much is safe.
    """
    url = _SECRET_OPTION.sub(lambda m: m["key"] + SECRET_MASK, url)
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


def url_secrets(url: str | None) -> set[str]:
    """The secrets in ``url``: its password and secret query options, as written and decoded.

    Returns an empty set for ``None`` or a URL without secrets. A password equal to the user
    name (``guest:guest``) is left out: the user name is shown, so masking it would hide
    nothing and mask every mention of the user.
    """
    if not url:
        return set()
    found = {m["value"] for m in _SECRET_OPTION.finditer(url)}
    # The same rule as mask_url: the password runs from the first ':' after the scheme to
    # the last '@'.
    rest = url.partition("://")[2] or url
    userinfo, at, _ = _SECRET_OPTION.sub("", rest).rpartition("@")
    user, colon, password = userinfo.partition(":")
    if at and colon:
        found.add(password)
    decoded = {unquote(s) for s in found} | {unquote_plus(s) for s in found}
    public = {user, unquote(user)} if at else set()
    return {s for s in found | decoded if s and s not in public}


def redact(text: str, secrets: Iterable[str]) -> str:
    """Return ``text`` with every occurrence of each secret replaced by ``***``.

    Besides the secret as it is, its forms inside ``repr()`` and JSON strings are found too,
    as exception messages and JSON log lines quote them. Secrets shorter than
    :data:`MIN_SECRET_LENGTH` are left alone.
    """
    for secret in _forms(secrets):
        text = text.replace(secret, SECRET_MASK)
    return text


def _forms(secrets: Iterable[str]) -> list[str]:
    forms = set()
    for secret in secrets:
        if len(secret) >= MIN_SECRET_LENGTH:
            forms |= {secret, repr(secret)[1:-1], json.dumps(secret)[1:-1]}
    # Longest first, so that a secret that contains another is masked whole.
    return sorted(forms, key=len, reverse=True)


class RedactingFormatter(logging.Formatter):
    """Wraps a formatter and masks the secrets in everything it writes, tracebacks included.

    Args:
        inner: the formatter that renders the record.
        secrets: the strings to mask.
    """

    def __init__(self, inner: logging.Formatter, secrets: Iterable[str]) -> None:
        super().__init__()
        self.inner = inner
        self._forms = _forms(secrets)

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` with the inner formatter, then mask the secrets."""
        text = self.inner.format(record)
        for secret in self._forms:
            text = text.replace(secret, SECRET_MASK)
        return text


def install(secrets: Iterable[str], logger: logging.Logger | None = None) -> None:
    """Mask ``secrets`` in every line the handlers of ``logger`` (the root logger) write.

    Call it after the handlers are set up; calling it again replaces the secrets.
    """
    wanted = set(secrets)
    for handler in (logger or logging.getLogger()).handlers:
        inner = handler.formatter or logging.Formatter()
        if isinstance(inner, RedactingFormatter):
            inner = inner.inner
        handler.setFormatter(RedactingFormatter(inner, wanted) if wanted else inner)
