"""Tier 1: the search's logic against brute force, on a stand-in cost model (tests/planner_fakes).

The same optimality check against the real cost models is in test_planner_optimal.py.
"""

from __future__ import annotations

import random
from itertools import combinations

import pytest

from planner.api import autoplan, plan_from_knobs
from planner.partition import ModeCosts, Partitioner, even_partition
from planner.scoring import inflight_closed_form
from specs import Constraints, HardwareSpec, Knobs, Plan, SpecError, TrainSpec
from tests.planner_brute import brute_force
from tests.planner_fakes import FakeBackend, toy_graph

pytestmark = pytest.mark.tier1


def hw_with_memory(preset: str, devices: int, memory_bytes: int | None = None, **kw) -> HardwareSpec:
    hw = HardwareSpec.preset(preset, devices=devices, **kw)
    if memory_bytes is not None:
        hw = hw.model_copy(update={"device": hw.device.model_copy(update={"memory_bytes": memory_bytes})})
    return hw


def plan_with_fake(graph, hw, train, constraints=None):
    backend = FakeBackend(graph, hw, train)
    return autoplan(None, hw, graph=graph, train=train, constraints=constraints, backend=backend), backend


# ---------------------------------------------------------------------------- partition DP
def _brute_partition(part: Partitioner, ends, inflight, budget):
    best = None
    for cut in combinations(range(len(ends) - 1), len(inflight) - 1):
        bounds = [ends[i] for i in cut] + [ends[-1]]
        first, worst = 0, 0.0
        ok = True
        for j, b in enumerate(bounds):
            opts = [part.stage_cost(first, b, mi, inflight[j]) for mi in range(len(part.modes))]
            fit = [t for t, m in opts if m <= budget]
            if not fit:
                ok = False
                break
            worst = max(worst, min(fit))
            first = b + 1
        if ok and (best is None or worst < best):
            best = worst
    return best


@pytest.mark.parametrize("seed", range(40))
def test_partition_is_min_max_optimal(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 10)
    ends = sorted(rng.sample(range(n - 1), rng.randint(1, n - 1))) + [n - 1]
    stages = rng.randint(1, len(ends))
    base = [rng.uniform(0.5, 3.0) for _ in range(n)]
    act = [rng.uniform(1, 10) for _ in range(n)]
    modes = [
        ModeCosts("none", tuple(base), tuple(act)),
        ModeCosts("selective", tuple(b * 1.1 for b in base), tuple(a * 0.6 for a in act)),
        ModeCosts("full", tuple(b * 1.33 for b in base), tuple(a * 0.1 for a in act)),
    ]
    state = [rng.uniform(1, 5) for _ in range(n)]
    part = Partitioner(modes, state, ends)
    inflight = [float(max(1, stages - j)) for j in range(stages)]
    budget = rng.uniform(5, 60)
    want = _brute_partition(part, ends, inflight, budget)
    got = part.solve(inflight, budget)
    if want is None:
        assert got is None
    else:
        assert got is not None
        assert got.bottleneck_s == pytest.approx(want, rel=1e-6)
        assert all(m <= budget * (1 + 1e-9) for m in got.stage_memory_bytes)
        assert [s[1] for s in got.stages][-1] == n - 1
        assert all(s[1] in ends for s in got.stages)
    # memory-free, fastest mode only
    one = Partitioner(modes[:1], state, ends)
    want_free = _brute_partition(one, ends, inflight, float("inf"))
    free = part.solve_free(stages)
    assert free.bottleneck_s == pytest.approx(want_free, rel=1e-9)
    assert free.bottleneck_s == pytest.approx(one.solve(inflight, float("inf")).bottleneck_s, rel=1e-9)


def test_even_partition_counts_and_cuts():
    assert even_partition(8, 4, list(range(8))) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    got = even_partition(10, 3, [1, 3, 5, 7, 9])
    assert got[0][0] == 0 and got[-1][1] == 9 and len(got) == 3
    with pytest.raises(ValueError):
        even_partition(4, 5, [0, 1, 2, 3])


def test_inflight_closed_forms():
    assert inflight_closed_form("gpipe", 4, 8, 1) == (8.0,) * 4
    assert inflight_closed_form("1f1b", 4, 8, 1) == (4.0, 3.0, 2.0, 1.0)
    assert inflight_closed_form("1f1b", 4, 2, 1) == (2.0, 2.0, 2.0, 1.0)
    assert len(inflight_closed_form("interleaved_1f1b", 2, 4, 2)) == 4


# ---------------------------------------------------------------------------- optimal vs brute force
CASES = [
    # (layers, devices, per-node, batch, memory GiB or None, allow_checkpointing, constraints)
    (6, 8, 8, 8, None, False, None),
    (6, 8, 4, 16, None, False, None),
    (4, 4, 4, 32, None, False, None),
    (6, 8, 8, 8, 0.2, False, None),
    (10, 16, 8, 16, None, False, Constraints(max_pp=4, sharding="zero1")),
    (6, 4, 4, 64, 0.12, True, Constraints(schedule="1f1b", max_pp=2)),
    (6, 8, 8, 64, 0.10, True, Constraints(pp=2, tp=1, schedule="gpipe")),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_search_matches_brute_force(case):
    layers, devices, per_node, batch, mem_gib, ckpt, cons = case
    g = toy_graph(num_layers=layers, seq=256 if mem_gib else 128)
    hw = hw_with_memory("dgx-a100-80gb", devices, int(mem_gib * 2**30) if mem_gib else None)
    if per_node != hw.devices_per_node:
        hw = hw.model_copy(update={"devices_per_node": per_node, "num_nodes": devices // per_node})
    train = TrainSpec(global_batch_size=batch, allow_checkpointing=ckpt)
    want_t, want_k, want_stages, count = brute_force(g, hw, train, FakeBackend(g, hw, train), cons)
    assert want_k is not None, "test case must have a fitting point"
    plan, backend = plan_with_fake(g, hw, train, cons)
    assert plan.predicted.step_time_s == pytest.approx(want_t, rel=1e-9), (
        f"planner {plan} {plan.predicted.step_time_s} vs brute force {want_k} {want_stages} {want_t}"
    )
    assert backend.calls < count, "the search should score fewer points than brute force"


def test_checkpointing_is_used_when_memory_is_tight():
    g = toy_graph(num_layers=6, seq=256)
    hw = hw_with_memory("dgx-a100-80gb", 4, int(0.12 * 2**30))
    train = TrainSpec(global_batch_size=64)
    plan, _ = plan_with_fake(g, hw, train, Constraints(schedule="1f1b", max_pp=2))
    assert any(s.recompute != "none" for s in plan.pipeline.stages)
    assert plan.predicted.peak_memory_bytes <= hw.device.memory_bytes


# ---------------------------------------------------------------------------- constraints
def test_pinning_every_knob_scores_one_configuration():
    g = toy_graph()
    hw = hw_with_memory("dgx-a100-80gb", 8)
    train = TrainSpec(global_batch_size=16)
    pins = Constraints(pp=2, dp=2, tp=2, sharding="zero2", micro_batch_size=2, num_micro_batches=4,
                       schedule="interleaved_1f1b", virtual_stages=2, recompute="selective",
                       sequence_parallel=True, offload="none")
    plan, backend = plan_with_fake(g, hw, train, pins)
    k = plan.knobs()
    assert (k.pp, k.dp, k.tp, k.sharding, k.micro_batch_size, k.num_micro_batches) == (2, 2, 2, "zero2", 2, 4)
    assert (k.schedule, k.virtual_stages, k.recompute, k.sequence_parallel) == ("interleaved_1f1b", 2, "selective", True)
    # one knob configuration; the primer baselines are scored too
    assert plan.search.candidates_scored == 1 + 2
    assert plan.alternatives == []


def test_bounds_and_tp_within_node_are_respected():
    g = toy_graph(heads=16, hidden=512)
    hw = hw_with_memory("dgx-a100-80gb", 32)
    train = TrainSpec(global_batch_size=32)
    plan, _ = plan_with_fake(g, hw, train, Constraints(max_tp=4, max_pp=2))
    assert plan.mesh.tp <= 4 and plan.mesh.pp <= 2
    for alt in plan.alternatives:
        assert alt.knobs.tp <= 4 and alt.knobs.pp <= 2
    plan, _ = plan_with_fake(g, hw, train)
    assert hw.devices_per_node % plan.mesh.tp == 0
    reasons = {r.region: r.reason for r in plan.rejected}
    assert reasons["tp=16"] == "tp=16 crosses nodes (8 devices per node); allow with constraints.tp_across_nodes"


def test_tp_must_divide_heads():
    g = toy_graph(heads=6, hidden=384)
    hw = hw_with_memory("dgx-a100-80gb", 8)
    plan, _ = plan_with_fake(g, hw, TrainSpec(global_batch_size=8))
    assert plan.mesh.tp in (1, 2)
    reasons = {r.region: r.reason for r in plan.rejected}
    assert "divisor 6" in reasons["tp=4"] and "divisor 6" in reasons["tp=8"]


def test_memory_rejections_carry_numbers():
    g = toy_graph(num_layers=6, hidden=1024, heads=16, vocab=8192)
    hw = hw_with_memory("dgx-a100-80gb", 8, int(0.5 * 2**30))
    plan, _ = plan_with_fake(g, hw, TrainSpec(global_batch_size=8))
    mem = [r for r in plan.rejected if "model states alone need" in r.reason]
    assert mem, [r.reason for r in plan.rejected]
    assert all("GiB >" in r.reason for r in mem)


def test_nothing_fits_raises_with_smallest_memory_and_closest():
    g = toy_graph(num_layers=6, hidden=1024, heads=16, vocab=8192)
    hw = hw_with_memory("dgx-a100-80gb", 2, int(0.01 * 2**30))
    with pytest.raises(SpecError) as err:
        plan_with_fake(g, hw, TrainSpec(global_batch_size=8))
    msg = str(err.value)
    assert "no configuration fits" in msg and "closest" in msg and "GiB" in msg


def test_deterministic():
    g = toy_graph(num_layers=8)
    hw = hw_with_memory("dgx-a100-80gb", 16)
    train = TrainSpec(global_batch_size=32)
    a, _ = plan_with_fake(g, hw, train)
    b, _ = plan_with_fake(g, hw, train)
    strip = {"search"}
    assert a.model_dump(exclude=strip) == b.model_dump(exclude=strip)


def test_alternatives_ranked_distinct_with_notes():
    g = toy_graph(num_layers=8)
    hw = hw_with_memory("dgx-a100-80gb", 16)
    plan, _ = plan_with_fake(g, hw, TrainSpec(global_batch_size=32))
    alts = plan.alternatives
    assert len(alts) == 10
    times = [a.step_time_s for a in alts]
    assert times == sorted(times) and times[0] >= plan.predicted.step_time_s
    keys = {(a.knobs.pp, a.knobs.dp, a.knobs.tp, a.knobs.sharding, a.knobs.hsdp_shard_size,
             a.knobs.schedule, a.knobs.virtual_stages) for a in alts}
    assert len(keys) == len(alts)
    assert all(a.note.startswith(("+", "ties")) for a in alts)
    regions = " ".join(r.region for r in plan.rejected)
    assert "layer-wise model parallelism" in regions and "nn.DataParallel" in regions
    assert plan.search.candidates_scored > 0 and plan.search.candidates_pruned > 0


def test_plan_round_trips_and_styles(tmp_path):
    g = toy_graph()
    hw = hw_with_memory("dgx-a100-80gb", 8)
    plan, _ = plan_with_fake(g, hw, TrainSpec(global_batch_size=8), Constraints(tp=4, sequence_parallel=True))
    st = plan.tensor_parallel.styles
    assert st["layers.*.attn.q_proj"] == "colwise" and st["layers.*.attn.o_proj"] == "rowwise"
    assert st["layers.*.mlp.up_proj"] == "colwise" and st["layers.*.mlp.down_proj"] == "rowwise"
    assert st["embed.tok"] == "vocab" and st["head.lm_head"] == "colwise"
    path = tmp_path / "plan.yaml"
    plan.to_file(path)
    assert Plan.from_file(path) == plan


def test_plan_from_knobs_even_partition_and_errors():
    g = toy_graph(num_layers=6)
    hw = hw_with_memory("dgx-a100-80gb", 8)
    train = TrainSpec(global_batch_size=8)
    k = Knobs(pp=4, dp=2, tp=1, micro_batch_size=1, num_micro_batches=4, schedule="1f1b")
    plan = plan_from_knobs(g, hw, train, k, backend=FakeBackend(g, hw, train))
    assert [(s.first, s.last) for s in plan.pipeline.stages] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert plan.predicted is not None and plan.predicted.step_time_s > 0
    with pytest.raises(SpecError, match="global_batch_size"):
        plan_from_knobs(g, hw, train, k.model_copy(update={"num_micro_batches": 3}),
                        backend=FakeBackend(g, hw, train))
