"""Tier 1: the compiled simulation kernels (cost_models.kernels) give bit-identical results to the
Python passes they replace (simulator._run for the plain order, periodic.play / _run_periodic for
the rounds with the steady-phase fast-forward), on every schedule."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings

from cost_models import kernels
from cost_models import simulator as sim_mod
from cost_models.periodic import compile_periodic
from cost_models.simulator import _compiled, _durations, _run, _run_periodic
from tests.test_cost_simulator_periodic import _case

pytestmark = pytest.mark.skipif(not kernels.JIT, reason="numba missing or AUTOPLAN_JIT=0")


def _python(name, pp, m, v, times):
    """The pure-Python result simulate_cached gave before the kernels (the same choice of path)."""
    split = name == "zero_bubble"
    dur, lag = _durations(times, split)
    pc = compile_periodic(name, pp, m, v)
    if pc is None:
        return _run(_compiled(name, pp, m, v), dur, lag, split, False)
    return _run_periodic(pc, m, dur, lag)


def _jit(name, pp, m, v, times):
    sim_mod._CACHE.clear()
    return sim_mod.simulate_cached(name, pp, m, v, times)


def _assert_identical(got, ref):
    assert got.step_time_s == ref.step_time_s
    assert got.busy_s == ref.busy_s
    assert got.bubble_fraction == ref.bubble_fraction
    assert got.peak_in_flight == ref.peak_in_flight
    assert got.peak_in_flight_per_stage == ref.peak_in_flight_per_stage


@settings(max_examples=300, deadline=None)
@given(_case())
def test_kernels_bit_identical(case):
    _assert_identical(_jit(*case), _python(*case))


@pytest.mark.parametrize("name,pp,m,v", [
    ("1f1b", 32, 384, 1), ("zero_bubble", 32, 96, 1), ("interleaved_1f1b", 16, 96, 2),
    ("gpipe", 8, 64, 1), ("1f1b", 16, 17, 1), ("zero_bubble", 2, 3, 1),
])
def test_kernels_bit_identical_large(name, pp, m, v):
    rng = random.Random(pp * 1000 + m)
    pool = [(rng.uniform(0.1, 2), rng.uniform(0.1, 3), rng.uniform(0, 1), rng.choice([0.0, 0.02])) for _ in range(3)]
    for _ in range(5):
        times = tuple(rng.choice(pool) for _ in range(pp * v))
        _assert_identical(_jit(name, pp, m, v, times), _python(name, pp, m, v, times))
    # distinct per stage (no ties), a slow last stage
    times = tuple((rng.uniform(0.1, 2), rng.uniform(0.1, 3), rng.uniform(0, 1), 0.01) for _ in range(pp * v - 1))
    times += ((5.0, 7.0, 1.0, 0.0),)
    _assert_identical(_jit(name, pp, m, v, times), _python(name, pp, m, v, times))


def test_kernels_used_and_warm_up():
    """With JIT the cached path goes through the kernels (a broken kernel would be seen here)."""
    assert kernels.warm_up() >= 0.0
    assert compile_periodic("1f1b", 8, 64, 1).arrays is not None
    assert _compiled("gpipe", 4, 8, 1).arrays is not None
