"""Activation memory of fused attention follows the target's kernels (Korthikanti et al. 2022 vs
FlashAttention), and selective recompute recognises fused attention as the attention core.

The bundled GPT (planner/models/transformer.py) writes attention out (matmul, softmax, dropout,
matmul): eager PyTorch runs exactly that on every device, so its saved bytes do not depend on the
target. A model that calls `F.scaled_dot_product_attention` instead (`_SdpaAttention` below: the
bundled GPT's attention with its core replaced by the fused call, everything else unchanged) keeps
the a*s^2 probabilities only where the math path runs it (the `cpu` preset); CUDA's flash /
memory-efficient kernels keep q, k, v, the output and an fp32 log-sum-exp (Dao et al. 2022 §3.1).

Reference: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
§4.1 / eq. 1: one layer keeps s*b*h*(34 + 5*a*s/h) bytes at 16-bit without recompute, per term:
  attention  QKV input 2sbh (shared by q/k/v projections), Q and K 4sbh, softmax output 2as^2b,
             dropout mask as^2b, dropout output 2as^2b, V 2sbh, the output projection's input
             2sbh, its dropout mask sbh                          = 11sbh + 5as^2b
  MLP        first Linear's input 2sbh, GELU input 8sbh, second Linear's input 8sbh, dropout
             mask sbh                                            = 19sbh
  LayerNorms two inputs                                          = 4sbh
The tests trace in fp32 on meta, so every float tensor above costs 2x; the differences from the
paper are measured, not fitted, and each is asserted exactly:
  - dropout masks: meta/CPU take aten.dropout's unfused path, whose mask has the activation dtype
    (4 bytes here, 1 in the paper): the two sbh masks cost 4sbh each, the as^2b mask 4as^2b;
  - LayerNorm also keeps its fp32 mean and rstd: 2 norms x 2 x 4 bytes x s b;
so per sample (b = 1) the math path keeps 72sbh + 12as^2 + 16s bytes (72 = 2*32 float terms
+ 2*4 mask bytes), its score part 12as^2 (softmax output 4 + mask 4 + dropout output 4). Flash
keeps none of the score part and adds the log-sum-exp (4as bytes): 72sbh + 16s + 4as.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cost_models import block_costs
from cost_models.memory import layer_saved_bytes
from planner import trace
from planner.models.transformer import Attention, Transformer, TransformerConfig
from specs import HardwareSpec, TrainSpec

pytestmark = pytest.mark.tier1

_LN_STATS = 2 * 2 * 4  # bytes per token: 2 LayerNorms x (mean, rstd) x fp32


class _SdpaAttention(Attention):
    """The bundled GPT attention with its core as one fused call (as torchtitan / HF models write it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, -1, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
        p = self.attn_dropout.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def _gpt(cfg: TransformerConfig, device: str = "meta", *, sdpa: bool = True) -> Transformer:
    with torch.device(device):
        model = Transformer(cfg)
    if sdpa:
        for layer in model.layers:
            layer.attn.__class__ = _SdpaAttention
    return model


def _traced(cfg: TransformerConfig, device: str = "meta", *, sdpa: bool = True, batch: int = 2):
    return trace(_gpt(cfg, device, sdpa=sdpa), torch.zeros(batch, cfg.seq_len, dtype=torch.long, device=device))


SHAPES = [  # (hidden, heads, seq): a*s/h = 8 and 2, so the score part weighs differently
    (64, 4, 128),
    (96, 6, 32),
]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda p: f"h{p[0]}a{p[1]}s{p[2]}")
def sdpa_gpt(request):
    h, a, s = request.param
    cfg = TransformerConfig(vocab_size=256, hidden=h, num_layers=2, num_heads=a, seq_len=s, dropout=0.1)
    return _traced(cfg), cfg


def _korthikanti_fp32(cfg) -> tuple[float, float]:
    """(the paper's non-score terms, its score terms) per sample in the traced fp32 units (module
    docstring): 2 x 32 sbh of float tensors + 2 x 4 sbh of masks; 12 as^2."""
    s, h, a = cfg.seq_len, cfg.hidden, cfg.num_heads
    return 2 * 32 * s * h + 2 * 4 * s * h, 12 * a * s * s


def test_math_path_matches_korthikanti(sdpa_gpt):
    """The measured (math path) figures: score part exact, the rest exact with the stated terms."""
    g, cfg = sdpa_gpt
    s, h, a = cfg.seq_len, cfg.hidden, cfg.num_heads
    lt = g.layer(1)
    rest, scores = _korthikanti_fp32(cfg)
    assert lt.saved_bytes_per_sample == pytest.approx(rest + scores + _LN_STATS * s, rel=1e-12)
    # the paper's own 16-bit formula, doubled: above it by the stated mask and norm terms only (<= 15%)
    paper = 2 * s * h * (34 + 5 * a * s / h)
    assert 1.0 <= lt.saved_bytes_per_sample / paper <= 1.15
    fa = lt.fused_attention
    assert fa is not None
    assert fa.math_core_bytes_per_sample == pytest.approx(scores, rel=1e-12)
    # selective recompute recognises the fused call: its core is the score part
    assert lt.saved_bytes_attention_core_per_sample == pytest.approx(scores, rel=1e-12)


def test_flash_figures_match_flash_formula(sdpa_gpt):
    """Flash keeps q, k, v and the output (4 x 4 sbh in fp32: the output is the storage o_proj keeps,
    counted once) and the fp32 log-sum-exp (4 a s); no score part; selective drops only the
    log-sum-exp (o_proj keeps the output)."""
    g, cfg = sdpa_gpt
    s, h, a = cfg.seq_len, cfg.hidden, cfg.num_heads
    lt = g.layer(1)
    fa = lt.fused_attention
    assert fa.flash_bytes_per_sample == pytest.approx(4 * 4 * s * h, rel=1e-12)
    assert fa.flash_fp32_bytes_per_sample == pytest.approx(4 * a * s, rel=1e-12)
    assert fa.flash_core_bytes_per_sample == 0
    rest, _ = _korthikanti_fp32(cfg)
    flash = layer_saved_bytes(lt, "flash")
    assert flash.saved == pytest.approx(rest + _LN_STATS * s, rel=1e-12)
    assert flash.fp32 == pytest.approx(4 * a * s, rel=1e-12)
    assert flash.core == 0
    assert layer_saved_bytes(lt, "math").saved == lt.saved_bytes_per_sample


def _act(g, preset: str, *, recompute: str, tp: int = 1, sp: bool = False, precision: str = "fp32", mb: int = 1):
    hw = HardwareSpec.preset(preset, devices=max(tp, 1)) if preset == "cpu" else HardwareSpec.preset(preset)
    bc = block_costs(g, hw, TrainSpec(global_batch_size=8, precision=precision), tp=tp, sequence_parallel=sp,
                     micro_batch_size=mb, recompute=recompute)
    return bc.blocks[1].activation_bytes


@pytest.mark.parametrize("tp", [1, 2])
def test_cost_model_follows_the_target(sdpa_gpt, tp):
    """Per layer and micro-batch, with sequence parallelism (so all of it divides by tp, as
    Korthikanti's sbh(34 + 5as/h)/t): cpu (math) keeps the score part unless selective recompute
    drops it exactly; dgx-a100 (flash) never keeps it, and selective saves only the log-sum-exp."""
    g, cfg = sdpa_gpt
    s, a = cfg.seq_len, cfg.num_heads
    rest, scores = _korthikanti_fp32(cfg)
    rest += _LN_STATS * s
    lse = 4 * a * s
    sp = tp > 1
    math_none = _act(g, "cpu", recompute="none", tp=tp, sp=sp)
    math_sel = _act(g, "cpu", recompute="selective", tp=tp, sp=sp)
    flash_none = _act(g, "dgx-a100-80gb", recompute="none", tp=tp, sp=sp)
    flash_sel = _act(g, "dgx-a100-80gb", recompute="selective", tp=tp, sp=sp)
    assert math_none == pytest.approx((rest + scores) / tp, rel=1e-12)
    assert math_none - math_sel == pytest.approx(scores / tp, rel=1e-12)  # selective = the 5as/h term
    assert flash_none == pytest.approx((rest + lse) / tp, rel=1e-12)
    assert flash_none - flash_sel == pytest.approx(lse / tp, rel=1e-12)  # selective ~ none under flash
    assert flash_sel == pytest.approx(math_sel, rel=1e-12)  # both: Korthikanti's selective, 34 sbh / t


def test_log_sum_exp_is_fp32_in_any_precision(sdpa_gpt):
    """bf16 training halves the traced fp32 activations, never the fp32 log-sum-exp."""
    g, cfg = sdpa_gpt
    s, a = cfg.seq_len, cfg.num_heads
    rest, _ = _korthikanti_fp32(cfg)
    got = _act(g, "dgx-a100-80gb", recompute="none", precision="bf16", mb=3)
    assert got == pytest.approx(3 * ((rest + _LN_STATS * s) / 2 + 4 * a * s), rel=1e-12)


def test_figures_do_not_depend_on_the_trace_device():
    """On a CPU device PyTorch would run `_scaled_dot_product_flash_attention_for_cpu`; the tracer
    forces the math path, so a CPU trace and a meta trace record the same figures."""
    cfg = TransformerConfig(vocab_size=256, hidden=64, num_layers=2, num_heads=4, seq_len=64, dropout=0.1)
    meta, cpu = _traced(cfg, "meta").layer(1), _traced(cfg, "cpu").layer(1)
    assert cpu.fused_attention == meta.fused_attention
    assert cpu.saved_bytes_attention_core_per_sample == meta.saved_bytes_attention_core_per_sample


def test_unfused_attention_is_the_same_on_every_target():
    """The bundled GPT writes attention out: no fused call, the same bytes on cpu and on a GPU."""
    cfg = TransformerConfig(vocab_size=256, hidden=64, num_layers=2, num_heads=4, seq_len=64, dropout=0.1)
    g = _traced(cfg, sdpa=False)
    assert g.layer(1).fused_attention is None
    for rec in ("none", "selective"):
        assert _act(g, "cpu", recompute=rec) == _act(g, "dgx-a100-80gb", recompute=rec)


def test_attention_kernel_by_preset_and_override():
    assert {n: HardwareSpec.preset(n).attention_kernel for n in HardwareSpec.preset_names()} == {
        "cpu": "math", "dgx-a100-80gb": "flash", "dgx-h100-80gb": "flash", "dgx-h200": "flash"}
    data = HardwareSpec.preset("dgx-a100-80gb").model_dump()
    data.pop("attention_kernel")
    assert HardwareSpec.model_validate(data).attention_kernel == "flash"  # derived: an accelerator
    data["device_is_host_cpu"] = True
    assert HardwareSpec.model_validate(data).attention_kernel == "math"
    data["attention_kernel"] = "flash"
    assert HardwareSpec.model_validate(data).attention_kernel == "flash"  # stated wins


def test_hf_llama_sdpa_grouped_query_attention():
    """Hugging Face Llama with SDPA (4 heads, 2 kv heads, RoPE, repeat_kv, `transpose(1, 2)
    .contiguous()` head merge), captured by torch.export. On meta the export keeps the
    `.contiguous()` that the math layout needs; on a CPU device (flash layout) it drops it: the same
    figures either way. Flash keeps q (the RoPE output) and the repeated k at (s, h) each, plus the
    output, which o_proj keeps through the contiguous head merge (so selective drops none of it); the
    repeated v is kept by reference on both paths (in the rest)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                                   use_cache=False, attn_implementation="sdpa")
    s, h = 32, 64
    got = {}
    for device in ("meta", "cpu"):
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg)
        g = trace(model, (torch.zeros(2, s, dtype=torch.long, device=device),))
        assert g.traced_by == "export"
        got[device] = g.layer(1)
    fa = got["meta"].fused_attention
    assert fa == got["cpu"].fused_attention
    assert fa.flash_bytes_per_sample == 3 * s * h * 4
    assert fa.flash_core_bytes_per_sample == 0
    assert fa.flash_fp32_bytes_per_sample == 4 * 4 * s  # heads x queries x fp32
