"""Expert and context parallelism in the plan, the cost model, the search and the explainer/exports
(the runtime's EP is tests/test_expert_parallel.py's equality; CP does not run here).

The cost terms are checked against figures computed here from the model's config, not read back
from the cost model: the all-to-all and all-gather sizes, the experts' parameters per rank, and
context parallelism's "a rank holds 1/cp of the tokens" (a block without attention costs at
micro-batch 2 with cp=2 exactly what it costs at micro-batch 1 alone).
"""

from __future__ import annotations

import time

import pytest
import torch

from cost_models import CostModel, comm
from planner.api import autoplan, plan_from_knobs, trace_model
from planner.explain.export import export_plan
from planner.explain.report import mesh_axes
from planner.models import MOE_CONFIGS
from planner.models.transformer import Transformer, TransformerConfig
from specs import Constraints, HardwareSpec, Knobs, MeshDims, SpecError, TrainSpec

H100 = "dgx-h100-80gb"


@pytest.fixture(scope="module")
def moe_graph():
    return trace_model("moe-llama-tiny", None)


@pytest.fixture(scope="module")
def sdpa_graph():
    cfg = TransformerConfig(vocab_size=128, hidden=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=128,
                            seq_len=64, style="llama", tie_embeddings=False, bias=False, attention="sdpa")
    with torch.device("meta"):
        module = Transformer(cfg)
    return cfg, trace_model(module, (torch.zeros(2, cfg.seq_len, dtype=torch.long, device="meta"),))


def _layer(graph, cost_of):
    """The first transformer block's cost (blocks: embed, layers..., head)."""
    return cost_of.blocks[1]


# ------------------------------------------------------------------ expert parallelism: terms
def test_expert_parallel_all_to_all_and_params_follow_the_config(moe_graph):
    cfg = MOE_CONFIGS["moe-llama-tiny"]
    hw = HardwareSpec.preset(H100, devices=8)
    cm = CostModel(moe_graph, hw, TrainSpec(precision="bf16"))
    mb = 2
    one = _layer(moe_graph, cm.block_costs(1, False, mb, "none", ep=1))
    four = _layer(moe_graph, cm.block_costs(1, False, mb, "none", ep=4))
    expert_params = cfg.num_experts * cfg.hidden * cfg.ffn * 3  # w1, w2, w3 (SwiGLU), no bias
    assert one.expert_params == expert_params and one.ep_forward_s == one.ep_backward_s == 0
    assert four.expert_params == expert_params / 4
    assert one.num_params - four.num_params == pytest.approx(expert_params * 3 / 4)
    # dispatch + combine of N*k rows of the hidden size, bf16, on the 4 consecutive ranks' link
    rows_bytes = mb * cfg.seq_len * cfg.top_k * cfg.hidden * 2
    link = cm.group_link(4, 1)
    counts = comm.all_to_all_s(8.0 * cfg.num_experts, link)
    assert four.ep_forward_s == pytest.approx(2 * comm.all_to_all_s(rows_bytes, link) + counts)
    assert four.ep_backward_s == pytest.approx(2 * comm.all_to_all_s(rows_bytes, link))
    assert four.ep_volume_bytes == pytest.approx(4 * rows_bytes * 3 / 4)
    # full recompute repeats the forward pair
    full = _layer(moe_graph, cm.block_costs(1, False, mb, "full", ep=4))
    assert full.ep_backward_s == pytest.approx(four.ep_backward_s + four.ep_forward_s)
    # a stated imbalance scales the busiest rank's rows (and its expert compute)
    skew = CostModel(moe_graph, hw, TrainSpec(precision="bf16", expert_load_imbalance=1.5))
    skewed = _layer(moe_graph, skew.block_costs(1, False, mb, "none", ep=4))
    assert skewed.ep_backward_s == pytest.approx(2 * comm.all_to_all_s(1.5 * rows_bytes, link))
    assert skewed.forward_compute_s > four.forward_compute_s


def test_expert_parallel_memory_by_sharding(moe_graph):
    """sharding none: a rank holds 1/ep of the experts' states; zero3: 1/dp of everything either
    way (EP's shards are sharded again over the dp / ep copies)."""
    hw = HardwareSpec.preset(H100, devices=8)
    train = TrainSpec(global_batch_size=8, precision="bf16")
    expert_params = MOE_CONFIGS["moe-llama-tiny"].num_experts * 64 * 128 * 3 * 2  # 2 layers

    def states(sharding: str, ep: int) -> float:
        k = Knobs(pp=1, dp=8, tp=1, ep=ep, sharding=sharding, micro_batch_size=1, num_micro_batches=1)
        p = plan_from_knobs(moe_graph, hw, train, k).predicted.memory_bytes
        return p["parameters"] + p["gradients"] + p["optimizer"]

    assert states("none", 1) - states("none", 4) == pytest.approx(expert_params * 3 / 4 * 16)  # 16 B/param
    assert states("zero3", 4) == pytest.approx(states("zero3", 1))


def test_plan_validation_names_the_expert_parallel_arithmetic(moe_graph):
    hw = HardwareSpec.preset(H100, devices=8)
    train = TrainSpec(global_batch_size=8)
    k = Knobs(pp=1, dp=8, tp=1, ep=4, sharding="zero1", micro_batch_size=1, num_micro_batches=1)
    with pytest.raises(SpecError, match="mesh.ep.*zero1"):
        plan_from_knobs(moe_graph, hw, train, k)
    with pytest.raises(SpecError, match=r"mesh.ep.*ep\(3\) must divide dp\(8\)"):
        plan_from_knobs(moe_graph, hw, train, k.model_copy(update={"ep": 3, "sharding": "zero3"}))
    with pytest.raises(SpecError, match="ep=8 does not divide the 4 experts"):
        plan_from_knobs(moe_graph, hw, train, k.model_copy(update={"ep": 8, "sharding": "zero3"}))
    with pytest.raises(SpecError, match="constraints.ep.*no mixture-of-experts"):
        autoplan("gpt-tiny", "cpu:2", train=TrainSpec(global_batch_size=4), constraints=Constraints(ep=2))


# ------------------------------------------------------------------ expert parallelism: the search
def test_mixtral_on_64_h100_picks_expert_parallelism_and_shows_its_all_to_all():
    t0 = time.process_time()
    plan = autoplan("mixtral-8x7b", f"{H100}:64", train=TrainSpec(global_batch_size=256, precision="bf16"))
    cpu_s = time.process_time() - t0
    assert plan.mesh.ep > 1
    pr = plan.predicted
    assert pr.comm["ep"].volume_bytes > 0 and pr.time_breakdown_s["ep_comm_s"] > 0
    rows = {a["axis"]: a for a in mesh_axes(plan)}
    assert rows["ep"]["degree"] == plan.mesh.ep and rows["ep"]["part_of"] == "dp"
    assert rows["expert_dp"]["degree"] == plan.mesh.dp // plan.mesh.ep
    assert cpu_s < 30, f"planning took {cpu_s:.1f} s CPU"
    # the exports carry it
    assert "--expert-model-parallel-size" in export_plan(plan, "megatron").config
    titan = export_plan(plan, "torchtitan").config["parallelism"]
    assert titan["expert_parallel_degree"] == plan.mesh.ep * plan.mesh.tp


# ------------------------------------------------------------------ context parallelism
def test_tracer_records_what_context_parallelism_gathers(sdpa_graph):
    cfg, g = sdpa_graph
    fa = g.layer(1).fused_attention
    assert fa is not None and fa.context_parallel
    # k and v as the SDPA call gets them: the kv heads only (grouped-query, enable_gqa), fp32, per sample
    assert fa.kv_bytes_per_sample == 2 * cfg.seq_len * cfg.kv_heads * cfg.head_dim * 4


def test_context_parallel_splits_the_tokens_and_gathers_keys_and_values(sdpa_graph):
    cfg, g = sdpa_graph
    hw = HardwareSpec.preset(H100, devices=8)
    cm = CostModel(g, hw, TrainSpec(precision="bf16"))
    alone = cm.block_costs(1, False, 1, "none")
    halves = cm.block_costs(1, False, 2, "none", cp=2)
    # the embedding has no attention: micro-batch 2 over cp=2 is micro-batch 1 alone, term by term
    assert halves.blocks[0] == alone.blocks[0]
    layer = halves.blocks[1]
    kv = g.layer(1).fused_attention.kv_bytes_per_sample * 2 / 2  # micro-batch 2, traced fp32 -> bf16
    link = cm.group_link(2, 1)
    assert layer.cp_forward_s == pytest.approx(comm.all_gather_s(kv, link))
    assert layer.cp_backward_s == pytest.approx(comm.all_gather_s(kv, link) + comm.reduce_scatter_s(kv, link))
    assert alone.blocks[1].cp_forward_s == 0
    # the gathered keys and values stay saved: more than half of micro-batch 2's activations
    assert layer.activation_bytes == pytest.approx(
        cm.block_costs(1, False, 1, "none").blocks[1].activation_bytes + kv / 2, rel=1e-9)


def test_context_parallel_is_offered_only_where_it_can_run(sdpa_graph):
    _cfg, g = sdpa_graph
    train = TrainSpec(global_batch_size=8, precision="bf16", allow_context_parallel=True)
    with pytest.raises(SpecError, match="constraints.cp.*no CPU path"):
        autoplan(None, "cpu:2", train=train, graph=g, constraints=Constraints(cp=2))
    with pytest.raises(SpecError, match=r"constraints.cp.*2 \* cp = 256 equal chunks"):
        autoplan(None, f"{H100}:8", train=train, graph=g, constraints=Constraints(cp=128))
    math = trace_model("llama-tiny", None)  # explicit matmul/softmax attention: CP cannot split it
    with pytest.raises(SpecError, match="not one causal F.scaled_dot_product_attention"):
        autoplan(None, f"{H100}:8", train=train, graph=math, constraints=Constraints(cp=2))
    # off by default (the runtime does not execute it): recorded, not offered
    plan = autoplan(None, f"{H100}:8", train=train.model_copy(update={"allow_context_parallel": False}), graph=g)
    assert plan.mesh.cp == 1 and any(r.region == "cp > 1" for r in plan.rejected)


def test_long_context_llama_70b_on_512_h100_picks_context_parallelism():
    train = TrainSpec(global_batch_size=64, precision="bf16", allow_context_parallel=True)
    t0 = time.process_time()
    plan = autoplan("llama3-70b-128k", f"{H100}:512", train=train)
    cpu_s = time.process_time() - t0
    assert plan.mesh.cp > 1
    assert plan.mesh.world_size == 512
    pr = plan.predicted
    assert pr.fits and pr.comm["cp"].exposed_s > 0 and pr.time_breakdown_s["cp_comm_s"] > 0
    assert any("context parallelism" in n for n in pr.notes)
    dims = MeshDims.from_plan(plan)
    rows = {a["axis"]: a for a in mesh_axes(plan)}
    assert rows["cp"]["degree"] == plan.mesh.cp and rows["cp"]["stride"] == dims.stride("cp") == plan.mesh.tp
    assert export_plan(plan, "torchtitan").config["parallelism"]["context_parallel_degree"] == plan.mesh.cp
    assert cpu_s < 60, f"planning took {cpu_s:.1f} s CPU"
