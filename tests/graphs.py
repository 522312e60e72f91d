"""ModelGraphs built ANALYTICALLY from the standard GPT formulas (traced_by="manual").

An independent reference for the cost-model tests and benchmarks, and later a check of the
tracer. Per sample of s tokens, hidden h, a heads, FFN f (= 4h), vocab V, itemsize i (bytes):

- FLOPs: every Linear of n_in -> n_out costs 2 s n_in n_out forward and twice that backward;
  the attention core costs 2 s^2 h for Q K^T and 2 s^2 h for P V (Narayanan et al. 2021 §5.1).
  So a layer's forward is 24 s h^2 + 4 s^2 h and the step is 72 B L s h^2 (1 + s/6h + V/12hL).
- Saved activations (Korthikanti et al. 2022 §4.1, with dropout): attention 11 sh + 5 a s^2,
  MLP 19 sh, norms 4 sh, at 16-bit. Generalised to itemsize i: 16 i sh + 2 sh (two byte masks)
  per layer plus (2i + 1) a s^2 for the attention core; the part tensor parallelism leaves
  replicated (norm inputs, QKV and MLP inputs, the two residual dropout masks) is 4 i sh + 2 sh.
- Parameters: 12 h^2 + 13 h per layer (with biases), V h + s h for the embeddings, 2 h for the
  final norm; the output head is tied to the token embedding.

Blocks: embed, layers.0 .. layers.{L-1}, head (the bundled Transformer's structure).
"""

from __future__ import annotations

import hashlib

from specs import Block, CutPoint, LayerType, ModelGraph, OpInfo, TPCandidate

ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}


def _linear(name: str, s: int, n_in: int, n_out: int, split: str, i: int) -> OpInfo:
    return OpInfo(
        name=name, target="Linear", kind="matmul",
        fwd_flops_per_sample=2.0 * s * n_in * n_out, bwd_flops_per_sample=4.0 * s * n_in * n_out,
        bytes_per_sample=float(s * (n_in + n_out) * i), param_bytes=float((n_in * n_out + n_out) * i),
        tp_split=split, gemm_mnk=(s, n_out, n_in),
    )


def _mem(name: str, kind: str, n_bytes: float, split: str, param_bytes: float = 0.0) -> OpInfo:
    return OpInfo(name=name, target=kind, kind=kind, fwd_flops_per_sample=0.0, bwd_flops_per_sample=0.0,
                  bytes_per_sample=float(n_bytes), param_bytes=float(param_bytes), tp_split=split)


def gpt_layer_type(*, hidden: int, heads: int, seq_len: int, ffn: int | None = None, dtype: str = "bf16") -> LayerType:
    h, a, s, i = hidden, heads, seq_len, ITEMSIZE[dtype]
    f = ffn or 4 * h
    attn_flops = 2.0 * s * s * h
    ops = [
        _mem("attn_norm", "norm", 2 * s * h * i, "sequence", 2 * h * i),
        _linear("attn.q_proj", s, h, h, "column", i),
        _linear("attn.k_proj", s, h, h, "column", i),
        _linear("attn.v_proj", s, h, h, "column", i),
        OpInfo(name="attn.scores", target="matmul", kind="attention", fwd_flops_per_sample=attn_flops,
               bwd_flops_per_sample=2 * attn_flops, bytes_per_sample=float((2 * s * h + a * s * s) * i),
               tp_split="head", gemm_mnk=(s, s, h)),
        _mem("attn.softmax", "softmax", 2 * a * s * s * i, "head"),
        _mem("attn.dropout", "dropout", 2 * a * s * s * i + a * s * s, "head"),
        OpInfo(name="attn.values", target="matmul", kind="attention", fwd_flops_per_sample=attn_flops,
               bwd_flops_per_sample=2 * attn_flops, bytes_per_sample=float((a * s * s + 2 * s * h) * i),
               tp_split="head", gemm_mnk=(s, h, s)),
        _linear("attn.o_proj", s, h, h, "row", i),
        _mem("resid1", "elementwise", 3 * s * h * i, "sequence"),
        _mem("mlp_norm", "norm", 2 * s * h * i, "sequence", 2 * h * i),
        _linear("mlp.up_proj", s, h, f, "column", i),
        _mem("mlp.gelu", "elementwise", 2 * s * f * i, "column"),
        _linear("mlp.down_proj", s, f, h, "row", i),
        _mem("resid2", "elementwise", 3 * s * h * i, "sequence"),
    ]
    num_params = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h
    core = (2 * i + 1) * a * s * s
    saved = (5 * i + 1 + (1 + 2 * f // h) * i + 1 + 2 * i) * s * h + core  # attn 5i+1, MLP (1+2f/h)i+1, norms 2i
    return LayerType(
        name="gpt_layer", module_type="TransformerBlock", num_params=num_params,
        param_bytes=float(num_params * i),
        fwd_flops_per_sample=sum(o.fwd_flops_per_sample for o in ops),
        bwd_flops_per_sample=sum(o.bwd_flops_per_sample for o in ops),
        saved_bytes_per_sample=float(saved), saved_bytes_attention_core_per_sample=float(core),
        saved_bytes_replicated_per_sample=float((4 * i + 2) * s * h),
        input_bytes_per_sample=float(s * h * i), output_bytes_per_sample=float(s * h * i),
        ops=ops,
        tp_candidates=[
            TPCandidate(kind="attention", modules={"attn.q_proj": "colwise", "attn.k_proj": "colwise",
                                                   "attn.v_proj": "colwise", "attn.o_proj": "rowwise"}, divisor=a),
            TPCandidate(kind="mlp", modules={"mlp.up_proj": "colwise", "mlp.down_proj": "rowwise"}, divisor=f),
        ],
        num_heads=a,
    )


def gpt_graph(name: str = "gpt-manual", *, vocab: int, hidden: int, layers: int, heads: int, seq_len: int,
              ffn: int | None = None, dtype: str = "bf16") -> ModelGraph:
    """A GPT ModelGraph from the formulas in the module docstring."""
    h, s, V, i = hidden, seq_len, vocab, ITEMSIZE[dtype]
    layer = gpt_layer_type(hidden=h, heads=heads, seq_len=s, ffn=ffn, dtype=dtype)
    embed = LayerType(
        name="embed", module_type="Embedding", num_params=V * h + s * h, param_bytes=float((V * h + s * h) * i),
        fwd_flops_per_sample=0.0, bwd_flops_per_sample=0.0,
        saved_bytes_per_sample=float(s * h + 8 * s), saved_bytes_replicated_per_sample=float(s * h + 8 * s),
        input_bytes_per_sample=float(8 * s), output_bytes_per_sample=float(s * h * i),
        ops=[_mem("tok", "embedding", s * h * i + 8 * s, "vocab", V * h * i),
             _mem("pos", "embedding", s * h * i, "replicate", s * h * i),
             _mem("add_dropout", "dropout", 3 * s * h * i + s * h, "sequence")],
        tp_candidates=[TPCandidate(kind="vocab_embedding", modules={"tok": "vocab"}, divisor=V)],
    )
    head = LayerType(
        name="head", module_type="Head", num_params=2 * h + V * h, param_bytes=float((2 * h + V * h) * i),
        fwd_flops_per_sample=2.0 * s * h * V, bwd_flops_per_sample=4.0 * s * h * V,
        saved_bytes_per_sample=float(2 * s * h * i), saved_bytes_replicated_per_sample=float(2 * s * h * i),
        input_bytes_per_sample=float(s * h * i), output_bytes_per_sample=float(s * V * i),
        ops=[_mem("norm", "norm", 2 * s * h * i, "sequence", 2 * h * i),
             OpInfo(name="lm_head", target="Linear", kind="matmul", fwd_flops_per_sample=2.0 * s * h * V,
                    bwd_flops_per_sample=4.0 * s * h * V, bytes_per_sample=float(s * (h + V) * i),
                    param_bytes=float(V * h * i), tp_split="vocab", gemm_mnk=(s, V, h))],
        tp_candidates=[TPCandidate(kind="output_head", modules={"lm_head": "colwise"}, divisor=V)],
    )
    blocks = [Block(name="embed", layer_type="embed", index=0)]
    blocks += [Block(name=f"layers.{k}", layer_type="gpt_layer", index=k + 1) for k in range(layers)]
    blocks.append(Block(name="head", layer_type="head", index=layers + 1))
    num_params = layers * layer.num_params + embed.num_params + head.num_params - V * h
    key = f"{name}:{V}:{h}:{layers}:{heads}:{s}:{ffn}:{dtype}"
    return ModelGraph(
        name=name, fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16], traced_by="manual",
        param_dtype=dtype, activation_dtype=dtype, num_params=num_params, seq_len=s,
        input_shapes=[[1, s]], input_bytes_per_sample=float(8 * s), blocks=blocks,
        layer_types={"embed": embed, "gpt_layer": layer, "head": head},
        cut_points=[CutPoint(after_block=k, bytes_per_sample=float(s * h * i)) for k in range(layers + 1)],
        tied_blocks=[(0, layers + 1)], tied_param_bytes=float(V * h * i),
    )


def gpt_graph_from_config(name: str, dtype: str = "bf16") -> ModelGraph:
    """The analytic graph of a bundled GPT config (planner.models.transformer.GPT_CONFIGS)."""
    from planner.models.transformer import GPT_CONFIGS

    c = GPT_CONFIGS[name]
    return gpt_graph(name, vocab=c.vocab_size, hidden=c.hidden, layers=c.num_layers, heads=c.num_heads,
                     seq_len=c.seq_len, ffn=c.ffn, dtype=dtype)
