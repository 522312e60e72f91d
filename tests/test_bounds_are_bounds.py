"""Tier 1: every bound the search prunes by is a bound of the real cost model's estimate.

Random GPT graphs and knobs drawn from the search's own space (planner.space: meshes, micro-batch
splits, sequence parallelism, schedules, every sharding with its hsdp sizes, offload none/cpu;
a pinned sharding reaches the shardings the free space leaves out at dp = 1), a random stage
partition with random per-stage recompute, and then, against cost_models.estimate_knobs:

- memory: `Search.state_lower_bound` (model states alone, by which a point is rejected before
  any scoring) <= the estimate's peak memory, for any partition and recompute;
- time: `Search.region_bound` (the items' first bound, any partition) <= the step time;
  `Search.schedule_bound` <= the step time of the memory-free partition it is documented to bound;
  `Search.point_bound` (the backend's exact bound, no simulation) <= the step time of its point.

Before the fix of issue 16 the state bound kept zero2's parameters whole while the estimate
divides them by dp (FSDP2 stores them sharded), and this test failed on zero2 points.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, currently_in_test_context, given, settings, target
from hypothesis import strategies as st

from cost_models import estimate_knobs
from planner.scoring import CostModelBackend
from planner.search import Search
from specs import Constraints, HardwareSpec, Knobs, TrainSpec
from tests.graphs import gpt_graph

REL = 1e-9  # the estimate sums the rank's parameters before dividing; the bound per block

HIDDEN_HEADS = [(256, 8), (1024, 16), (2560, 32), (4096, 32), (6144, 48)]


@st.composite
def _problem(draw):
    hidden, heads = draw(st.sampled_from(HIDDEN_HEADS))
    g = gpt_graph(vocab=draw(st.sampled_from([1024, 50304])), hidden=hidden, heads=heads,
                  layers=draw(st.integers(2, 24)), seq_len=draw(st.sampled_from([128, 512, 2048])))
    devices = draw(st.sampled_from([1, 2, 4, 8, 16]))
    hw = HardwareSpec.preset(draw(st.sampled_from(["dgx-a100-80gb", "dgx-h100-80gb"])), devices=devices)
    train = TrainSpec(global_batch_size=devices * draw(st.sampled_from([1, 2, 4])),
                      precision=draw(st.sampled_from(["bf16", "fp32"])),
                      optimizer=draw(st.sampled_from(["adamw", "sgd"])),
                      allow_grad_accumulation=draw(st.booleans()), allow_offload=True, allow_checkpointing=True)
    # every sharding as often as the others (a pin also reaches zero1/2/3 at dp = 1)
    sharding = draw(st.sampled_from(["none", "zero1", "zero2", "zero3", "hsdp"]))
    cons = Constraints(sharding=sharding, offload=draw(st.sampled_from(["none", "cpu"])))
    return g, hw, train, cons


@st.composite
def _case(draw):
    g, hw, train, cons = draw(_problem())
    search = Search(g, hw, train, cons, CostModelBackend(g, hw, train))
    meshes = search.meshes()
    assume(meshes)
    pp, dp, tp, cp = draw(st.sampled_from(meshes))
    mbs = search.micro_batches(pp, dp)
    assume(mbs)
    mb, n_mb = draw(st.sampled_from(mbs))
    sp = draw(st.sampled_from(search.sp_options(tp)))
    scheds = search.schedules(pp, n_mb)
    assume(scheds)
    sched, v = draw(st.sampled_from(scheds))
    shardings = search.shardings(dp, pp, tp)
    assume(shardings)
    sharding, hsdp, offload = draw(st.sampled_from(shardings))
    ends = search.ends
    num = pp * v
    cuts = sorted(draw(st.sets(st.integers(0, len(ends) - 2), min_size=num - 1, max_size=num - 1))
                  if num > 1 else [])
    modes = draw(st.lists(st.sampled_from(search.modes), min_size=num, max_size=num))
    stages, first = [], 0
    for b, mode in zip([ends[i] for i in cuts] + [ends[-1]], modes, strict=True):
        stages.append((first, b, mode))
        first = b + 1
    k = Knobs(pp=pp, dp=dp, tp=tp, sharding=sharding, hsdp_shard_size=hsdp, offload=offload,
              micro_batch_size=mb, num_micro_batches=n_mb, schedule=sched, virtual_stages=v,
              sequence_parallel=sp, cp=cp)
    return search, Search.with_recompute(k, stages), stages


@pytest.mark.tier1
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(_case())
def test_every_bound_the_search_uses_is_below_the_estimate(case):
    _check_bounds(*case)


def _check_bounds(search: Search, k: Knobs, stages: list[tuple[int, int, str]]) -> None:
    est = estimate_knobs(search.graph, k, stages, search.hw, search.train)

    # memory: the model states alone, by which a point is rejected unscored
    states = search.state_lower_bound(k.pp, k.dp, k.tp, k.sharding, k.hsdp_shard_size, k.offload, k.ep, k.cp)
    if currently_in_test_context():
        target(states / est.peak_memory_bytes, label="state bound / peak memory")  # seek the tight cases
    assert states <= est.peak_memory_bytes * (1 + REL), (k, states, est.peak_memory_bytes)

    # time: the region's bound, for any partition of the region
    prof = search.backend.profile(k.tp, k.sequence_parallel, k.micro_batch_size, search.modes[0], k.ep, k.cp)
    assert search.region_bound(prof, k.pp, k.num_micro_batches) <= est.step_time_s * (1 + REL)

    # time: the backend's exact bound of this point
    assert search.point_bound(k, stages) <= est.step_time_s * (1 + REL)

    # time: the schedule's bound, for the memory-free partition it is computed from
    free = search.free_partition(k)
    if free is not None:
        region = (k.pp, k.dp, k.tp, k.micro_batch_size, k.num_micro_batches, k.sequence_parallel, k.ep, k.cp)
        kf = Search.with_recompute(k, free.stages)
        est_free = estimate_knobs(search.graph, kf, list(free.stages), search.hw, search.train)
        bound = search.schedule_bound(prof, region, k.schedule, k.virtual_stages)
        assert bound <= est_free.step_time_s * (1 + REL), (kf, free.stages, bound, est_free.step_time_s)
        assert search.point_bound(kf, free.stages) <= est_free.step_time_s * (1 + REL)


@pytest.mark.tier1
def test_zero2_state_bound_of_a_2_7b_gpt_at_dp8():
    """The case of issue 16: a 2.7B GPT at dp=8 under zero2 holds ~4.9 GiB of states per device;
    the old bound said >= 14.2 GiB and pruned on it."""
    g = gpt_graph(vocab=50304, hidden=2560, layers=32, heads=32, seq_len=2048)
    hw = HardwareSpec.preset("dgx-a100-80gb", devices=8)
    train = TrainSpec(global_batch_size=8)
    search = Search(g, hw, train, None, CostModelBackend(g, hw, train))
    got = search.state_lower_bound(1, 8, 1, "zero2", None, "none")
    assert got / 2**30 == pytest.approx(16 * g.num_params / 8 / 2**30, rel=1e-3)  # 4.9 GiB
    k = Knobs(pp=1, dp=8, tp=1, sharding="zero2", micro_batch_size=1, num_micro_batches=1, recompute="full")
    est = estimate_knobs(g, k, [(0, g.num_blocks - 1, "full")], hw, train)
    assert got <= est.peak_memory_bytes


@pytest.mark.tier1
@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_bounds_of_zero2_without_accumulation(offload):
    """A case the draws above found against the old state bound: zero2 at dp=16 with one
    micro-batch (no unsharded gradient accumulation), where the states are most of the peak."""
    g = gpt_graph(vocab=1024, hidden=4096, heads=32, layers=11, seq_len=128)
    hw = HardwareSpec.preset("dgx-a100-80gb", devices=16)
    train = TrainSpec(global_batch_size=16, allow_offload=True)
    search = Search(g, hw, train, None, CostModelBackend(g, hw, train))
    k = Knobs(pp=1, dp=16, tp=1, sharding="zero2", offload=offload, micro_batch_size=1, num_micro_batches=1)
    _check_bounds(search, k, [(0, g.num_blocks - 1, "none")])
