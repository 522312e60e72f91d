"""cost_models.CostModel: one object owns every memo; results do not depend on what it was asked
before, and nothing is cached at module level.

A CostModel shares work between candidates (block costs per setting, stage terms per
composition, rank terms between 1F1B and ZB-H1, data-parallel terms per parameter count,
simulations per stage times). These tests score a candidate set on one CostModel in two orders
and each candidate alone on a fresh one, and require bit-identical estimates; and they check
that scoring leaves no state behind in any cost_models module.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import pickle
import pkgutil
import random

import pytest

import cost_models
from cost_models import CostModel, estimate_knobs
from cost_models.memory import FRAGMENTATION_FRACTION, margin_bytes
from cost_models.stages import layout
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
        if world % (tp * pp):
            continue
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
def test_estimates_do_not_depend_on_what_was_asked_before(graph, preset, nodes):
    train = TrainSpec(global_batch_size=64)
    hw = HardwareSpec.preset(preset, nodes)
    cands = _candidates(graph, hw.num_devices)
    one = CostModel(graph, hw, train)
    first = [_fields(one.estimate(k, s)) for k, s in cands]
    order = list(range(len(cands)))
    random.Random(7).shuffle(order)
    other = CostModel(graph, hw, train)
    second = {i: _fields(other.estimate(*cands[i])) for i in order}
    for i, e in enumerate(first):
        assert e == second[i], str(cands[i][0])
    for i in order[:40]:  # a sample, each on a fresh CostModel
        assert _fields(CostModel(graph, hw, train).estimate(*cands[i])) == first[i], str(cands[i][0])


def _module_state() -> dict:
    """Sizes of every mutable container and lru_cache held by a cost_models module."""
    state = {}
    for info in pkgutil.iter_modules(cost_models.__path__):
        if info.name == "jit":  # numba (optional); its module holds only kernels
            continue
        mod = importlib.import_module(f"cost_models.{info.name}")
        for name, value in vars(mod).items():
            if isinstance(value, (dict, list, set)):
                state[f"{info.name}.{name}"] = len(value)
            elif hasattr(value, "cache_info"):
                state[f"{info.name}.{name}"] = value.cache_info().currsize
    return state


def test_no_module_level_memo(graph):
    """Scoring many candidates (shared host included) changes no container at module level: every
    memo lives in a CostModel and goes with it."""
    before = _module_state()
    train = TrainSpec(global_batch_size=64)
    cm = CostModel(graph, HardwareSpec.preset("dgx-a100-80gb", 2), train)
    for k, s in _candidates(graph, 16)[::7]:
        cm.estimate(k, s)
        cm.lower_bound(k, s)
    cpu = CostModel(graph, HardwareSpec.preset("cpu", devices=4), TrainSpec(global_batch_size=8))
    for k, s in _candidates(graph, 4)[::11]:
        cpu.estimate(k, s)
    assert cm.stage_memo and cm.simulation_memo and cpu.unshared.stage_memo  # the memos are the model's ...
    assert _module_state() == before  # ... and nothing grew elsewhere


def test_1f1b_and_zero_bubble_share_rank_terms(graph):
    cm = CostModel(graph, HardwareSpec.preset("dgx-a100-80gb", 1), TrainSpec(global_batch_size=64))
    stages = _stages(graph.num_blocks, 4, "none", False)
    lays = []
    for sched in ("1f1b", "zero_bubble"):
        k = Knobs(pp=4, dp=2, tp=1, sharding="zero3", micro_batch_size=1, num_micro_batches=8, schedule=sched)
        lays.append(layout(cm, k, stages))
    a, b = lays
    assert a is not b and a.times != b.times  # the split backward changes the stage times ...
    assert all(x is y for x, y in zip(a.ranks, b.ranks, strict=True))  # ... not the ranks


def test_unrolled_margin_is_margin_bytes():
    # the estimate computes FRAGMENTATION_FRACTION * x + margin_bytes(0, capacity) per rank
    rng = random.Random(3)
    for _ in range(2000):
        cap = rng.choice([16.0, 24.0, 40.0, 80.0, 141.0]) * 2**30 * rng.uniform(0.5, 1.5)
        x = rng.uniform(0, 2) * cap
        assert FRAGMENTATION_FRACTION * x + margin_bytes(0.0, cap) == margin_bytes(x, cap)


def test_memory_per_rank_is_its_rank_terms(graph):
    hw = HardwareSpec.preset("dgx-a100-80gb", 2)
    cm = CostModel(graph, hw, TrainSpec(global_batch_size=64))
    k = Knobs(pp=4, dp=2, tp=2, sharding="zero1", micro_batch_size=1, num_micro_batches=8,
              schedule="interleaved_1f1b", virtual_stages=2, recompute="selective", sequence_parallel=True)
    stages = _stages(graph.num_blocks, 8, "selective", True)
    e = cm.estimate(k, stages)
    lay = layout(cm, k, stages)
    sim = cm.simulate(lay.schedule, 4, 8, 2, lay.times, lay.times_id)
    cap = float(hw.device.memory_bytes)
    for r, rk in enumerate(lay.ranks):
        acts = 0.0
        for j, a in zip(range(r, 8, 4), rk.activation_bytes, strict=True):
            acts += sim.peak_in_flight_per_stage[j] * a
        dynamic = max(acts + rk.transient_bytes, rk.optimizer_temp_bytes)
        static = rk.param_bytes + rk.grad_bytes + rk.optimizer_bytes
        total = static + dynamic + margin_bytes(static + dynamic, cap)
        assert e.memory_per_rank_bytes[r] == total
        assert e.memory_by_rank_raw[r] == (rk.param_bytes, rk.grad_bytes, rk.optimizer_bytes, acts,
                                           dynamic - acts, margin_bytes(static + dynamic, cap))


def test_step_estimate_is_a_plain_frozen_dataclass(graph):
    hw = HardwareSpec.preset("dgx-a100-80gb", 1)
    train = TrainSpec(global_batch_size=64)
    k = Knobs(pp=2, dp=2, tp=2, sharding="zero2", micro_batch_size=1, num_micro_batches=8, schedule="1f1b",
              recompute="selective", sequence_parallel=True)
    stages = _stages(graph.num_blocks, 2, "selective", False)
    e = estimate_knobs(graph, k, stages, hw, train)
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.step_time_s = 1.0
    for other in (copy.copy(e), copy.deepcopy(e), pickle.loads(pickle.dumps(e))):
        assert _fields(other) == _fields(e)
    assert e == CostModel(graph, hw, train).estimate(k, stages)
    assert sum(e.time_breakdown_s.values()) == pytest.approx(e.step_time_s, rel=1e-12)
    assert e.to_prediction().step_time_s == e.step_time_s
