"""The command line as users meet it: bad input exits 2 with one line, broker trouble exits 1."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mayhem_testing import ROOT, SUPPORT

PASSWORD = "s3cret-Pa55"  # noqa: S105 -- a fake, to check it never shows


def _mayhem(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mayhem", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{SUPPORT}:{ROOT}"},
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--concurrency", "abc"], "concurrency must be an integer"),
        (["run", "--prefetch", "0"], "prefetch must be an integer"),
        (["run", "--drain-timeout", "-1"], "drain_timeout must be"),
        (["run", "--amqp-url", "http://example"], "amqp_url must be"),
        (["run", "--db-url", "mysql://x/y"], "db_url must be"),
        (["run", "--handler", "no_such_module_here:handle"], "cannot import"),
        (["run", "--handler", "sample_handlers:missing"], "has no attribute"),
        (["run", "--handler", "sample_handlers:not_callable"], "is not callable"),
        (["run", "--handler", "not a path"], "handler must be"),
        (["run", "--config", "/nonexistent/mayhem.toml"], "cannot read config file"),
        (["run", "--handler-timeout", "3600"], "handler_timeout"),
        (["run", "--bogus-flag"], "unrecognized arguments"),
        (["publish", "--count", "many"], "--count must be a number"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, needle):
    """Each bad flag or setting: exit 2, one line naming the problem (plus at most a hint)."""
    done = _mayhem(*args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, done.stderr
    assert needle in lines[0]
    assert "Traceback" not in done.stderr


def test_wrong_password_exits_1_without_the_password(tmp_path):
    """The broker refuses the credentials: exit 1, one line, the password never printed."""
    done = _mayhem(
        "run",
        "--amqp-url", f"amqp://guest:{PASSWORD}@127.0.0.1:5672/",
        "--db-url", f"sqlite:///{tmp_path}/x.db",
        "--metrics-addr", "off",
        "--log-level", "WARNING",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert PASSWORD not in done.stderr + done.stdout
    assert "refused the credentials" in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr


def test_unreachable_broker_exits_1_with_the_cause(tmp_path):
    """Nothing listens where the broker should be: exit 1 with one line saying so."""
    done = _mayhem(
        "run",
        "--amqp-url", f"amqp://guest:{PASSWORD}@127.0.0.1:1/",
        "--db-url", f"sqlite:///{tmp_path}/x.db",
        "--metrics-addr", "off",
        "--log-level", "WARNING",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "cannot connect to broker amqp://guest:***@127.0.0.1:1/" in last
    assert PASSWORD not in done.stderr
    assert "Traceback" not in done.stderr


def test_check_config_masks_secrets():
    """check-config prints the effective settings with passwords masked."""
    done = _mayhem(
        "check-config",
        "--amqp-url", f"amqp://guest:{PASSWORD}@127.0.0.1:5672/",
        "--db-url", f"postgresql://app:{PASSWORD}@127.0.0.1/test",
        "--concurrency", "7",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stdout
    assert 'amqp_url = "amqp://guest:***@127.0.0.1:5672/"' in done.stdout
    assert "concurrency = 7" in done.stdout
    assert "prefetch = 14" in done.stdout


def test_version():
    """--version prints the version."""
    done = _mayhem("--version")
    assert done.returncode == 0
    assert done.stdout.startswith("mayhem ")
