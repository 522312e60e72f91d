"""planner.trace on mixture-of-experts models (planner.experts): one "matmul" op per MoE layer
computes all its experts, carries specs.ExpertsInfo matching the model's config, and costs the
dropless count (2 * tokens * k * hidden * ffn * gemms FLOPs per sample forward, twice that
backward); dense models have no such op. Bundled models (fx, `expert_mlp`) and Hugging Face ones
(torch.export, the experts module as the custom op `autoplan::hf_experts`)."""

from __future__ import annotations

import pytest
import torch

from planner.models import MOE_CONFIGS, build_model
from planner.tracer import trace
from specs import ModelGraph, OpInfo

BATCH = 2  # per-sample figures divide by it


def _trace(name: str, batch: int = BATCH) -> ModelGraph:
    bm = build_model(name, device="meta", batch=batch)
    return trace(bm.module, bm.example_inputs, name=name)


def _experts_ops(g: ModelGraph) -> list[list[OpInfo]]:
    """Per block, the ops that carry ExpertsInfo."""
    return [[op for op in g.layer(b.index).ops if op.experts is not None] for b in g.blocks]


def _check(g: ModelGraph, *, num_layers: int, num_experts: int, top_k: int, hidden: int, ffn: int,
           gemms: int, tokens: int) -> None:
    per_block = _experts_ops(g)
    assert [len(ops) for ops in per_block] == [0, *[1] * num_layers, 0]  # embed, layers, head
    op = per_block[1][0]
    e = op.experts
    num_params = num_experts * hidden * ffn * gemms  # stacked weights, no biases
    assert (e.num_experts, e.top_k, e.hidden, e.ffn_hidden, e.gemms, e.tokens_per_sample) == (
        num_experts, top_k, hidden, ffn, gemms, tokens)
    assert e.num_params == num_params and e.param_bytes == op.param_bytes == 4.0 * num_params  # fp32
    assert op.kind == "matmul" and op.gemm_batched is False
    assert op.gemm_mnk == (tokens * top_k, ffn, hidden)
    dropless = 2.0 * tokens * top_k * hidden * ffn * gemms
    assert op.fwd_flops_per_sample == pytest.approx(dropless, rel=1e-6)
    assert op.bwd_flops_per_sample == pytest.approx(2 * dropless, rel=1e-6)


@pytest.mark.parametrize("name", ["moe-gpt-tiny", "moe-llama-tiny"])
def test_bundled_moe_layers_have_one_experts_op(name):
    cfg = MOE_CONFIGS[name]
    g = _trace(name)
    assert g.traced_by == "fx"
    _check(g, num_layers=cfg.num_layers, num_experts=cfg.num_experts, top_k=cfg.top_k, hidden=cfg.hidden,
           ffn=cfg.ffn, gemms=3 if cfg.style == "llama" else 2, tokens=cfg.seq_len)


def test_hf_mixtral_experts_trace_as_one_op():
    pytest.importorskip("transformers")
    bm = build_model("hf-mixtral-tiny", device="meta", batch=BATCH)
    g = trace(bm.module, bm.example_inputs, name="hf-mixtral-tiny")
    cfg = bm.info["config"]
    assert g.traced_by == "export"
    _check(g, num_layers=cfg.num_hidden_layers, num_experts=cfg.num_local_experts, top_k=cfg.num_experts_per_tok,
           hidden=cfg.hidden_size, ffn=cfg.intermediate_size, gemms=3, tokens=bm.info["seq_len"])
    assert all("forward" not in m.__dict__ for m in bm.module.modules())  # the model is as it was
    # the same layer as the bundled moe-llama-tiny (same widths): the same parameters and FLOPs,
    # and about the same saved activations (the stand-in keeps what HF's eager experts keep, 2D + 4F
    # per routed row, 40% of the layer's; the bundled layer keeps as much, its routing a bit more)
    bundled = _trace("moe-llama-tiny")
    assert g.num_params == bundled.num_params
    assert g.layer(1).fwd_flops_per_sample == bundled.layer(1).fwd_flops_per_sample
    assert g.layer(1).saved_bytes_per_sample == pytest.approx(bundled.layer(1).saved_bytes_per_sample, rel=0.1)


def test_hf_qwen2_moe_shared_expert_is_not_an_experts_op():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, use_cache=False,
        attn_implementation="eager")
    with torch.device("meta"):
        model = transformers.Qwen2MoeForCausalLM(cfg)
    g = trace(model, (torch.zeros(BATCH, 16, dtype=torch.long, device="meta"),))
    _check(g, num_layers=2, num_experts=4, top_k=2, hidden=64, ffn=32, gemms=3, tokens=16)


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_dense_models_have_no_experts_op(name):
    g = _trace(name)
    assert not any(_experts_ops(g))


def test_mixtral_8x7b_traces_on_meta():
    """Mixtral 8x7B (Jiang et al. 2024): 46.7B parameters, 8 experts top-2 in each of 32 layers."""
    g = _trace("mixtral-8x7b", batch=1)
    assert g.num_params == 46_702_792_704
    cfg = MOE_CONFIGS["mixtral-8x7b"]
    _check(g, num_layers=32, num_experts=8, top_k=2, hidden=4096, ffn=14336, gemms=3, tokens=cfg.seq_len)
