"""`mayhem init NAME`: a handler, its test and a configuration file; never over a file."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib

import pytest

from mayhem.cli import EXIT_OK, EXIT_USAGE, main
from mayhem.config import SETTINGS, Config
from mayhem.scaffold import CONFIG_FILE, ScaffoldError, config_file, files, init

WRITTEN = ["myapp/__init__.py", "myapp/handler.py", "tests/test_handler.py", CONFIG_FILE]


@pytest.fixture(autouse=True)
def no_mayhem_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("MAYHEM_"):
            monkeypatch.delenv(name)


def test_init_writes_the_files(tmp_path, capsys):
    assert main(["init", "myapp", "--directory", str(tmp_path)]) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == [f"wrote {tmp_path / path}" for path in WRITTEN]
    assert out[4] == (
        f"next: cd {tmp_path} && python -m pytest tests (no broker needed), "
        f"then mayhem run --config {CONFIG_FILE}"
    )
    for path in WRITTEN:
        assert (tmp_path / path).is_file()


def test_init_refuses_to_overwrite_and_writes_nothing(tmp_path, capsys):
    """One existing file: exit 2 with one line naming it; the others are not written either."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_handler.py").write_text("mine\n")
    assert main(["init", "myapp", "--directory", str(tmp_path)]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"mayhem: init: {tmp_path / 'tests/test_handler.py'} already exists; nothing was written\n"
    )
    assert (tmp_path / "tests" / "test_handler.py").read_text() == "mine\n"
    assert not (tmp_path / "myapp").exists()
    assert not (tmp_path / CONFIG_FILE).exists()


def test_init_twice_keeps_the_first(tmp_path, capsys):
    assert main(["init", "myapp", "--directory", str(tmp_path)]) == EXIT_OK
    (tmp_path / "myapp" / "handler.py").write_text("edited\n")
    assert main(["init", "myapp", "--directory", str(tmp_path)]) == EXIT_USAGE
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "myapp" / "handler.py").read_text() == "edited\n"


@pytest.mark.parametrize("name", ["my-app", "1app", "", "class", "json", "mayhem", "tests", "café"])
def test_bad_names_are_refused(tmp_path, capsys, name):
    assert main(["init", name, "--directory", str(tmp_path)]) == EXIT_USAGE
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("mayhem: init: ")
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_directory_is_one_line(tmp_path):
    (tmp_path / "myapp").write_text("a file where the package would go\n")
    with pytest.raises(ScaffoldError, match="cannot write"):
        init("myapp", tmp_path)
    assert not (tmp_path / CONFIG_FILE).exists()  # what was written is taken back


def test_the_python_files_compile_and_pass_a_linter(tmp_path):
    """The handler and the test are valid Python, clean for ruff's default rules."""
    init("myapp", tmp_path)
    for path in WRITTEN[:3]:
        ast.parse((tmp_path / path).read_text(), filename=path)
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--isolated", "--select", "E,F,W,I,UP,B", "."],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_test_uses_the_test_kit_as_specified():
    """tests/test_handler.py uses mayhem.testing.Harness(handle, db_url=...) and h.deliver."""
    text = files("myapp")["tests/test_handler.py"]
    assert "from myapp.handler import handle" in text
    assert 'mayhem.testing.Harness(handle, db_url="sqlite:///:memory:") as h' in text
    assert "await h.deliver(body, message_id=message_id)" in text
    for status in ("acked", "duplicate", "rejected"):
        assert f'.status == "{status}"' in text


def test_the_config_file_has_every_setting_with_help_default_and_env():
    text = config_file("myapp")
    for key, each in SETTINGS.items():
        assert each.env in text, key
        assert re.search(rf"^(# )?{key} = ", text, re.MULTILINE), key
        assert " ".join(each.doc.split()) in " ".join(text.replace("# ", " ").split()), key


def test_the_config_file_loads_and_sets_the_app(tmp_path):
    path = tmp_path / CONFIG_FILE
    path.write_text(config_file("myapp"))
    config = Config.load(file=str(path), environ={})
    assert config.handler == "myapp.handler:handle"
    assert (config.queue, config.exchange) == ("myapp", "myapp")
    assert config.db_url == "sqlite:///myapp.db"


def test_every_commented_line_uncommented_gives_the_defaults(tmp_path):
    """Uncommenting a setting changes nothing until it is edited: each line holds the default."""
    text = re.sub(r"^# (\w+ = )", r"\1", config_file("myapp"), flags=re.MULTILINE)
    data = tomllib.loads(text)["mayhem"]
    assert set(data) == set(SETTINGS)
    path = tmp_path / CONFIG_FILE
    path.write_text(text)
    loaded = Config.load(file=str(path), environ={})
    defaults = Config.load(environ={})
    own = {"handler", "queue", "exchange", "db_url"}
    effective, default = loaded.masked(), defaults.masked()  # prefetch, retry_delays computed
    for key in set(SETTINGS) - own - {"log_format"}:  # log_format's default depends on a tty
        assert effective[key] == default[key], key


def test_the_generated_tests_pass(tmp_path):
    """The tutorial's step 3: `mayhem init`, then `python -m pytest tests` passes, no broker."""
    init("myapp", tmp_path)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST")}
    args = ["tests", "-q", "-p", "no:cacheprovider", "-p", "no:asyncio", "-W", "error"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed" in done.stdout
