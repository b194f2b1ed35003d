"""The node repair's back-off (engine/repair.py): bounded, exponential for repeats, forgiving."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cniplugin.engine.repair import Backoff


def test_repeats_double_the_pause_up_to_the_cap():
    b = Backoff(base=1.0, cap=8.0, window=30.0)
    pauses = [b.record("rule", t) for t in (0.0, 0.1, 1.2, 3.3, 7.4, 15.5, 23.6)]
    assert pauses == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert not b.allowed("rule", 23.7) and b.allowed("rule", 31.6)


def test_a_repair_after_a_quiet_window_starts_over_and_keys_are_independent():
    b = Backoff(base=1.0, cap=8.0, window=30.0)
    b.record("route", 0.0)
    assert b.record("route", 1.0) == 1.0
    assert b.record("route", 40.0) == 0.0
    assert b.record("rule", 40.5) == 0.0 and b.allowed("rule", 40.5)


def test_a_failed_repair_always_pauses():
    b = Backoff(base=0.5, cap=8.0, window=30.0)
    assert b.record("neighbour", 0.0, failed=True) == 0.5
    assert not b.allowed("neighbour", 0.2)


@given(st.lists(st.tuples(st.floats(0, 100), st.booleans()), max_size=60),
       st.floats(0.01, 5), st.floats(0.01, 600))
def test_pauses_stay_within_bounds(events, base, cap):
    b = Backoff(base=base, cap=cap, window=30.0)
    now = 0.0
    for step, failed in events:
        now += step
        pause = b.record("x", now, failed)
        assert 0.0 <= pause <= max(cap, 0.0)
        assert b.allowed("x", now + pause)
    b.prune(now + 30.0 + cap + 1)
    assert b.allowed("x", now)
