"""Tier 1: the simulator's fast paths (plain-tuple schedules, columnar timing pass) give exactly
what the reference path (Action schedules, timeline pass) gives; `simulate_cached` (rounds with a
fast-forward, cost_models.periodic) the same to rounding (tests/test_cost_simulator_periodic.py
compares it at length)."""

from __future__ import annotations

import random

import pytest

from cost_models import build_schedule, simulate
from cost_models.schedules import build_schedule_plain
from cost_models.simulator import _compile, simulate_cached

SHAPES = [("gpipe", 3, 5, 1), ("1f1b", 4, 9, 1), ("1f1b", 4, 2, 1), ("interleaved_1f1b", 4, 8, 2),
          ("interleaved_1f1b", 2, 6, 4), ("zero_bubble", 4, 8, 1), ("zero_bubble", 5, 3, 1), ("1f1b", 1, 3, 1)]


@pytest.mark.tier1
@pytest.mark.parametrize(("name", "pp", "m", "v"), SHAPES)
def test_plain_schedule_equals_actions(name, pp, m, v):
    ref, fast = build_schedule(name, pp, m, v), build_schedule_plain(name, pp, m, v)
    assert fast.actions == ref.actions and fast.stage_rank == ref.stage_rank
    assert _compile(fast) == _compile(ref)


@pytest.mark.tier1
@pytest.mark.parametrize(("name", "pp", "m", "v"), SHAPES)
def test_fast_pass_equals_timeline_pass(name, pp, m, v):
    rng = random.Random(7)
    for _ in range(5):
        times = tuple((rng.uniform(0.1, 2), rng.uniform(0.1, 3), rng.uniform(0, 1), rng.uniform(0, 0.3))
                      for _ in range(pp * v))
        ref = simulate(build_schedule(name, pp, m, v), times, timeline=True)
        got = simulate(build_schedule(name, pp, m, v), times, timeline=False)
        assert got.step_time_s == ref.step_time_s  # exactly: same additions in the same order
        assert got.busy_s == ref.busy_s and got.peak_in_flight_per_stage == ref.peak_in_flight_per_stage
        # the cached path plays rounds and fast-forwards the steady phase (cost_models.periodic):
        # the same result to rounding
        cached = simulate_cached(name, pp, m, v, times)
        assert cached.step_time_s == pytest.approx(ref.step_time_s, rel=1e-12)
        assert cached.busy_s == pytest.approx(ref.busy_s, rel=1e-12)
        assert cached.peak_in_flight_per_stage == ref.peak_in_flight_per_stage


def test_memo_by_times_id_is_the_memo_by_value():
    """simulate_cached memoises by the caller's id for the stage times (estimate_knobs passes the
    layout's times_id): the same result as by value, and an id is never confused with another's."""
    from itertools import count

    from cost_models import simulator

    ids = count(10**12)  # ids the layouts never hand out in this process
    rng = random.Random(3)
    for name, pp, m, v in (("1f1b", 4, 16, 1), ("zero_bubble", 4, 12, 1), ("interleaved_1f1b", 2, 8, 2)):
        a = tuple((rng.uniform(0.1, 2), rng.uniform(0.1, 3), rng.uniform(0, 1), 0.01) for _ in range(pp * v))
        b = tuple((f * 2, bb, w, c) for f, bb, w, c in a)
        ia, ib = next(ids), next(ids)
        got_a, got_b = simulate_cached(name, pp, m, v, a, ia), simulate_cached(name, pp, m, v, b, ib)
        assert got_a == simulate_cached(name, pp, m, v, a) and got_b == simulate_cached(name, pp, m, v, b)
        assert got_a != got_b and simulate_cached(name, pp, m, v, a, ia) is got_a
        assert (name, pp, m, v, ia) in simulator._CACHE
