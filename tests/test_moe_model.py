"""The bundled mixture-of-experts transformers (planner.models.moe): the layer computes what its
docstring says, torch.fx traces it with FLOPs of k experts per token, and the grouped-GEMM path
equals the per-expert loop."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from planner.models import build_model, is_bundled
from planner.models.moe import MoE, expert_mlp, grouped_mm_supported
from planner.models.transformer import MOE_CONFIGS, Transformer
from planner.tracer import trace


def _naive(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax router, top-k renormalised, weighted sum of the chosen experts."""
    e = moe.experts
    out = torch.zeros_like(x.reshape(-1, x.shape[-1]))
    for t, tok in enumerate(x.reshape(-1, x.shape[-1])):
        probs = F.softmax(moe.router(tok), dim=-1)
        w, idx = torch.topk(probs, moe.top_k)
        for wi, i in zip(w / w.sum(), idx.tolist(), strict=True):
            h = tok @ e.w1[i].t()
            h = F.gelu(h) if e.w3 is None else F.silu(h) * (tok @ e.w3[i].t())
            out[t] += wi * (h @ e.w2[i].t())
    return out.reshape(x.shape)


@pytest.mark.parametrize("name", [n for n in MOE_CONFIGS if n.endswith("-tiny")])  # built on CPU in float64
def test_moe_layer_is_the_token_by_token_mixture(name):
    torch.manual_seed(0)
    model = build_model(name, dtype=torch.float64).module
    moe = model.layers[0].mlp
    assert isinstance(moe, MoE) and is_bundled(name)
    x = torch.randn(2, 5, model.cfg.hidden, dtype=torch.float64)
    assert torch.allclose(moe(x), _naive(moe, x), atol=1e-12)


def test_moe_traces_with_fx_and_counts_k_experts_per_token():
    cfg = MOE_CONFIGS["moe-gpt-tiny"]
    flops = {}
    for c in (cfg, replace(cfg, num_experts=0)):
        with torch.device("meta"):
            m = Transformer(c)
        g = trace(m, (torch.zeros(1, c.seq_len, dtype=torch.long, device="meta"),))
        assert g.traced_by == "fx"
        assert [b.name for b in g.blocks] == ["embed", "layers.0", "layers.1", "head"]
        flops[c.num_experts] = g.layer_types["TransformerBlock"].fwd_flops_per_sample
    dense_mlp = 2 * cfg.seq_len * 2 * cfg.hidden * cfg.ffn  # one GELU MLP per token
    router = 2 * cfg.seq_len * cfg.hidden * cfg.num_experts
    assert flops[cfg.num_experts] - flops[0] == (cfg.top_k - 1) * dense_mlp + router


def test_grouped_mm_equals_the_loop():
    torch.manual_seed(0)
    x = torch.randn(10, 16, requires_grad=True)
    w1, w3 = ((0.2 * torch.randn(3, 32, 16)).requires_grad_() for _ in range(2))
    w2 = (0.2 * torch.randn(3, 16, 32)).requires_grad_()
    counts = torch.tensor([4, 0, 6])
    if not grouped_mm_supported(x, w1):
        pytest.skip("torch._grouped_mm is not available here")
    y = expert_mlp(x, counts, w1, w2, w3)
    grads = torch.autograd.grad(y.square().sum(), (x, w1, w2, w3))
    x64, w164, w264, w364 = (t.detach().double().requires_grad_() for t in (x, w1, w2, w3))
    assert not grouped_mm_supported(x64, w164)  # float64 takes the loop
    y64 = expert_mlp(x64, counts, w164, w264, w364)
    grads64 = torch.autograd.grad(y64.square().sum(), (x64, w164, w264, w364))
    assert torch.allclose(y.double(), y64, rtol=1e-5, atol=1e-5)
    for g, g64 in zip(grads, grads64, strict=True):
        assert torch.allclose(g.double(), g64, rtol=1e-5, atol=1e-5 * float(g64.abs().max()))


def test_moe_builds_on_meta_and_initialises():
    built = build_model("moe-llama-tiny", device="meta")
    model = built.module
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    w1, w2 = model.layers[0].mlp.experts.w1.detach(), model.layers[0].mlp.experts.w2.detach()
    assert (
        0.017 < float(w1.std()) < 0.023 and float(w2.std()) < 0.015
    )  # w2 is a residual projection
