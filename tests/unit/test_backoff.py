"""The consumer's reconnect backoff (mayhem.consumer.Backoff), on a clock the test moves."""

from __future__ import annotations

from mayhem.consumer import HEALTHY_AFTER, RECONNECT_INTERVAL, RECONNECT_MAX, Backoff


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_defaults_double_from_one_second_up_to_five():
    """1, 2, 4, 5, 5 s; a connection counts as healthy after 30 s."""
    backoff = Backoff()
    assert (RECONNECT_INTERVAL, RECONNECT_MAX, HEALTHY_AFTER) == (1.0, 5.0, 30.0)
    assert [backoff.delay() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert list(backoff.chosen) == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_connection_lost_soon_after_it_came_up_keeps_the_longer_delay():
    """Up then down within healthy_after: the next delay goes on doubling, no reset."""
    clock = Clock()
    backoff = Backoff(first=1.0, most=8.0, healthy_after=30.0, clock=clock)
    chosen = []
    for _ in range(5):
        chosen.append(backoff.delay())
        backoff.up()
        clock.now += 0.01  # lost right after subscribing
        assert not backoff.healthy
        backoff.down()
    assert chosen == [1.0, 2.0, 4.0, 8.0, 8.0]


def test_the_delay_starts_again_only_after_a_healthy_spell():
    """Up for healthy_after (or longer), then lost: the next delay is the first again."""
    clock = Clock()
    backoff = Backoff(first=1.0, most=8.0, healthy_after=30.0, clock=clock)
    assert [backoff.delay() for _ in range(3)] == [1.0, 2.0, 4.0]
    backoff.up()
    clock.now += 29.9
    assert not backoff.healthy
    clock.now += 0.1
    assert backoff.healthy
    assert backoff.next_delay == 8.0  # not reset while still up
    backoff.down()
    assert not backoff.healthy
    assert backoff.next_delay == 1.0
    assert backoff.delay() == 1.0
    backoff.down()  # a failed attempt (never up): no reset
    assert backoff.delay() == 2.0
