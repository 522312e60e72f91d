"""Tier 1: the periodic fast path (cost_models.periodic: rounds, fast-forward over the steady
phase, structure compiled for fewer micro-batches) gives what the plain event simulation gives."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cost_models import estimate_knobs
from cost_models import simulator as sim_mod
from cost_models.periodic import compile_periodic
from cost_models.simulator import _compiled, _durations, _run, _run_periodic
from specs import HardwareSpec, Knobs, TrainSpec
from tests.graphs import gpt_graph

REL = 1e-9


def _plain(name, pp, m, v, times):
    split = name == "zero_bubble"
    dur, lag = _durations(times, split)
    return _run(_compiled(name, pp, m, v), dur, lag, split, False)


def _fast(name, pp, m, v, times):
    pc = compile_periodic(name, pp, m, v)
    if pc is None:
        return None
    dur, lag = _durations(times, name == "zero_bubble")
    return _run_periodic(pc, m, dur, lag)


def _assert_same(got, ref):
    assert got.step_time_s == pytest.approx(ref.step_time_s, rel=REL, abs=0)
    assert got.busy_s == pytest.approx(ref.busy_s, rel=REL, abs=0)
    assert got.bubble_fraction == pytest.approx(ref.bubble_fraction, rel=0, abs=REL)
    assert got.peak_in_flight == ref.peak_in_flight
    assert got.peak_in_flight_per_stage == ref.peak_in_flight_per_stage


@st.composite
def _case(draw):
    name = draw(st.sampled_from(["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"]))
    pp = draw(st.integers(1, 16))
    v = draw(st.sampled_from([1, 2, 3])) if name == "interleaved_1f1b" else 1
    m = draw(st.integers(1, 64))
    if name == "interleaved_1f1b" and pp > 1:
        m = pp * draw(st.integers(1, max(1, 64 // pp)))
    # a few distinct values, as real stage times have (first/middle/last stage): ties are where
    # a fast-forward could go wrong; sometimes all distinct
    pool = draw(st.lists(st.tuples(st.floats(0.05, 3), st.floats(0.05, 4), st.floats(0, 1),
                                   st.sampled_from([0.0, 0.01, 0.3])), min_size=1, max_size=4))
    if draw(st.booleans()):
        times = tuple(pool[min(j, len(pool) - 1)] if j < pp * v - 1 else pool[-1] for j in range(pp * v))
    else:
        times = tuple(draw(st.sampled_from(pool)) for _ in range(pp * v))
    return name, pp, m, v, times


@pytest.mark.tier1
@settings(max_examples=400, deadline=None)
@given(_case())
def test_fast_path_equals_plain_simulation(case):
    name, pp, m, v, times = case
    got = _fast(name, pp, m, v, times)
    if got is not None:
        _assert_same(got, _plain(name, pp, m, v, times))


@pytest.mark.tier1
@pytest.mark.parametrize(("name", "pp", "m", "v"), [("1f1b", 32, 384, 1), ("zero_bubble", 32, 192, 1),
                                                    ("interleaved_1f1b", 16, 192, 2), ("interleaved_1f1b", 8, 96, 3),
                                                    ("zero_bubble", 16, 96, 1), ("1f1b", 1, 200, 1)])
def test_fast_path_equals_plain_simulation_large(name, pp, m, v):
    rng = random.Random(f"{name}{pp}{m}{v}")
    S = pp * v
    first, mid, last = ((rng.uniform(0.5, 2), rng.uniform(1, 4), rng.uniform(0, 1), 0.02) for _ in range(3))
    even = tuple(first if j == 0 else last if j == S - 1 else mid for j in range(S))
    random_times = tuple((rng.uniform(0.5, 2), rng.uniform(1, 4), rng.uniform(0, 1), rng.uniform(0, 0.1))
                         for _ in range(S))
    for times in (even, random_times, ((1.0, 2.0, 0.5, 0.0),) * S):
        got = _fast(name, pp, m, v, times)
        assert got is not None  # the uniform builders always have a steady run at these sizes
        _assert_same(got, _plain(name, pp, m, v, times))


@pytest.mark.tier1
def test_uniform_schedules_compile_once_for_many_micro_batch_counts():
    # the structure is compiled for the smallest m' with the same warm-up and drain, not for m
    a, b = compile_periodic("1f1b", 8, 96, 1), compile_periodic("1f1b", 8, 384, 1)
    assert a is b and a.m_compiled < 96
    assert compile_periodic("interleaved_1f1b", 4, 64, 2).m_compiled % 4 == 0


@pytest.mark.tier1
@pytest.mark.parametrize(("name", "pp", "v"), [("1f1b", 32, 1), ("zero_bubble", 32, 1), ("interleaved_1f1b", 16, 2)])
def test_compiled_structure_is_quadratic_in_pp_not_linear_in_m(name, pp, v):
    m = 48 * pp
    pc = compile_periodic(name, pp, m, v)
    plain_actions = len(_compiled(name, pp, m, v).order)
    assert len(pc.rp) <= 10 * v * pp * pp < plain_actions / 3
    assert pc.reach == 1  # same-rank dependencies dropped: ZB-H1's held-back W's do not widen it


@pytest.mark.tier1
def test_estimates_equal_with_the_plain_simulation(monkeypatch):
    """A search-like candidate set scored with the fast path and again with the plain simulation."""
    graph = gpt_graph(vocab=512, hidden=256, layers=14, heads=8, seq_len=128)
    hw = HardwareSpec.preset("dgx-a100-80gb", nodes=8)
    train = TrainSpec(global_batch_size=256)
    cands = []
    for tp in (1, 8):
        for pp in (1, 2, 4, 8):
            dp = hw.num_devices // (tp * pp)
            for sched, v in (("1f1b", 1), ("zero_bubble", 1), ("interleaved_1f1b", 2), ("gpipe", 1)):
                m = train.global_batch_size // dp
                if pp == 1 and sched != "1f1b" or (v > 1 and (m % pp or graph.num_blocks < 2 * pp)):
                    continue
                for sharding, rec in (("none", "none"), ("zero3", "selective"), ("zero1", "full")):
                    S, nb = pp * v, graph.num_blocks
                    bounds = [round(j * nb / S) for j in range(S + 1)]
                    stages = [(bounds[j], bounds[j + 1] - 1, rec) for j in range(S)]
                    cands.append((Knobs(pp=pp, dp=dp, tp=tp, sharding=sharding, micro_batch_size=1,
                                        num_micro_batches=m, schedule=sched, virtual_stages=v, recompute=rec),
                                  stages))
    sim_mod._CACHE.clear()
    fast = [estimate_knobs(graph, k, s, hw, train) for k, s in cands]
    sim_mod._CACHE.clear()
    monkeypatch.setattr(sim_mod, "compile_periodic", lambda *a: None)
    plain = [estimate_knobs(graph, k, s, hw, train) for k, s in cands]
    sim_mod._CACHE.clear()
    assert len(cands) > 40
    for f, p in zip(fast, plain, strict=True):
        scale = p.step_time_s
        assert f.step_time_s == pytest.approx(p.step_time_s, rel=REL, abs=0)
        assert f.peak_memory_bytes == p.peak_memory_bytes and f.fits == p.fits
        assert f.memory_bytes == p.memory_bytes and f.peak_in_flight == p.peak_in_flight
        for term, val in p.time_breakdown_s.items():
            assert f.time_breakdown_s[term] == pytest.approx(val, rel=0, abs=REL * scale)
        assert f.bubble_fraction == pytest.approx(p.bubble_fraction, rel=0, abs=REL)
        assert f.mfu == pytest.approx(p.mfu, rel=REL, abs=0)
