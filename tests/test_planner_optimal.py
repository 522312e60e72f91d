"""Tier 1/2: the planner against brute force and against practice, on the real cost models."""

from __future__ import annotations

import pytest

from planner.api import autoplan
from planner.scoring import CostModelBackend
from specs import Constraints, HardwareSpec, TrainSpec
from tests.graphs import gpt_graph, gpt_graph_from_config
from tests.planner_brute import brute_force


class CountingBackend(CostModelBackend):
    calls = 0

    def score(self, knobs, stages):
        self.calls += 1
        return super().score(knobs, stages)


SMALL = [
    # (graph kwargs, preset, devices, batch, allow_checkpointing, constraints)
    (dict(vocab=1024, hidden=256, layers=4, heads=8, seq_len=128), "dgx-a100-80gb", 8, 8, False, None),
    (dict(vocab=2048, hidden=512, layers=6, heads=8, seq_len=256), "dgx-h100-80gb", 8, 16, False,
     Constraints(max_pp=2)),
    (dict(vocab=1024, hidden=256, layers=4, heads=8, seq_len=128), "dgx-a100-80gb", 16, 16, False,
     Constraints(sharding="zero1")),
    (dict(vocab=1024, hidden=256, layers=4, heads=4, seq_len=128), "dgx-a100-80gb", 8, 32, True,
     Constraints(schedule="1f1b", max_pp=2, tp=1)),
]


@pytest.mark.tier1
@pytest.mark.parametrize("case", SMALL, ids=[f"small{i}" for i in range(len(SMALL))])
def test_optimal_under_the_cost_model(case):
    kw, preset, devices, batch, ckpt, cons = case
    g = gpt_graph(**kw)
    hw = HardwareSpec.preset(preset, devices=devices)
    train = TrainSpec(global_batch_size=batch, allow_checkpointing=ckpt)
    want_t, want_k, want_stages, count = brute_force(g, hw, train, CostModelBackend(g, hw, train), cons)
    assert want_k is not None
    backend = CountingBackend(g, hw, train)
    plan = autoplan(None, hw, graph=g, train=train, constraints=cons, backend=backend)
    assert plan.predicted.step_time_s == pytest.approx(want_t, rel=1e-9), (
        f"planner {plan} {plan.predicted.step_time_s} vs brute force {want_k} {want_stages} {want_t}")
    assert backend.calls < count


def _small_memory(hw: HardwareSpec, gib: float) -> HardwareSpec:
    return hw.model_copy(update={"device": hw.device.model_copy(update={"memory_bytes": int(gib * 2**30)})})


@pytest.mark.tier1
@pytest.mark.parametrize("gib", [4, 5])
def test_memory_bound_free_plan_equals_the_best_pinned(gib):
    """A 0.8B GPT on 8 devices of 4 or 5 GiB: states alone (13 GB unsharded) decide what fits.
    The free plan equals the best of an exhaustive grid over every pinned sharding (which also
    reaches zero1/zero2/zero3 at dp = 1, outside the free space), offload allowed. At 5 GiB the
    answer is zero3 (unsharded plans do not fit at dp > 1; zero2 is slower)."""
    g = gpt_graph(vocab=1024, hidden=4096, layers=4, heads=32, seq_len=1024)
    hw = _small_memory(HardwareSpec.preset("dgx-a100-80gb", devices=8), gib)
    train = TrainSpec(global_batch_size=16, allow_checkpointing=False, allow_offload=True)
    best = {}
    for sharding in ("none", "zero1", "zero2", "zero3", "hsdp"):
        t, k, _stages, _count = brute_force(g, hw, train, CostModelBackend(g, hw, train), Constraints(sharding=sharding))
        best[sharding] = (t, k)
    want_t, want_k = min(best.values(), key=lambda x: x[0])
    plan = autoplan(None, hw, graph=g, train=train, backend=CostModelBackend(g, hw, train))
    assert plan.predicted.step_time_s == pytest.approx(want_t, rel=1e-9), (str(plan), str(want_k))
    if gib == 5:
        assert plan.data_parallel.sharding == "zero3" and best["zero2"][0] > want_t * 1.01
        assert best["none"][1].dp == 1  # no unsharded plan fits at dp > 1


@pytest.mark.tier1
def test_the_free_space_offers_sharding_at_dp1_exactly_where_the_runtime_runs_fsdp_there():
    """planner.space offers only sharding=none at dp = 1 because the runtime runs no FSDP2 there
    (runtime/data_parallel.py: apply_data_parallel returns the model as it is at dp = 1, and
    uses_fsdp is False, so training uses autocast): a zero2/zero3 plan at dp = 1 would run as
    sharding none, not as the cost model's FSDP terms (no autocast weight copy) predict. FSDP2 on
    a one-rank mesh does work (checked on gloo); when the runtime applies it at dp = 1, this test
    fails and the space should offer zero2/zero3 (and their offload) at dp = 1 too."""
    from planner.search import Search
    from runtime.data_parallel import uses_fsdp

    g = gpt_graph(vocab=1024, hidden=256, layers=4, heads=8, seq_len=128)
    hw = HardwareSpec.preset("dgx-a100-80gb", devices=8)
    train = TrainSpec(global_batch_size=16, allow_offload=True)
    pinned = autoplan(None, hw, graph=g, train=train, constraints=Constraints(dp=1, sharding="zero3"))
    assert pinned.mesh.dp == 1 and pinned.data_parallel.sharding == "zero3"
    free_at_dp1 = Search(g, hw, train, None, CostModelBackend(g, hw, train)).shardings(1, 8, 1)
    assert (free_at_dp1 != [("none", None, "none")]) == uses_fsdp(pinned)


@pytest.mark.tier1
def test_search_pauses_the_collector_and_leaves_no_cyclic_garbage(monkeypatch):
    """Search.run pauses the cyclic garbage collector while it scores (planner/search.py): safe
    only if scoring makes no reference cycles. Everything the search drops must be freed by
    reference counting alone, and the collector's state is restored after it."""
    import gc

    from planner.search import Search

    g = gpt_graph(vocab=1024, hidden=256, layers=4, heads=8, seq_len=128)
    hw = HardwareSpec.preset("dgx-a100-80gb", devices=16)
    train = TrainSpec(global_batch_size=32, allow_checkpointing=True)
    seen = {}
    run = Search._run

    def spy(self):
        seen["enabled"] = gc.isenabled()
        gc.collect()  # what was cyclic garbage before scoring started
        out = run(self)
        seen["cyclic"] = gc.collect()  # the collector is paused: any cycle scoring made is still here
        return out

    monkeypatch.setattr(Search, "_run", spy)
    assert gc.isenabled()
    plan = autoplan(None, hw, graph=g, train=train, backend=CostModelBackend(g, hw, train))
    assert plan.predicted.step_time_s > 0
    assert seen == {"enabled": False, "cyclic": 0}
    assert gc.isenabled()


EXPERTS = [
    Constraints(tp=8, pp=pp, sharding="none", schedule="interleaved_1f1b", virtual_stages=2,
                recompute="full", micro_batch_size=1, sequence_parallel=False, offload="none")
    for pp in (8, 16)
]


@pytest.mark.tier2
@pytest.mark.slow
def test_gpt3_175b_on_1024_a100_beats_the_experts():
    g = gpt_graph_from_config("gpt3-175b")
    hw = HardwareSpec.preset("dgx-a100-80gb", nodes=128)
    train = TrainSpec(global_batch_size=1536, precision="bf16")
    plan = autoplan(None, hw, graph=g, train=train)
    assert hw.devices_per_node % plan.mesh.tp == 0
    assert plan.predicted.fits and plan.predicted.peak_memory_bytes <= hw.device.memory_bytes
    assert len(plan.alternatives) == 10
    for cons in EXPERTS:
        ref = autoplan(None, hw, graph=g, train=train, constraints=cons)
        assert ref.search.candidates_scored == 1 + 1  # the pinned point + the DataParallel baseline
        assert plan.predicted.samples_per_s >= ref.predicted.samples_per_s * (1 - 1e-12)
