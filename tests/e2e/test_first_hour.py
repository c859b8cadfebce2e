"""The first hour, as a new user lives it: init, run, publish from a file or stdin."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import aio_pika
import pytest
from mayhem_testing import ROOT, SUPPORT, daemon_args, drain, metric, rows, wait_until

ACKED = 'mayhem_messages_total{outcome="acked"}'
REJECTED = 'mayhem_messages_total{outcome="rejected"}'


async def _mayhem(*args: str, stdin: bytes = b"", cwd=ROOT) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mayhem",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{SUPPORT}:{ROOT}"},
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _target(config) -> list[str]:
    return ["--amqp-url", config.amqp_url, "--queue", config.queue, "--exchange", config.exchange]


async def _ready(amqp, queue: str) -> int:
    channel = await amqp.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
    except aio_pika.exceptions.ChannelClosed:
        return -1  # not declared: nothing was ever published to it
    finally:
        if not channel.is_closed:
            await channel.close()
    return declared.declaration_result.message_count or 0


async def test_publish_from_stdin_with_a_progress_bar(amqp, make_config):
    """`--file -` reads standard input; `--progress` draws tqdm's bar on stderr, never stdout."""
    config = make_config()
    lines = b"".join(json.dumps({"n": n}).encode() + b"\n" for n in range(500))
    code, out, err = await _mayhem(
        "publish", *_target(config), "--file", "-", "--progress", stdin=lines
    )
    assert code == 0, err
    assert out.splitlines() == [out.strip()]
    assert out.startswith("published 500, confirmed 500, failed 0")
    assert "500/500" in err
    assert "msg/s" in err
    bodies = sorted(json.loads(m.body)["n"] for m in await drain(amqp, config.queue))
    assert bodies == list(range(500))


async def test_no_progress_bar_when_stderr_is_not_a_terminal(make_config, amqp):
    config = make_config()
    code, out, err = await _mayhem("publish", *_target(config), "--count", "5")
    assert code == 0, err
    assert out.startswith("published 5, confirmed 5")
    assert "msg/s" not in err
    assert "%|" not in err
    await drain(amqp, config.queue)


async def test_a_bad_line_publishes_nothing(amqp, make_config, tmp_path):
    """Line 3 of 4 is not JSON: exit 2, one line naming it, and not even lines 1-2 are sent."""
    config = make_config()
    path = tmp_path / "orders.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3,}\n{"id": 4}\n')
    code, out, err = await _mayhem("publish", *_target(config), "--file", str(path))
    assert code == 2
    assert out == ""
    why = "Expecting property name enclosed in double quotes at offset 9"
    assert err.splitlines() == [
        f"mayhem: publish: {path}:3: body is not valid JSON: {why}; nothing was published"
    ]
    assert await _ready(amqp, config.queue) in {-1, 0}


async def test_init_then_run_the_generated_handler(amqp, make_config, spawn, tmp_path):
    """The generated handler, run by the daemon, with messages published from stdin.

    1. `mayhem init shop`;
    2. `mayhem run --config mayhem.toml` runs shop.handler:handle;
    3. `mayhem publish --config mayhem.toml --file -` with two good orders and a bad one;
    4. the good ones are in the orders table, the bad one in the dead-letter queue.
    """
    config = make_config()
    code, _, err = await _mayhem("init", "shop", cwd=tmp_path)
    assert code == 0, err
    assert (tmp_path / "shop" / "handler.py").is_file()
    toml = str(tmp_path / "mayhem.toml")
    db_url = f"sqlite:///{tmp_path}/shop.db"
    daemon = spawn(
        ["--config", toml, *daemon_args(config)[:6], "--db-url", db_url],
        env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(SUPPORT), str(ROOT)])},
    )
    await daemon.start()
    orders = (
        b'{"id": "A-1", "total": 1200}\n{"id": "A-2", "total": 5}\n{"id": "A-3", "total": -1}\n'
    )
    code, _, err = await _mayhem(
        "publish", "--config", toml, *_target(config), "--file", "-", stdin=orders
    )
    assert code == 0, err
    assert daemon.metrics_addr is not None
    addr = daemon.metrics_addr

    async def settled() -> bool:
        return await metric(addr, ACKED) == 2 and await metric(addr, REJECTED) == 1

    await wait_until(settled)
    assert await daemon.stop() == 0
    stored = await rows(db_url, "SELECT order_id, total FROM orders ORDER BY order_id")
    assert stored == [("A-1", 1200), ("A-2", 5)]
    (dead,) = await drain(amqp, config.dead_queue)
    assert json.loads(dead.body)["id"] == "A-3"
    assert "total" in dead.headers["x-mayhem-error"]


@pytest.mark.parametrize("args", [["init", "x-y"], ["init", "sys"]])
async def test_init_bad_name_exits_2(tmp_path, args):
    code, out, err = await _mayhem(*args, cwd=tmp_path)
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err
