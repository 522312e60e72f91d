"""Tier 1: the bounds the search prunes by never exceed what they bound."""

from __future__ import annotations

import random

import pytest

from cost_models import build_schedule, estimate_knobs, simulate, step_lower_bound_knobs
from cost_models.simulator import pipeline_lower_bound
from specs import HardwareSpec, Knobs, TrainSpec
from tests.graphs import gpt_graph

SHAPES = [("gpipe", 4, 6, 1), ("1f1b", 4, 8, 1), ("1f1b", 3, 3, 1), ("interleaved_1f1b", 4, 8, 2),
          ("interleaved_1f1b", 2, 4, 3), ("zero_bubble", 4, 8, 1), ("zero_bubble", 3, 6, 1), ("zero_bubble", 5, 3, 1), ("zero_bubble", 2, 1, 1),
          ("1f1b", 1, 4, 1)]


@pytest.mark.tier1
@pytest.mark.parametrize(("name", "pp", "m", "v"), SHAPES)
def test_pipeline_bound_never_exceeds_the_simulation(name, pp, m, v):
    rng = random.Random(f"{name}{pp}{m}{v}")
    sched = build_schedule(name, pp, m, v)
    for trial in range(30):
        times = tuple((rng.uniform(0.1, 2), rng.uniform(0.1, 3), rng.uniform(0, 1) if name == "zero_bubble" else 0.0,
                       rng.uniform(0, 0.5) * (trial % 2)) for _ in range(pp * v))
        sim = simulate(sched, times, timeline=False).step_time_s
        assert pipeline_lower_bound(name, pp, m, v, times) <= sim * (1 + 1e-12)


@pytest.mark.tier1
def test_pipeline_bound_is_tight_for_uniform_1f1b():
    times = ((1.0, 2.0, 0.0, 0.0),) * 4  # with p2p the steady state idles more than the bound says
    sim = simulate(build_schedule("1f1b", 4, 8), times, timeline=False).step_time_s
    assert pipeline_lower_bound("1f1b", 4, 8, 1, times) == pytest.approx(sim, rel=1e-12)


@pytest.mark.tier1
@pytest.mark.parametrize("sharding", ["none", "zero2", "zero3", "hsdp"])
@pytest.mark.parametrize(("sched", "pp", "v"), [("1f1b", 2, 1), ("interleaved_1f1b", 2, 2), ("zero_bubble", 2, 1),
                                                ("gpipe", 1, 1)])
def test_step_bound_never_exceeds_the_estimate(sharding, sched, pp, v):
    g = gpt_graph(vocab=1024, hidden=256, layers=4, heads=8, seq_len=128)
    hw = HardwareSpec.preset("dgx-a100-80gb", devices=16)
    train = TrainSpec(global_batch_size=32)
    dp = 16 // (2 * pp)
    k = Knobs(pp=pp, dp=dp, tp=2, sharding=sharding, hsdp_shard_size=2 if sharding == "hsdp" else None,
              micro_batch_size=1, num_micro_batches=32 // dp, schedule=sched if pp > 1 else "1f1b", virtual_stages=v)
    n = g.num_blocks
    cuts = {1: [(0, n - 1)], 2: [(0, 2), (3, n - 1)], 4: [(0, 1), (2, 2), (3, 4), (5, n - 1)]}[pp * v]
    stages = [(a, b, "selective" if i % 2 else "none") for i, (a, b) in enumerate(cuts)]
    est = estimate_knobs(g, k, stages, hw, train).step_time_s
    lb = step_lower_bound_knobs(g, k, stages, hw, train)
    assert 0 < lb <= est * (1 + 1e-12)
    if sched == "1f1b" or pp == 1:
        assert lb > 0.5 * est  # not a vacuous bound
