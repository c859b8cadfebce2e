"""Signal handlers on the running loop, driven by real signals sent to this process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator

import pytest

from mayhem.signals import Deadlines, Signals

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextlib.contextmanager
def installed() -> Iterator[Signals]:
    """Signals installed on the running loop, always removed at the end."""
    signals = Signals()
    try:
        signals.install()
        yield signals
    finally:
        signals.remove()


async def send(signals: Signals, sig: signal.Signals, event: asyncio.Event) -> None:
    """Send ``sig`` to this process once the loop handles it; wait for ``event``."""
    # Never send a signal the loop does not handle: its default would end the test run.
    assert sig in asyncio.get_running_loop()._signal_handlers  # type: ignore[attr-defined]
    os.kill(os.getpid(), sig)
    async with asyncio.timeout(5):
        await event.wait()


async def test_sighup_requests_reload():
    """SIGHUP sets reload_requested and nothing else."""
    with installed() as signals:
        await send(signals, signal.SIGHUP, signals.reload_requested)
        assert not signals.stop_requested.is_set()
        assert not signals.force_exit.is_set()
        assert signals.received is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_first_stop_signal_requests_stop(sig):
    """The first SIGTERM or SIGINT sets stop_requested and records the signal, not force_exit."""
    with installed() as signals:
        await send(signals, sig, signals.stop_requested)
        assert signals.received == sig
        assert not signals.force_exit.is_set()
        assert not signals.reload_requested.is_set()


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (signal.SIGTERM, signal.SIGTERM),
        (signal.SIGINT, signal.SIGINT),
        (signal.SIGINT, signal.SIGTERM),
        (signal.SIGTERM, signal.SIGINT),
    ],
)
async def test_second_stop_signal_forces_exit(first, second):
    """1. A first stop signal sets stop_requested.

    2. A second one (SIGTERM or SIGINT) sets force_exit; the first signal stays recorded.
    """
    with installed() as signals:
        await send(signals, first, signals.stop_requested)
        assert not signals.force_exit.is_set()
        await send(signals, second, signals.force_exit)
        assert signals.received == first


async def test_sighup_during_shutdown_does_not_force():
    """A SIGHUP after a stop request only asks for a reload; it does not force exit."""
    with installed() as signals:
        await send(signals, signal.SIGTERM, signals.stop_requested)
        await send(signals, signal.SIGHUP, signals.reload_requested)
        assert not signals.force_exit.is_set()


async def test_remove_restores_the_defaults():
    """remove() takes the handlers off the loop; each signal then has its default effect.

    SIGINT gets Python's default_int_handler, not what was installed before (here the
    asyncio.Runner's own SIGINT handler): asyncio's remove_signal_handler does not restore it.
    """
    loop = asyncio.get_running_loop()
    with installed():
        for sig in HANDLED:
            assert sig in loop._signal_handlers  # type: ignore[attr-defined]
            assert signal.getsignal(sig) not in {signal.SIG_DFL, signal.default_int_handler}
    for sig in HANDLED:
        assert sig not in loop._signal_handlers  # type: ignore[attr-defined]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


async def test_remove_is_idempotent():
    """remove() without install, or twice, does nothing."""
    signals = Signals()
    signals.remove()
    with installed() as signals:
        pass
    signals.remove()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


async def test_reinstall_after_remove():
    """Signals can be installed again after remove(), with fresh state in a new object."""
    with installed() as signals:
        await send(signals, signal.SIGTERM, signals.stop_requested)
    with installed() as again:
        await send(again, signal.SIGTERM, again.stop_requested)
        assert not again.force_exit.is_set()


@pytest.mark.parametrize("forced", [0.0, 0.2])
async def test_second_signal_reschedules_the_running_limit(forced):
    """1. A shutdown step waits inside a 60 s limit; the force watch runs as a task.

    2. A second stop signal (force_exit) moves the limit to now plus the step's grace.
    3. The step ends with TimeoutError after that grace, not 60 s later; a limit started after
       the signal is short from the start.
    """
    loop = asyncio.get_running_loop()
    sent = 0.0

    async def step(signals: Signals, deadlines: Deadlines) -> None:
        nonlocal sent
        async with deadlines.limit(60, forced=forced):
            if not signals.force_exit.is_set():
                await send(signals, signal.SIGTERM, signals.force_exit)
                sent = loop.time()
            await asyncio.sleep(60)

    with installed() as signals:
        deadlines = Deadlines(signals.force_exit)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(deadlines.enforce())
            await send(signals, signal.SIGTERM, signals.stop_requested)
            with pytest.raises(TimeoutError):
                await step(signals, deadlines)
            assert forced <= loop.time() - sent < forced + 1
        began = loop.time()
        with pytest.raises(TimeoutError):
            await step(signals, deadlines)
        assert loop.time() - began < forced + 1


async def test_a_passed_step_limit_is_logged_and_the_step_goes_on(caplog):
    """at_most(): the limit passes, a warning says so, and the code after the block runs."""
    deadlines = Deadlines(asyncio.Event())
    async with deadlines.at_most(0.01):
        await asyncio.sleep(60)
    assert "shutdown step timed out; going on" in caplog.text


async def test_a_timeout_not_of_the_limit_is_not_taken_for_it():
    """at_most() lets through a TimeoutError raised inside it before its own limit passed."""
    deadlines = Deadlines(asyncio.Event())
    with pytest.raises(TimeoutError):
        async with deadlines.at_most(60):
            raise TimeoutError
