"""Tier 1: the compiled kernels (cost_models.jit, loaded by cost_models.kernels) give bit-identical
results to the Python passes they replace, on every schedule: simulator._run (plain order) and
periodic.play / _run_periodic (rounds, steady-phase fast-forward) for the timing;
simulator._compile_python (dependency order, in-flight peaks) and periodic._rounds_python (round
structure) for the compile."""

from __future__ import annotations

import random
from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings

from cost_models import kernels
from cost_models import simulator as sim_mod
from cost_models.periodic import _compiled_rounds, _rounds_python, _shift, compile_periodic
from cost_models.schedules import SCHEDULES, build_schedule, build_schedule_plain
from cost_models.simulator import (
    _compile,
    _compile_python,
    _compiled,
    _durations,
    _run,
    _run_periodic,
)
from tests.test_cost_simulator_periodic import _case

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="numba missing or AUTOPLAN_JIT=0")


@pytest.fixture(autouse=True, scope="module")
def _loaded():
    kernels.warm_up()
    assert kernels.ready


@cache
def _python_structure(name, pp, m, v):
    pc = compile_periodic(name, pp, m, v)
    if pc is None:
        return _compile_python(build_schedule_plain(name, pp, m, v)), None
    comp = _compile_python(build_schedule_plain(name, pp, pc.m_compiled, v))
    return None, _rounds_python(comp, pp, pc.m_compiled, _shift(name, pp, v))


def _python(name, pp, m, v, times):
    """The pure-Python result simulate_cached gives without the kernels (the same choice of path),
    on structures compiled in Python."""
    split = name == "zero_bubble"
    dur, lag = _durations(times, split)
    comp, rounds = _python_structure(name, pp, m, v)
    if rounds is None:
        return _run(comp, dur, lag, split, False)
    return _run_periodic(rounds, m, dur, lag)


def _jit(name, pp, m, v, times):
    sim_mod._CACHE.clear()
    return sim_mod.simulate_cached(name, pp, m, v, times)


def _assert_identical(got, ref):
    assert got.step_time_s == ref.step_time_s
    assert got.busy_s == ref.busy_s
    assert got.bubble_fraction == ref.bubble_fraction
    assert got.peak_in_flight == ref.peak_in_flight
    assert got.peak_in_flight_per_stage == ref.peak_in_flight_per_stage


@settings(max_examples=200, deadline=None)
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


_SHAPES = [(name, pp, m, v) for name in SCHEDULES for pp in (1, 2, 3, 4, 8, 13) for m in (1, 2, 5, 8, 16, 24, 39)
           for v in ((1, 2, 3) if name == "interleaved_1f1b" else (1,))
           if not (name == "interleaved_1f1b" and v > 1 and m % pp)]


@pytest.mark.parametrize(("name", "pp", "m", "v"), _SHAPES)
def test_compile_kernels_equal_python(name, pp, m, v):
    """The compiled dependency order and round structure equal the Python ones, field by field."""
    sched = build_schedule_plain(name, pp, m, v)
    got, ref = _compile(sched), _compile_python(sched)
    assert got == ref and got.flat == ref.flat
    assert got.order_array.tolist() == [list(a) for a in ref.order]
    _compiled_rounds.cache_clear()
    fast = _compiled_rounds(name, pp, m, v)
    slow = _rounds_python(ref, pp, m, _shift(name, pp, v))
    assert (fast is None) == (slow is None)
    if fast is not None:
        assert fast == slow  # every field but the kernels' arrays
        # the arrays the kernel path keeps are what index_array makes of the tuples
        n = len(slow.rp)
        want = (kernels.index_array(slow.rp, n), kernels.index_array(slow.dep, n),
                kernels.index_array(slow.lag_slot, -1), kernels.index_array(slow.dur_slot, -1),
                kernels.index_array(slow.last_of_rank, -1), kernels.index_array(slow.counts, -1).reshape(-1, 3),
                kernels.index_array(slow.round_counts, -1).reshape(-1, 3), kernels.index_array(slow.stage_rank, -1))
        assert len(fast.arrays) == len(want)
        for a, b in zip(fast.arrays, want, strict=True):
            assert a.dtype == b.dtype == np.int64 and a.shape == b.shape and (a == b).all()


def test_compile_kernel_deadlock_message():
    """A deadlocking schedule fails with the Python scan's message (the kernel defers to it)."""
    sched = build_schedule("1f1b", 2, 2, 1)
    bad = type(sched)(sched.name, 2, 2, 1, (sched.actions[0][::-1], sched.actions[1][::-1]), sched.stage_rank, False)
    with pytest.raises(ValueError, match="deadlocks"):
        _compile(bad)


def test_simulate_cached_uses_kernels():
    """Once loaded, the cached path goes through the kernels (a broken kernel would be seen above)."""
    pc = compile_periodic("1f1b", 8, 64, 1)
    sim_mod._CACHE.clear()
    sim_mod.simulate_cached("1f1b", 8, 64, 1, ((1.0, 2.0, 0.0, 0.0),) * 8)
    assert pc.arrays is not None
    comp = _compiled("gpipe", 4, 8, 1)
    assert comp.arrays is not None
    # the derived views are made once (periodic._rounds_python indexes comp.flat per action)
    assert comp.flat is comp.flat and comp.order is comp.order and comp.arrays is comp.arrays


def test_kernels_load_after_their_load_time_in_python(monkeypatch):
    """The break-even rule: Python pass time is counted and the kernels load once it reaches
    LOAD_AFTER_S, not before."""
    monkeypatch.setattr(kernels, "ready", False)
    monkeypatch.setattr(kernels, "jit", None)
    monkeypatch.setattr(kernels, "_python_s", 0.0)
    kernels.charge(0.6 * kernels.LOAD_AFTER_S)
    assert not kernels.ready
    kernels.charge(0.6 * kernels.LOAD_AFTER_S)
    assert kernels.ready and kernels.jit is not None


def test_autoplan_jit_0_keeps_python():
    import os
    import subprocess
    import sys

    code = ("from cost_models import kernels, simulator as s; "
            "r = s.simulate_cached('1f1b', 4, 32, 1, ((1.0, 2.0, 0.0, 0.01),) * 4); "
            "kernels.charge(10.0); "
            "assert not kernels.AVAILABLE and not kernels.ready and kernels.warm_up() == 0.0, kernels.ready; "
            "print(r.step_time_s)")
    env = {**os.environ, "AUTOPLAN_JIT": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sim_mod._CACHE.clear()
    assert float(out.stdout) == sim_mod.simulate_cached("1f1b", 4, 32, 1, ((1.0, 2.0, 0.0, 0.01),) * 4).step_time_s
