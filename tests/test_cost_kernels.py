"""Tier 1: the compiled kernel (cost_models.jit, loaded by cost_models.kernels) gives bit-identical
results to the Python passes it replaces, on every schedule: simulator._run (the timing pass) and
simulator._compile_python (dependency order, in-flight peaks)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cost_models import kernels
from cost_models.schedules import SCHEDULES, build_schedule, build_schedule_plain
from cost_models.simulator import _compile, _compile_python, compile_schedule, play

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="numba missing or AUTOPLAN_JIT=0")


@pytest.fixture(autouse=True, scope="module")
def _loaded():
    assert kernels.load()


@st.composite
def _case(draw):
    name = draw(st.sampled_from(["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"]))
    pp = draw(st.integers(1, 16))
    v = draw(st.sampled_from([1, 2, 3])) if name == "interleaved_1f1b" else 1
    m = draw(st.integers(1, 64))
    if name == "interleaved_1f1b" and pp > 1:
        m = pp * draw(st.integers(1, max(1, 64 // pp)))
    # a few distinct values, as real stage times have (first/middle/last stage), or all distinct
    pool = draw(st.lists(st.tuples(st.floats(0.05, 3), st.floats(0.05, 4), st.floats(0, 1),
                                   st.sampled_from([0.0, 0.01, 0.3])), min_size=1, max_size=4))
    if draw(st.booleans()):
        times = tuple(pool[min(j, len(pool) - 1)] if j < pp * v - 1 else pool[-1] for j in range(pp * v))
    else:
        times = tuple(draw(st.sampled_from(pool)) for _ in range(pp * v))
    return name, pp, m, v, times


def _both(name, pp, m, v, times):
    split = name == "zero_bubble"
    python = play(compile_schedule(name, pp, m, v), times, split)
    compiled = play(compile_schedule(name, pp, m, v, compiled=True), times, split, compiled=True)
    return compiled, python


def _assert_identical(got, ref):
    assert got.step_time_s == ref.step_time_s
    assert got.busy_s == ref.busy_s
    assert got.bubble_fraction == ref.bubble_fraction
    assert got.peak_in_flight == ref.peak_in_flight
    assert got.peak_in_flight_per_stage == ref.peak_in_flight_per_stage


@settings(max_examples=200, deadline=None)
@given(_case())
def test_kernel_bit_identical(case):
    _assert_identical(*_both(*case))


@pytest.mark.parametrize("name,pp,m,v", [
    ("1f1b", 32, 384, 1), ("zero_bubble", 32, 96, 1), ("interleaved_1f1b", 16, 96, 2),
    ("gpipe", 8, 64, 1), ("1f1b", 16, 17, 1), ("zero_bubble", 2, 3, 1),
])
def test_kernel_bit_identical_large(name, pp, m, v):
    rng = random.Random(pp * 1000 + m)
    pool = [(rng.uniform(0.1, 2), rng.uniform(0.1, 3), rng.uniform(0, 1), rng.choice([0.0, 0.02])) for _ in range(3)]
    for _ in range(3):
        times = tuple(rng.choice(pool) for _ in range(pp * v))
        _assert_identical(*_both(name, pp, m, v, times))
    # distinct per stage (no ties), a slow last stage
    times = tuple((rng.uniform(0.1, 2), rng.uniform(0.1, 3), rng.uniform(0, 1), 0.01) for _ in range(pp * v - 1))
    times += ((5.0, 7.0, 1.0, 0.0),)
    _assert_identical(*_both(name, pp, m, v, times))


_SHAPES = [(name, pp, m, v) for name in SCHEDULES for pp in (1, 2, 3, 4, 8, 13) for m in (1, 2, 5, 8, 16, 24, 39)
           for v in ((1, 2, 3) if name == "interleaved_1f1b" else (1,))
           if not (name == "interleaved_1f1b" and v > 1 and m % pp)]


@pytest.mark.parametrize(("name", "pp", "m", "v"), _SHAPES)
def test_compile_kernel_equals_python(name, pp, m, v):
    """The compiled dependency order equals the Python one, field by field."""
    sched = build_schedule_plain(name, pp, m, v)
    got, ref = _compile(sched, compiled=True), _compile_python(sched)
    assert got == ref and got.flat == ref.flat
    assert got.order_array.tolist() == [list(a) for a in ref.order]


def test_compile_kernel_deadlock_message():
    """A deadlocking schedule fails with the Python scan's message (the kernel defers to it)."""
    sched = build_schedule("1f1b", 2, 2, 1)
    bad = type(sched)(sched.name, 2, 2, 1, (sched.actions[0][::-1], sched.actions[1][::-1]), sched.stage_rank, False)
    with pytest.raises(ValueError, match="deadlocks"):
        _compile(bad, compiled=True)


def test_cost_model_uses_the_kernel_where_asked():
    """A CostModel made with compiled=True plays its simulations through the kernel (its compiled
    schedules carry the kernel's arrays), one made with compiled=False never does; the estimates
    are the same, bit for bit."""
    from cost_models import CostModel
    from specs import HardwareSpec, Knobs, TrainSpec
    from tests.graphs import gpt_graph

    graph = gpt_graph(vocab=512, hidden=64, layers=8, heads=4, seq_len=32)
    hw, train = HardwareSpec.preset("dgx-a100-80gb", 1), TrainSpec(global_batch_size=64)
    k = Knobs(pp=4, dp=2, tp=1, num_micro_batches=32, schedule="1f1b")
    stages = [(0, 2, "none"), (3, 5, "none"), (6, 7, "none"), (8, graph.num_blocks - 1, "none")]
    fast, slow = CostModel(graph, hw, train, compiled=True), CostModel(graph, hw, train, compiled=False)
    assert fast.compiled and not slow.compiled
    assert fast.estimate(k, stages) == slow.estimate(k, stages)
    comp = fast.simulation_memo[("1f1b", 4, 32, 1)]
    assert comp._order is None and comp._order_array is not None  # built by the kernel
    assert slow.simulation_memo[("1f1b", 4, 32, 1)]._order_array is None


def test_autoplan_jit_0_keeps_python():
    import os
    import subprocess
    import sys

    code = ("from cost_models import kernels; from cost_models.simulator import compile_schedule, play; "
            "r = play(compile_schedule('1f1b', 4, 32, 1, compiled=True), ((1.0, 2.0, 0.0, 0.01),) * 4, False, "
            "compiled=True); "
            "assert not kernels.AVAILABLE and not kernels.load() and not kernels.ready; "
            "print(r.step_time_s)")
    env = {**os.environ, "AUTOPLAN_JIT": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    want = play(compile_schedule("1f1b", 4, 32, 1), ((1.0, 2.0, 0.0, 0.01),) * 4, False).step_time_s
    assert float(out.stdout) == want
