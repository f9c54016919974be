"""The worker's intake lag, read from the batches the ingest agent takes."""

from __future__ import annotations

import pytest

from stream_app.intake import IntakeLag


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lag_is_the_high_watermarks_minus_the_offsets_after_the_last_taken():
    ends = {"a": 1000, "b": 50}
    lag = IntakeLag(ends.get, clock=Clock())
    assert lag.events() == 0  # nothing taken yet
    lag.observe([("a", 10), ("b", 7), ("a", 99), ("a", 42)])  # the batch's order is any
    assert lag.events() == (1000 - 100) + (50 - 8)
    lag.observe([("b", 49)])  # b caught up; a as of its last batch
    assert lag.events() == 900


def test_partitions_not_taken_from_within_the_horizon_drop_out():
    clock = Clock()
    lag = IntakeLag({"a": 500, "b": 800}.get, horizon_s=5.0, clock=clock)
    lag.observe([("a", 99)])
    clock.now += 3
    lag.observe([("b", 299)])
    assert lag.events() == 400 + 500
    clock.now += 2.5  # a: 5.5 s ago (revoked, or another worker has it now)
    assert lag.events() == 500


@pytest.mark.parametrize("highwater", [lambda tp: None, lambda tp: 1 / 0])
def test_an_unknown_or_unreadable_high_watermark_gives_no_figure(highwater):
    lag = IntakeLag(highwater, clock=Clock())
    lag.observe([("a", 5)])
    assert lag.events() == 0


def test_a_watermark_behind_the_offset_counts_as_caught_up():
    lag = IntakeLag({"a": 10}.get, clock=Clock())  # a stale watermark from an older fetch
    lag.observe([("a", 20)])
    assert lag.events() == 0
