"""estimate_knobs' shared caches: results do not depend on what was scored before.

estimate_knobs shares work between candidates (stage results per composition, per-rank terms
between 1F1B and ZB-H1, data-parallel terms per parameter count across recompute / sp /
schedule, simulations per stage times, the per-rank pass as columns). These tests score a
candidate set in one context in two different orders and each candidate alone in a fresh
context, and require bit-identical estimates.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from cost_models import estimate_knobs
from cost_models.blocks import context
from cost_models.estimate import FRAGMENTATION_FRACTION
from cost_models.layout import _layout_for
from cost_models.memory import margin_bytes
from specs import HardwareSpec, Knobs, TrainSpec
from tests.graphs import gpt_graph

pytestmark = pytest.mark.tier1


@pytest.fixture(scope="module")
def graph():
    return gpt_graph(vocab=51200, hidden=2048, layers=10, heads=16, seq_len=1024)


def _stages(nb: int, n: int, rec: str, shift: bool) -> list[tuple[int, int, str]]:
    out, b = [], 0
    for j in range(n):
        c = nb // n + (1 if j < nb % n else 0)
        out.append((b, b + c - 1, rec))
        b += c
    if shift and n > 2:  # uneven: one block moves from stage 1 to stage 0
        (a0, b0, r0), (a1, b1, r1) = out[0], out[1]
        out[0], out[1] = (a0, b0 + 1, r0), (a1 + 1, b1, r1)
    return out


def _candidates(graph, world: int):
    out = []
    for tp, pp in ((1, 2), (2, 2), (1, 4), (2, 4), (1, 1), (2, 1)):
        dp = world // (tp * pp)
        for sharding, hsdp in (("none", None), ("zero1", None), ("zero2", None), ("zero3", None), ("hsdp", 2)):
            if sharding == "hsdp" and dp % 2:
                continue
            for sched, v in (("1f1b", 1), ("zero_bubble", 1), ("interleaved_1f1b", 2), ("gpipe", 1)):
                if pp == 1 and sched != "1f1b":
                    continue
                for rec in ("none", "selective", "full"):
                    for m in (pp, 4 * pp):
                        for shift in (False, True):
                            k = Knobs(pp=pp, dp=dp, tp=tp, sharding=sharding, hsdp_shard_size=hsdp,
                                      micro_batch_size=1, num_micro_batches=m, schedule=sched, virtual_stages=v,
                                      recompute=rec, sequence_parallel=tp > 1,
                                      offload="cpu" if (sharding == "zero3" and shift) else "none")
                            out.append((k, _stages(graph.num_blocks, pp * v, rec, shift)))
    return out


def _fields(e) -> dict:
    return {f.name: getattr(e, f.name) for f in dataclasses.fields(e)}


@pytest.mark.parametrize("preset,nodes", [("dgx-a100-80gb", 2), ("dgx-h100-80gb", 1)])
def test_estimates_do_not_depend_on_scoring_order(graph, preset, nodes):
    train = TrainSpec(global_batch_size=64)
    probe = HardwareSpec.preset(preset, nodes)
    cands = _candidates(graph, probe.num_devices)
    hw_a = HardwareSpec.preset(preset, nodes)  # a fresh object: its own cache context
    first = [_fields(estimate_knobs(graph, k, s, hw_a, train)) for k, s in cands]
    order = list(range(len(cands)))
    random.Random(7).shuffle(order)
    hw_b = HardwareSpec.preset(preset, nodes)
    second = {i: _fields(estimate_knobs(graph, *cands[i], hw_b, train)) for i in order}
    for i, e in enumerate(first):
        assert e == second[i], str(cands[i][0])
    # details read late: every candidate scored first (only the score's fields read), then the
    # other fields of each, computed on access from what its call kept (StepEstimate.__getattr__)
    hw_c = HardwareSpec.preset(preset, nodes)
    unread = [estimate_knobs(graph, k, s, hw_c, train) for k, s in cands]
    assert all(object.__getattribute__(e, "_pending") is not None for e in unread)
    for i, e in enumerate(unread):
        assert (e.step_time_s, e.peak_memory_bytes, e.fits) == (first[i]["step_time_s"],
                                                                  first[i]["peak_memory_bytes"], first[i]["fits"])
    for i in reversed(order):
        assert _fields(unread[i]) == first[i], str(cands[i][0])
    # a sample scored alone, each in an empty context
    for i in order[:40]:
        alone = _fields(estimate_knobs(graph, *cands[i], HardwareSpec.preset(preset, nodes), train))
        assert alone == first[i], str(cands[i][0])


def test_1f1b_and_zero_bubble_share_rank_terms(graph):
    hw = HardwareSpec.preset("dgx-a100-80gb", 1)
    train = TrainSpec(global_batch_size=64)
    ctx = context(graph, hw, train)
    stages = _stages(graph.num_blocks, 4, "none", False)
    lays = []
    for sched in ("1f1b", "zero_bubble"):
        k = Knobs(pp=4, dp=2, tp=1, sharding="zero3", micro_batch_size=1, num_micro_batches=8, schedule=sched)
        lays.append(_layout_for(ctx, graph, k, stages, hw)[0])
    a, b = lays
    assert a is not b and a.times != b.times  # the split backward changes the stage times ...
    assert a.ranks == b.ranks and all(x is y for x, y in zip(a.ranks, b.ranks, strict=True))  # ... not the ranks


def test_unrolled_margin_is_margin_bytes():
    # estimate_knobs computes FRAGMENTATION_FRACTION * x + margin_bytes(0, capacity) per rank
    rng = random.Random(3)
    for _ in range(2000):
        cap = rng.choice([16.0, 24.0, 40.0, 80.0, 141.0]) * 2**30 * rng.uniform(0.5, 1.5)
        x = rng.uniform(0, 2) * cap
        assert FRAGMENTATION_FRACTION * x + margin_bytes(0.0, cap) == margin_bytes(x, cap)


def test_per_rank_columns_match_per_rank_terms(graph):
    hw = HardwareSpec.preset("dgx-a100-80gb", 2)
    train = TrainSpec(global_batch_size=64)
    k = Knobs(pp=4, dp=2, tp=2, sharding="zero1", micro_batch_size=1, num_micro_batches=8,
              schedule="interleaved_1f1b", virtual_stages=2, recompute="selective", sequence_parallel=True)
    stages = _stages(graph.num_blocks, 8, "selective", True)
    e = estimate_knobs(graph, k, stages, hw, train)
    lay, _ = _layout_for(context(graph, hw, train), graph, k, stages, hw)
    cap = float(hw.device.memory_bytes)
    for r, (rk, js) in enumerate(zip(lay.ranks, lay.rank_stages, strict=True)):
        acts = 0.0
        for j, a in zip(js, rk.activation, strict=True):
            acts += lay.sims[("interleaved_1f1b", 8)].peak_in_flight_per_stage[j] * a
        dynamic = max(acts + rk.trans_b, rk.opt_tmp_b)
        static = rk.param_b + rk.grad_b + rk.opt_b
        total = static + dynamic + margin_bytes(static + dynamic, cap)
        assert e.memory_per_rank_bytes[r] == total
        assert e.memory_by_rank_raw[r] == (rk.param_b, rk.grad_b, rk.opt_b, acts, dynamic - acts,
                                           margin_bytes(static + dynamic, cap))


def test_details_on_first_access_behave_as_fields(graph):
    """StepEstimate from estimate_knobs: the score's fields set, the others on first access; the
    object still behaves as the frozen dataclass (equality, copy, pickle, replace, errors)."""
    import copy
    import pickle

    from cost_models.estimate import _DETAIL_FIELDS, SCORE_FIELDS, StepEstimate

    assert set(SCORE_FIELDS) | set(_DETAIL_FIELDS) == {f.name for f in dataclasses.fields(StepEstimate)} - {"_pending"}
    hw = HardwareSpec.preset("dgx-a100-80gb", 1)
    train = TrainSpec(global_batch_size=64)
    k = Knobs(pp=2, dp=2, tp=2, sharding="zero2", micro_batch_size=1, num_micro_batches=8, schedule="1f1b",
              recompute="selective", sequence_parallel=True)
    stages = _stages(graph.num_blocks, 2, "selective", False)
    e = estimate_knobs(graph, k, stages, hw, train)
    assert type(e) is StepEstimate
    for name in _DETAIL_FIELDS:  # slots still empty
        with pytest.raises(AttributeError):
            object.__getattribute__(e, name)
    with pytest.raises(AttributeError, match="no attribute 'not_a_field'"):
        _ = e.not_a_field
    assert not hasattr(e, "not_a_field") and object.__getattribute__(e, "_pending") is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.step_time_s = 1.0
    # copies and pickles carry every field (they are computed on the way)
    for other in (copy.copy(e), copy.deepcopy(e), pickle.loads(pickle.dumps(e))):
        assert type(other) is StepEstimate and _fields(other) == _fields(e)
    assert object.__getattribute__(e, "_pending") is None  # filled once, the inputs released
    r = dataclasses.replace(e, step_time_s=2 * e.step_time_s)
    assert r.step_time_s == 2 * e.step_time_s and r.time_breakdown_s == e.time_breakdown_s
    assert e == estimate_knobs(graph, k, stages, HardwareSpec.preset("dgx-a100-80gb", 1), train)
    assert sum(e.time_breakdown_s.values()) == pytest.approx(e.step_time_s, rel=1e-12)
    assert e.to_prediction().step_time_s == e.step_time_s


def test_clear_caches_forgets_everything_and_changes_no_estimate(graph):
    """cost_models.clear_caches(): the memos are empty afterwards and the estimates are the same
    (benchmarks/cost_bench.py times its cold passes after it)."""
    from cost_models import blocks, clear_caches, layout, periodic, simulator

    hw = HardwareSpec.preset("dgx-a100-80gb", 1)
    train = TrainSpec(global_batch_size=64)
    cands = [c for c in _candidates(graph, hw.num_devices) if c[0].pp > 1][:40]
    before = [_fields(estimate_knobs(graph, k, s, hw, train)) for k, s in cands]
    assert simulator._CACHE and blocks._CONTEXTS
    clear_caches()
    assert not simulator._CACHE and not blocks._CONTEXTS and not layout._NOTES and not periodic._BY_M
    assert simulator._compiled.cache_info().currsize == 0
    after = [_fields(estimate_knobs(graph, k, s, hw, train)) for k, s in cands]
    assert after == before
