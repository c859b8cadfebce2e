"""Secrets out of URLs, exception text and log lines (mayhem.redact)."""

from __future__ import annotations

import io
import json
import logging

import pytest

from mayhem.logs import JSONFormatter, TextFormatter
from mayhem.redact import install, mask_url, redact, url_secrets


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u@h/db?password=s3cret", "postgresql://u@h/db?password=***"),
        (
            "postgresql://u@h/db?sslmode=require&password=s3cret&application_name=x",
            "postgresql://u@h/db?sslmode=require&password=***&application_name=x",
        ),
        ("postgresql://u@h/db?PASSWORD=s3cret", "postgresql://u@h/db?PASSWORD=***"),
        (
            "postgresql://u@h/db?sslpassword=key-pass&sslkey=/k.pem",
            "postgresql://u@h/db?sslpassword=***&sslkey=/k.pem",
        ),
        # A query password with an '@' must not be read as the end of the user information.
        ("postgresql://u@h/db?password=a@b", "postgresql://u@h/db?password=***"),
        ("postgresql://u:pw1@h/db?password=pw2", "postgresql://u:***@h/db?password=***"),
        (
            "postgresql:///db?host=/run/pg&password=s3cret",
            "postgresql:///db?host=/run/pg&password=***",
        ),
        ("http://user:pw@host/", "http://user:***@host/"),
    ],
)
def test_mask_url_masks_passwords_in_the_query_too(url, expected):
    assert mask_url(url) == expected


@pytest.mark.parametrize(
    "url",
    ["postgresql://u@h/db?passfile=/etc/pgpass", "postgresql://u@h/db?sslmode=require", "x"],
)
def test_mask_url_leaves_non_secret_options(url):
    """The passfile option names a file: the file is the secret, not its name."""
    assert mask_url(url) == url


@pytest.mark.parametrize(
    ("url", "secrets"),
    [
        ("amqp://u:s3cret@h/", {"s3cret"}),
        ("postgresql://u@h/db?password=p%40ss%2Bw", {"p%40ss%2Bw", "p@ss+w"}),
        ("postgresql://u:a+b@h/db?password=s3cret", {"a+b", "a b", "s3cret"}),
        ("http://user:pw@host/", {"pw"}),
        ("user:pw@host:9091", {"pw"}),
        ("amqp://guest:guest@localhost/", set()),  # the user name is shown anyway
        ("amqp://h/", set()),
        (None, set()),
    ],
)
def test_url_secrets(url, secrets):
    assert url_secrets(url) == secrets


def test_redact_finds_the_secret_as_written_quoted_and_json_escaped():
    secret = 'pa"ss\\word'  # noqa: S105 -- a made-up password to find
    text = f"plain {secret} repr {secret!r} json {json.dumps(secret)}"
    masked = redact(text, {secret})
    assert "pa" not in masked.replace("plain", "")
    assert masked.count("***") == 3


def test_redact_leaves_short_secrets_alone():
    """A 3-character secret would mask every occurrence of a common syllable."""
    assert redact("the cat sat", {"cat"}) == "the cat sat"


@pytest.mark.parametrize("formatter", [JSONFormatter(), TextFormatter()])
def test_installed_redaction_masks_messages_and_tracebacks(formatter):
    """The safety net: a secret in a library's exception text never reaches the log stream."""
    stream = io.StringIO()
    logger = logging.getLogger("test_redact.isolated")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    try:
        install(url_secrets("http://pusher:s3cret-pw@127.0.0.1/"), logger)
        install(url_secrets("http://pusher:s3cret-pw@127.0.0.1/"), logger)  # idempotent
        try:
            raise ValueError("nonnumeric port: 's3cret-pw@127.0.0.1'")
        except ValueError:
            logger.exception("shutdown step failed with s3cret-pw")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "s3cret-pw" not in text
    assert "nonnumeric port: '***@127.0.0.1'" in text
    assert "shutdown step failed with ***" in text
