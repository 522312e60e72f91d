"""One rule says which engine runs a plan's data parallelism (cost_models.engines), and both the
runtime and the cost model follow it: no DDP bucket copy and no gradient all-reduce where no
data-parallel engine runs (dp = 1), whatever the sharding."""

from __future__ import annotations

import pytest
from torch import nn

import runtime.data_parallel as rdp
from cost_models import estimate_knobs
from cost_models.engines import data_parallel_engine
from cost_models.memory import bytes_per_param
from specs import HardwareSpec, Knobs, TrainSpec
from tests.graphs import gpt_graph
from tests.plan_builders import make_plan

pytestmark = pytest.mark.tier1


@pytest.mark.parametrize(("dp", "tp", "pp", "sharding", "engine"), [
    (1, 1, 1, "none", "none"),
    (1, 8, 8, "none", "none"),  # GPT-3 175B at tp8 pp8 on 64 GPUs: no replica, no DDP
    (1, 1, 1, "zero1", "none"),
    (1, 2, 1, "zero3", "none"),  # one replica: nothing to shard, the runtime wraps nothing
    (2, 1, 1, "none", "ddp"),
    (2, 2, 1, "none", "fsdp2_replicate"),  # DDP takes no DTensor parameters
    (2, 1, 2, "none", "fsdp2_replicate"),  # nor a pipeline schedule
    (4, 1, 1, "zero1", "zero_redundancy"),
    (2, 1, 1, "zero2", "fully_shard"),
    (2, 4, 2, "zero3", "fully_shard"),
    (4, 1, 1, "hsdp", "fully_shard"),
])
def test_engine_table(dp, tp, pp, sharding, engine):
    assert data_parallel_engine(Knobs(pp=pp, dp=dp, tp=tp, sharding=sharding)) == engine


def test_runtime_uses_the_same_rule():
    """The runtime imports the rule; it keeps no copy of its own."""
    assert rdp.data_parallel_engine is data_parallel_engine
    assert not hasattr(rdp, "_ddp_ok")
    for kw in ({"tp": 2}, {"pp": 2}, {}):
        for sharding in ("none", "zero2"):
            plan = make_plan("gpt-tiny", dp=2, sharding=sharding, **kw)
            assert rdp.uses_fsdp(plan) == (data_parallel_engine(plan.knobs()) != "ddp")


@pytest.mark.parametrize("sharding", ["none", "zero1"])
def test_runtime_wraps_nothing_at_dp1(sharding):
    model = nn.Linear(4, 4)
    plan = make_plan("gpt-tiny", dp=1, sharding=sharding)
    assert rdp.apply_data_parallel(model, None, plan) is model  # no process group needed: no engine
    assert not rdp.uses_fsdp(plan)


def _estimate(g, *, dp, tp=1, pp=1, sharding="none"):
    hw = HardwareSpec.preset("dgx-a100-80gb", devices=dp * tp * pp)
    tr = TrainSpec(global_batch_size=8, precision="bf16")
    per = g.num_blocks // pp
    stages = [(i * per, (i + 1) * per - 1 if i < pp - 1 else g.num_blocks - 1, "none") for i in range(pp)]
    k = Knobs(pp=pp, dp=dp, tp=tp, sharding=sharding, micro_batch_size=1, num_micro_batches=8 // dp)
    return estimate_knobs(g, k, stages, hw, tr)


@pytest.fixture(scope="module")
def graph():
    return gpt_graph(vocab=1024, hidden=512, layers=4, heads=8, seq_len=256)


def test_dp1_charges_no_bucket_copy_and_no_all_reduce(graph):
    """DDP at dp = 2 adds exactly one gradient copy (4 bytes per parameter, torch's Reducer buckets)
    to the transient memory of dp = 1, where no engine runs; dp = 1 moves no gradient bytes."""
    one, two = _estimate(graph, dp=1), _estimate(graph, dp=2)
    grad = bytes_per_param("bf16", "adamw").grad
    assert two.memory_bytes["transient"] - one.memory_bytes["transient"] == pytest.approx(graph.num_params * grad)
    assert one.time_breakdown_s["dp_comm_s"] == 0.0
    assert "dp" not in one.comm or one.comm["dp"].volume_bytes == 0.0
    assert two.time_breakdown_s["dp_comm_s"] > 0.0


@pytest.mark.parametrize("kw", [{"tp": 2}, {"pp": 2}])
def test_dp1_with_model_parallelism_is_engine_free_for_every_sharding(graph, kw):
    """With tp or pp and one replica, sharding none and zero1 both run no engine: the same memory."""
    a, b = _estimate(graph, dp=1, **kw), _estimate(graph, dp=1, sharding="zero1", **kw)
    assert a.memory_bytes == b.memory_bytes
    grad = bytes_per_param("bf16", "adamw").grad
    rank_params = graph.num_params / (kw.get("tp", 1) * kw.get("pp", 1))
    assert a.memory_bytes["transient"] < rank_params * grad  # not even one gradient copy


def test_dp1_offload_is_not_charged_where_the_runtime_does_not_offload(graph):
    """The runtime offloads through FSDP2 only; at dp = 1 it wraps nothing, so offload=cpu moves no
    optimizer state off the device and costs no transfer: the same estimate as without it."""
    hw = HardwareSpec.preset("dgx-a100-80gb", devices=1)
    tr = TrainSpec(global_batch_size=8, precision="bf16")
    stages = [(0, graph.num_blocks - 1, "none")]
    on, off = (estimate_knobs(graph, Knobs(pp=1, dp=1, tp=1, sharding="zero3", offload=o, micro_batch_size=1,
                                           num_micro_batches=8), stages, hw, tr) for o in ("cpu", "none"))
    assert on.memory_bytes == off.memory_bytes
    assert on.step_time_s == off.step_time_s
    assert on.time_breakdown_s["offload_s"] == 0.0
