"""Tier 1: the tracer and the planner on structures real models have (tests/structure_models.py).

Each of these was once planned and then trained to wrong numbers or crashed (issue 18): a fused
q/k/v projection split along its features was sharded colwise as if it were one projection,
per-head norms inside attention kept per-rank gradients, zero_bubble with a resharding FSDP2 drifted.
The equality runs are tests/coverage_cases.py (tier 3); here: what the tracer offers, what the
planner returns and what the runtime refuses, without processes.
"""

from __future__ import annotations

import pytest
import torch

from planner import plan_from_knobs, trace
from planner.api import autoplan
from planner.capabilities import (
    knob_problem,
    pipeline_tp_problem,
    schedule_problem,
    sequence_parallel_problem,
)
from runtime.pipeline import validate_pipeline
from specs import Constraints, HardwareSpec, Knobs, SpecError, TrainSpec
from tests.plan_builders import make_plan
from tests.structure_models import build_structure

FUSED = ("fused_chunk", "fused_split", "fused_gqa")


@pytest.fixture(scope="module")
def graphs():
    out = {}
    for v in (*FUSED, "fused_heads", "head_norm", "rotary_shared"):
        model, x = build_structure(v)
        out[v] = trace(model, x, name=v)
    return out


def _layer(graph):
    (lt,) = [lt for lt in graph.layer_types.values() if lt.module_type == "Layer"]
    return lt


@pytest.mark.tier1
@pytest.mark.parametrize("variant", FUSED)
def test_feature_split_fused_qkv_gets_no_head_split(graphs, variant):
    lt = _layer(graphs[variant])
    kinds = [c.kind for c in lt.tp_candidates]
    assert "attention" not in kinds and "mlp" in kinds  # the MLP still splits
    assert "attn.qkv" in lt.unsplit_attention and "q|k|v" in lt.unsplit_attention
    assert all(op.tp_split == "replicate" for op in lt.ops if op.kind == "softmax")
    assert sequence_parallel_problem(graphs[variant]) is not None


@pytest.mark.tier1
def test_per_head_fused_layout_is_split_by_heads(graphs):
    """view(B, T, -1, 3d) then chunk inside each head (Megatron/GPT-NeoX): colwise keeps whole heads."""
    lt = _layer(graphs["fused_heads"])
    (attn,) = [c for c in lt.tp_candidates if c.kind == "attention"]
    assert attn.modules == {"attn.qkv": "colwise", "attn.o_proj": "rowwise"}
    assert lt.unsplit_attention is None


@pytest.mark.tier1
def test_per_head_norms_get_their_style(graphs):
    lt = _layer(graphs["head_norm"])
    (attn,) = [c for c in lt.tp_candidates if c.kind == "attention"]
    assert attn.modules["attn.q_norm"] == attn.modules["attn.k_norm"] == "head_norm"
    assert attn.modules["attn.q_proj"] == "colwise" and attn.modules["attn.o_proj"] == "rowwise"
    assert sequence_parallel_problem(graphs["head_norm"]) is None


@pytest.mark.tier1
def test_no_sequence_parallelism_when_a_block_derives_shared_values_from_the_stream(graphs):
    """rotary_shared computes its rotary table from the hidden states' length in a block of its own
    and hands it to every layer: under sp that block sees its rank's tokens (the planned-runnable
    sweep's tp=2 + sp points crashed with "size of tensor a (16) must match ... b (8)")."""
    why = sequence_parallel_problem(graphs["rotary_shared"])
    assert why is not None and "'rotary'" in why


@pytest.mark.tier1
def test_non_linear_projection_is_not_styled():
    """GPT-2's Conv1D (not an nn.Linear): no colwise/rowwise style the runtime would refuse."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                  use_cache=False, attn_implementation="eager", bos_token_id=0,
                                  eos_token_id=0)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(cfg)
    g = trace(model, (torch.zeros(1, 16, dtype=torch.long, device="meta"),), name="gpt2")
    (block,) = [lt for lt in g.layer_types.values() if "GPT2Block" in lt.module_type]
    assert block.tp_candidates == []
    assert "Conv1D" in block.unsplit_attention


@pytest.mark.tier1
@pytest.mark.parametrize("variant", FUSED)
def test_planner_never_pairs_sequence_parallel_with_a_whole_attention(graphs, variant):
    g = graphs[variant]
    hw = HardwareSpec.preset("cpu", devices=4)
    train = TrainSpec(global_batch_size=8, precision="fp32", optimizer="sgd")
    plan = autoplan(None, hw, graph=g, train=train, constraints=Constraints(tp=2))
    assert plan.mesh.tp == 2 and not plan.tensor_parallel.sequence_parallel
    assert all(not a.knobs.sequence_parallel for a in plan.alternatives)
    with pytest.raises(SpecError, match="sequence parallelism needs every attention split by heads"):
        plan_from_knobs(g, hw, train, Knobs(pp=1, dp=2, tp=2, micro_batch_size=4, sequence_parallel=True))


@pytest.mark.tier1
def test_zero_bubble_with_resharding_fsdp_is_refused(graphs):
    for sharding in ("zero3", "hsdp"):
        assert schedule_problem(schedule="zero_bubble", sharding=sharding, pp=2, dp=2)
        assert knob_problem(sharding=sharding, offload="none", pp=2, dp=2, tp=1, precision="fp32",
                            schedule="zero_bubble")
    for sharding in ("none", "zero2"):
        assert schedule_problem(schedule="zero_bubble", sharding=sharding, pp=2, dp=2) is None
    for sched in ("gpipe", "1f1b", "interleaved_1f1b"):
        assert schedule_problem(schedule=sched, sharding="zero3", pp=2, dp=2) is None
    assert schedule_problem(schedule="zero_bubble", sharding="zero3", pp=2, dp=1) is None  # no FSDP at dp=1

    g = graphs["rotary_shared"]
    hw = HardwareSpec.preset("cpu", devices=4)
    train = TrainSpec(global_batch_size=8, precision="fp32", optimizer="sgd")
    with pytest.raises(SpecError, match="zero_bubble with zero3"):
        plan_from_knobs(g, hw, train, Knobs(pp=2, dp=2, tp=1, sharding="zero3", schedule="zero_bubble",
                                            micro_batch_size=2, num_micro_batches=2))
    # the free search on a space where zero3 and zero_bubble are both pinned-in candidates
    plan = autoplan(None, hw, graph=g, train=train, constraints=Constraints(pp=2, dp=2, sharding="zero3"))
    assert plan.pipeline.schedule != "zero_bubble"
    assert all(a.knobs.schedule != "zero_bubble" for a in plan.alternatives)


@pytest.mark.tier1
def test_runtime_refuses_zero_bubble_with_zero3():
    from planner.models import build_model

    model = build_model("gpt-tiny", device="meta").module
    plan = make_plan("gpt-tiny", pp=2, dp=2, schedule="zero_bubble", sharding="zero3", num_micro_batches=2)
    with pytest.raises(SpecError, match="zero_bubble with data_parallel.sharding zero3"):
        validate_pipeline(model, plan)
    ok = make_plan("gpt-tiny", pp=2, dp=2, schedule="zero_bubble", sharding="zero2", num_micro_batches=2)
    validate_pipeline(model, ok)


@pytest.mark.tier1
def test_batchnorm_net_traces_at_one_sample_and_is_never_planned_at_micro_batch_one():
    """ResNet-18 on 32x32 images: its last BatchNorm sees a 1x1 map, one value per channel at one
    sample, which PyTorch refuses to normalise in training. The tracer runs two copies of the sample
    (per-sample figures and the fingerprint are batch-free) and records the smallest micro-batch."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18()
    one = trace(model, (torch.zeros(1, 3, 32, 32),), name="r18")
    four = trace(model, (torch.zeros(4, 3, 32, 32),), name="r18")
    assert one.min_micro_batch_size == 2 and four.min_micro_batch_size == 1
    assert one.fingerprint == four.fingerprint and one.input_shapes == [[1, 3, 32, 32]]
    for b1, b4 in zip(one.blocks, four.blocks, strict=True):
        lt1, lt4 = one.layer_types[b1.layer_type], four.layer_types[b4.layer_type]
        assert lt1.fwd_flops_per_sample == lt4.fwd_flops_per_sample
    hw = HardwareSpec.preset("cpu", devices=2)
    train = TrainSpec(global_batch_size=4, precision="fp32", optimizer="sgd")
    plan = autoplan(None, hw, graph=one, train=train)
    assert plan.pipeline.micro_batch_size >= 2
    assert all(a.knobs.micro_batch_size >= 2 for a in plan.alternatives)
    with pytest.raises(SpecError, match="one value per channel"):
        plan_from_knobs(one, hw, train, Knobs(pp=1, dp=2, tp=1, micro_batch_size=1, num_micro_batches=2))


@pytest.mark.tier1
def test_export_traced_model_gets_no_pipeline_with_tensor_parallelism():
    """HF Llama traces only by torch.export; its pipeline stages (export split) hold no nn.Linear,
    so pp x tp would crash in parallelize_module: refused, pp or tp alone still offered."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    pytest.importorskip("transformers")
    from model_coverage import build_hf

    model, x = build_hf("llama", device="meta")
    g = trace(model, x[:1] if isinstance(x, torch.Tensor) else (x[0][:1],), name="llama")
    assert g.traced_by == "export" and g.pipeline_split == "export"
    # a model only export traces whole, but fx traces with its blocks kept whole (as the runtime's
    # split does): its stages keep their nn.Linear, so pp x tp is offered
    (rotary, x2) = build_structure("rotary_shared")
    g2 = trace(rotary, x2, name="rotary_shared")
    assert g2.traced_by == "export" and g2.pipeline_split == "fx"
    assert pipeline_tp_problem(g2, pp=2, tp=2) is None and pipeline_tp_problem(g, pp=2, tp=2)
    hw = HardwareSpec.preset("cpu", devices=4)
    train = TrainSpec(global_batch_size=8, precision="fp32", optimizer="sgd")
    with pytest.raises(SpecError, match="export"):
        plan_from_knobs(g, hw, train, Knobs(pp=2, dp=1, tp=2, micro_batch_size=4, num_micro_batches=2))
    plan = autoplan(None, hw, graph=g, train=train)
    assert not (plan.mesh.pp > 1 and plan.mesh.tp > 1)
    assert all(not (a.knobs.pp > 1 and a.knobs.tp > 1) for a in plan.alternatives)


@pytest.mark.tier1
def test_sequence_parallelism_needs_every_parameterised_op_covered():
    """Mixtral's router (a Linear no tp style covers) and its experts would get the token-split
    stream under sequence parallelism: it crashed ('mixed torch.Tensor and DTensor',
    benchmarks/planned_runnable.py --scale-from dgx-h100-80gb:64); refused, while Llama keeps sp."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    pytest.importorskip("transformers")
    from model_coverage import build_hf

    problems = {}
    for fam in ("mixtral", "llama"):
        model, x = build_hf(fam, device="meta")
        problems[fam] = sequence_parallel_problem(trace(model, (x[0][:1],), name=fam))
    assert problems["mixtral"] and "keeps whole parameters" in problems["mixtral"]
    assert problems["llama"] is None
