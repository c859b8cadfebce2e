"""The shipped systemd units, the example configuration and deploy/install.sh, checked offline.

``systemd-analyze verify`` checks that every ``Exec*=`` binary exists and that the default
dependencies (sysinit.target, ...) resolve. This machine has neither /opt/mayhem nor a running
systemd, so the units are verified with ``--root=`` a directory tree that holds a copy of this
machine's unit directory (/usr/lib/systemd/system), the units under test in
/etc/systemd/system, and stub executables at the paths the units run:
/opt/mayhem/venv/bin/mayhem and /bin/kill. The unit files themselves are not altered.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import attrs
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from mayhem.cli import EXIT_USAGE
from mayhem.config import SECRET_SETTINGS, Config
from mayhem.exceptions import ConfigError
from mayhem.health import MAX_HTTP_CONNECTIONS

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
EXAMPLE = UNITS / "mayhem.toml.example"
INSTALL = ROOT / "deploy" / "install.sh"
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"
EXPOSURE = re.compile(r"Overall exposure level for (\S+): (\d+\.\d)")
# Each unit, by the name systemd would load it under (the template as one instance).
MAX_CONCURRENCY = 4096  # the highest concurrency the configuration accepts
UNIT_NAMES = {"mayhem.service": "mayhem.service", "mayhem@.service": "mayhem@a.service"}


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is missing: deploy/local-services.sh --with-systemd-analyze")
    return found


def _analyze(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, "--no-pager", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_LOG_COLOR": "0"},
    )


def _make_root(root: Path) -> Path:
    """A directory tree in which systemd-analyze --root= finds everything the units refer to."""
    candidates = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
    system = next(path for path in candidates if path.is_dir())
    shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
    for stub in ("opt/mayhem/venv/bin/mayhem", "bin/kill"):
        path = root / stub
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    return root


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory: pytest.TempPathFactory, systemd_analyze: str) -> Path:
    """The --root tree with the shipped units copied, unchanged, into /etc/systemd/system."""
    root = _make_root(tmp_path_factory.mktemp("root"))
    for unit in UNIT_NAMES:
        shutil.copy(UNITS / unit, root / "etc/systemd/system" / unit)
    return root


def _unit(name: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for each setting of a shipped unit file, in order."""
    settings, section = [], ""
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.append((section, key.strip(), value.strip()))
    return settings


def _values(name: str, key: str) -> list[str]:
    return [value for _, k, value in _unit(name) if k == key]


def _one(name: str, key: str) -> str:
    values = _values(name, key)
    assert len(values) == 1, f"{name}: {key}= set {len(values)} times"
    return values[0]


def _seconds(span: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", span)
    assert match, f"not a simple time span: {span}"
    return int(match[1]) * (60 if match[2] == "min" else 1)


@pytest.mark.parametrize("unit", UNIT_NAMES)
def test_verify_is_clean(unit, unit_root, systemd_analyze):
    """systemd-analyze verify accepts the unit without a single warning."""
    done = _analyze(systemd_analyze, "verify", f"--root={unit_root}", UNIT_NAMES[unit])
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_verify_reports_a_broken_unit(unit_root, systemd_analyze):
    """The harness can fail: an unknown key and a missing binary are reported."""
    broken = (UNITS / "mayhem.service").read_text()
    broken = broken.replace("Type=notify", "Typo=notify").replace("/bin/kill", "/bin/nokill")
    (unit_root / "etc/systemd/system/mayhem-broken.service").write_text(broken)
    done = _analyze(systemd_analyze, "verify", f"--root={unit_root}", "mayhem-broken.service")
    output = done.stdout + done.stderr
    assert "Unknown key" in output
    assert "Typo" in output
    assert "/bin/nokill" in output


@pytest.mark.parametrize("unit", UNIT_NAMES)
def test_security_exposure_at_most_1_0(unit, unit_root, systemd_analyze):
    """systemd-analyze security --offline=yes rates the unit 1.0 or lower (0.9 today).

    Rated inside the --root tree, so drop-ins on this machine cannot change the result.
    --threshold= is in tenths (0-100): 10 means an exposure of 1.0. The command must pass at
    the unit's own score and fail one tenth below it, which pins that reading down.
    """

    def rate(*args: str) -> subprocess.CompletedProcess[str]:
        root = f"--root={unit_root}"
        return _analyze(systemd_analyze, "security", "--offline=yes", root, *args, UNIT_NAMES[unit])

    done = rate("--threshold=10")
    assert done.returncode == 0, done.stdout + done.stderr
    match = EXPOSURE.search(done.stdout)
    assert match, done.stdout
    assert match[1] == UNIT_NAMES[unit]
    score = float(match[2])
    assert score <= 1.0
    tenths = round(score * 10)
    assert rate(f"--threshold={tenths - 1}").returncode != 0
    assert rate(f"--threshold={tenths}").returncode == 0


@pytest.mark.parametrize("unit", UNIT_NAMES)
def test_unit_runs_mayhem_as_the_daemon_expects(unit):
    """Notify, watchdog, restart, stop, secret and file settings agree with what mayhem does.

    Type=notify with a watchdog; on-failure restarts except for exit 2 (a configuration
    error); one SIGTERM to the main process and a stop timeout above drain_timeout; the
    relative default database inside the state directory; secrets as credentials that mayhem
    reads from $CREDENTIALS_DIRECTORY; open files for the largest database pool and the
    metrics endpoint.
    """
    assert _one(unit, "Type") == "notify"
    assert _one(unit, "NotifyAccess") == "main"
    assert _seconds(_one(unit, "WatchdogSec")) >= 10
    assert _one(unit, "Restart") == "on-failure"
    assert str(EXIT_USAGE) in _one(unit, "RestartPreventExitStatus").split()
    assert _one(unit, "KillSignal") == "SIGTERM"
    assert _one(unit, "KillMode") == "mixed"
    assert _seconds(_one(unit, "TimeoutStopSec")) >= Config().drain_timeout + 10
    assert _one(unit, "ExecReload") == "/bin/kill -HUP $MAINPID"

    command = _one(unit, "ExecStart").split()
    assert command[:3] == ["/opt/mayhem/venv/bin/mayhem", "run", "--config"]
    assert command[3].startswith("/etc/mayhem/")
    assert command[4:] == ["--log-format", "json"]

    assert _one(unit, "DynamicUser") == "yes"
    state = _one(unit, "StateDirectory")
    assert _one(unit, "WorkingDirectory") == f"%S/{state}"
    assert Config().db_url == "sqlite:///mayhem.db", "the default database is relative"
    credentials = dict(value.split(":", 1) for value in _values(unit, "LoadCredential"))
    assert set(credentials) == {"amqp_url", "db_url"}
    assert set(credentials) <= set(SECRET_SETTINGS)
    assert all(path.startswith("/etc/mayhem/credentials/") for path in credentials.values())
    # The pool at the highest concurrency, the metrics endpoint's connections, and room.
    with pytest.raises(ConfigError):
        Config.load(flags={"concurrency": MAX_CONCURRENCY + 1}, environ={})
    assert int(_one(unit, "LimitNOFILE")) >= MAX_CONCURRENCY + 2 + MAX_HTTP_CONNECTIONS + 1024
    assert set(_values(unit, "RestrictAddressFamilies")[0].split()) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
    }


def test_template_keeps_instances_apart():
    """mayhem@NAME has its own configuration, credentials, state directory and user."""
    unit = "mayhem@.service"
    assert "--config /etc/mayhem/%i.toml" in _one(unit, "ExecStart")
    assert _one(unit, "StateDirectory") == "mayhem-%i"
    assert _one(unit, "User") == "mayhem-%i"
    assert all("/credentials/%i/" in value for value in _values(unit, "LoadCredential"))
    single = {(s, k, v) for s, k, v in _unit("mayhem.service") if "mayhem" not in v}
    template = {(s, k, v) for s, k, v in _unit(unit) if "%i" not in v and "mayhem" not in v}
    assert template - single == set()
    assert single - template == set(), "the template drops a setting of mayhem.service"


def _uncommented(text: str) -> str:
    return re.sub(r"(?m)^# (\w+ = .*)$", r"\1", text)


def test_example_configuration_shows_every_setting_with_its_default(tmp_path):
    """Every setting is in the example, commented out; uncommented, they are the defaults."""
    text = EXAMPLE.read_text()
    assert tomllib.loads(text) == {"mayhem": {}}, "nothing is set until uncommented"
    shown = re.findall(r"(?m)^# (\w+) = ", text)
    assert sorted(shown) == sorted(field.name for field in attrs.fields(Config))
    path = tmp_path / "mayhem.toml"
    path.write_text(_uncommented(text))
    loaded = Config.load(file=str(path), environ={})
    defaults = Config(log_format=loaded.log_format)
    # Two defaults are computed from other settings; the example shows their values.
    assert loaded == attrs.evolve(
        defaults,
        prefetch=defaults.effective_prefetch,
        retry_delays=defaults.effective_retry_delays,
    )


def _install(destdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DESTDIR": str(destdir), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    return subprocess.run(
        ["bash", str(INSTALL), "--no-package", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_stages_config_credentials_and_units(tmp_path):
    """deploy/install.sh with DESTDIR: the files, their modes, and how to enable the unit.

    1. Install into an empty DESTDIR: mayhem.toml from the example, credentials readable by
       root only, the units unchanged; it prints the systemctl command instead of running it.
    2. Edit the configuration and a credential, install again: both are kept.
    """
    done = _install(tmp_path)
    assert done.returncode == 0, done.stderr
    etc = tmp_path / "etc/mayhem"
    assert (etc / "mayhem.toml").read_text() == EXAMPLE.read_text()
    assert _mode(etc / "mayhem.toml") == 0o644
    assert _mode(etc / "credentials") == 0o700
    for key in ("amqp_url", "db_url"):
        assert _mode(etc / "credentials" / key) == 0o600
    assert (etc / "credentials/db_url").read_text() == f"{Config().db_url}\n"
    assert (etc / "credentials/amqp_url").read_text() == f"{Config().amqp_url}\n"
    for unit in UNIT_NAMES:
        assert (tmp_path / "etc/systemd/system" / unit).read_bytes() == (UNITS / unit).read_bytes()
    assert "systemctl enable --now mayhem.service" in done.stdout

    (etc / "mayhem.toml").write_text("[mayhem]\nqueue = 'orders'\n")
    (etc / "credentials/amqp_url").write_text("amqp://app:secret@broker/\n")
    assert _install(tmp_path).returncode == 0
    assert (etc / "mayhem.toml").read_text() == "[mayhem]\nqueue = 'orders'\n"
    assert (etc / "credentials/amqp_url").read_text() == "amqp://app:secret@broker/\n"


def test_install_instances_and_allowed_addresses(tmp_path, systemd_analyze):
    """--instance and --allow-ip: per-instance files, a network drop-in, and units that verify.

    1. Install instances "a" and "b" and allow 192.0.2.0/24, into a --root tree.
    2. Each instance has a configuration with its own queue and metrics port, which mayhem
       loads, and its own credentials.
    3. systemd-analyze verifies mayhem@a.service with the drop-in, and still rates it 1.0 or
       lower with the non-loopback address allowed.
    """
    root = _make_root(tmp_path / "root")
    done = _install(root, "--instance", "a", "--instance", "b", "--allow-ip", "192.0.2.0/24")
    assert done.returncode == 0, done.stderr
    etc = root / "etc/mayhem"
    loaded = {name: Config.load(file=str(etc / f"{name}.toml"), environ={}) for name in "ab"}
    assert [loaded[name].queue for name in "ab"] == ["a", "b"]
    assert len({config.metrics_addr for config in loaded.values()}) == 2
    assert Config().metrics_addr not in {config.metrics_addr for config in loaded.values()}
    for name in "ab":
        assert _mode(etc / "credentials" / name / "amqp_url") == 0o600
    dropin = root / "etc/systemd/system/mayhem@.service.d/50-network.conf"
    assert "IPAddressAllow=192.0.2.0/24" in dropin.read_text()
    assert "systemctl enable --now mayhem@a.service mayhem@b.service" in done.stdout

    verified = _analyze(systemd_analyze, "verify", f"--root={root}", "mayhem@a.service")
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")
    rated = _analyze(
        systemd_analyze, "security", "--offline=yes", f"--root={root}", "mayhem@a.service"
    )
    assert "allow list with non-localhost entries" in rated.stdout
    match = EXPOSURE.search(rated.stdout)
    assert match
    assert float(match[2]) <= 1.0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--instance", "../etc"], "instance name"),
        (["--allow-ip", "any; rm -rf /"], "--allow-ip"),
        (["--bogus"], "unknown argument"),
    ],
)
def test_install_refuses_bad_arguments(tmp_path, args, needle):
    """A bad instance name, address or option stops the script before it writes anything."""
    done = _install(tmp_path, *args)
    assert done.returncode != 0
    assert needle in done.stderr
    assert list(tmp_path.iterdir()) == []


def _runtime_closure() -> dict[str, str]:
    """The runtime dependencies of mayhem and theirs, by normalised name, at installed versions."""
    found: dict[str, str] = {}
    todo = ["mayhem"]
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        name = canonicalize_name(dist.metadata["Name"])
        if name in found:
            continue
        found[name] = dist.version
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    del found["mayhem"]
    return found


def test_constraints_pin_the_tested_runtime_dependencies():
    """deploy/constraints.txt pins exactly the runtime dependencies installed and tested here.

    Not the test tools; every dependency in pyproject.toml within its range; install.sh and CI
    install with it. On a mismatch the message is the list to put in the file.
    """
    pinned = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, line
            pinned[canonicalize_name(name)] = version
    closure = _runtime_closure()
    assert pinned == closure, "\n".join(f"{k}=={v}" for k, v in sorted(closure.items()))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        requirement = Requirement(text)
        assert requirement.specifier.contains(pinned[canonicalize_name(requirement.name)])
    for text in project["optional-dependencies"]["test"]:
        assert canonicalize_name(Requirement(text).name) not in pinned
    assert "-c deploy/constraints.txt ." in INSTALL.read_text()
    assert "-c deploy/constraints.txt -e '.[test]'" in (ROOT / ".ci/run").read_text()
