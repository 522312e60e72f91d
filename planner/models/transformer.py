"""Bundled decoder-only transformers as plain PyTorch: a GPT-2/GPT-3 family and a Llama family.

Written for the planner and the runtime alike:
- traceable by torch.fx (no tensor factories with traced sizes: masks and RoPE tables are
  buffers sliced to the sequence length);
- tensor-parallel friendly: q/k/v/o and the MLP are separate Linears, and attention reshapes
  with `view(B, T, -1, head_dim)` so each tp rank works on its local heads;
- buildable on the meta device (`torch.device("meta")`) and materialised later with
  `init_weights()` (the runtime calls it after sharding).

Structure (the tracer's blocks): `embed` -> `layers.0 .. layers.{L-1}` -> `head`.

With `num_experts > 0` each layer's MLP is a mixture of experts (planner.models.moe: router,
top-k, grouped experts; dropless), still at `layers.i.mlp`; MOE_CONFIGS names the bundled ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from planner.models.moe import GroupedExperts, MoE


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    hidden: int
    num_layers: int
    num_heads: int
    seq_len: int
    ffn_hidden: int | None = None  # default 4*hidden (GPT) or given (Llama)
    num_kv_heads: int | None = None  # grouped-query attention; None = num_heads
    style: str = "gpt"  # "gpt" (LayerNorm, GELU, learned positions) or "llama" (RMSNorm, SwiGLU, RoPE)
    dropout: float = 0.0
    tie_embeddings: bool = True
    bias: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    num_experts: int = 0  # > 0: each layer's MLP is a mixture of this many experts (planner.models.moe)
    top_k: int = 2  # experts per token when num_experts > 0
    # "math": explicit q k^T, causal mask buffer, softmax, dropout (the equality tests' exact path);
    # "sdpa": F.scaled_dot_product_attention(is_causal=True), what large models train with (flash
    # kernels on GPU: no a*s^2 scores kept) and the only attention torch's context_parallel splits
    attention: str = "math"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or 4 * self.hidden


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def _norm(cfg: TransformerConfig) -> nn.Module:
    if cfg.style == "llama":
        return RMSNorm(cfg.hidden, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)


@torch.fx.wrap
def _leading(buf: torch.Tensor, n: int, ndim: int = 1) -> torch.Tensor:
    """buf[:n] (ndim=1) or buf[:n, :n] (ndim=2). Wrapped for torch.fx: a real buffer cannot be
    sliced with a traced size, so the tracer records this as one call."""
    return buf[:n, :n] if ndim == 2 else buf[:n]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden, cfg.num_heads * hd, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * hd, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * hd, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, cfg.hidden, bias=cfg.bias)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        if cfg.attention not in ("math", "sdpa"):
            raise ValueError(f"attention: {cfg.attention!r}; use 'math' or 'sdpa'")
        if cfg.attention == "math":  # sdpa masks by is_causal (no seq_len^2 buffer)
            self.register_buffer(
                "causal_mask", torch.ones(cfg.seq_len, cfg.seq_len, dtype=torch.bool).tril(), persistent=False
            )
        if cfg.style == "llama":
            inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            freqs = torch.outer(torch.arange(cfg.seq_len, dtype=torch.float32), inv)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.register_buffer("rope_cos", emb.cos(), persistent=False)
            self.register_buffer("rope_sin", emb.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        # view(B, T, -1, hd): under tensor parallelism each rank holds only its local heads.
        q = self.q_proj(x).view(B, T, -1, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
        if self.cfg.style == "llama":
            cos = _leading(self.rope_cos, T).to(q.dtype)
            sin = _leading(self.rope_sin, T).to(q.dtype)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        rep = self.cfg.num_heads // self.cfg.kv_heads
        if self.cfg.attention == "sdpa":  # grouped-query heads shared inside the kernel (enable_gqa)
            p = self.cfg.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=rep > 1)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        scores = scores.masked_fill(~_leading(self.causal_mask, T, 2), float("-inf"))
        probs = self.attn_dropout(F.softmax(scores, dim=-1))
        out = torch.matmul(probs, v).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.style = cfg.style
        if cfg.style == "llama":
            self.gate_proj = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.ffn, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ffn, cfg.hidden, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "llama":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn_norm = _norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = _norm(cfg)
        self.mlp = MoE(cfg.hidden, cfg.ffn, cfg.num_experts, cfg.top_k, cfg.style) if cfg.num_experts else MLP(cfg)
        self.resid_dropout1 = nn.Dropout(cfg.dropout)
        self.resid_dropout2 = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.resid_dropout1(self.attn(self.attn_norm(x)))
        return x + self.resid_dropout2(self.mlp(self.mlp_norm(x)))


class Embedding(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.pos = nn.Embedding(cfg.seq_len, cfg.hidden) if cfg.style == "gpt" else None
        self.register_buffer("positions", torch.arange(cfg.seq_len), persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens)
        if self.pos is not None:
            x = x + self.pos(_leading(self.positions, tokens.shape[1]))
        return self.dropout(x)


class Head(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm = _norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))


class Transformer(nn.Module):
    """Decoder-only LM: tokens (B, T) int64 -> logits (B, T, vocab)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.tie_embeddings:
            self.head.lm_head.weight = self.embed.tok.weight
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2 initialisation (normal(0, 0.02), scaled residual projections). Works on a model
        materialised with to_empty() (DTensor parameters included); also resets buffers."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = 0.02
        resid_std = std / math.sqrt(2 * self.cfg.num_layers)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                s = resid_std if name.endswith(("o_proj", "down_proj")) else std
                _normal_(mod.weight, s, gen)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.Embedding):
                _normal_(mod.weight, std, gen)
            elif isinstance(mod, (nn.LayerNorm, RMSNorm)):
                mod.reset_parameters()
            elif isinstance(mod, GroupedExperts):
                for w in (mod.w1, mod.w3):
                    if w is not None:
                        _normal_(w, std, gen)
                _normal_(mod.w2, resid_std, gen)
        self._reset_buffers()

    def _reset_buffers(self) -> None:
        cfg = self.cfg
        for mod in self.modules():
            if isinstance(mod, Attention):
                dev = mod.q_proj.weight.device
                if cfg.attention == "math":
                    mod.causal_mask.copy_(torch.ones(cfg.seq_len, cfg.seq_len, dtype=torch.bool, device=dev).tril())
                if cfg.style == "llama":
                    hd = cfg.head_dim
                    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=dev) / hd))
                    freqs = torch.outer(torch.arange(cfg.seq_len, dtype=torch.float32, device=dev), inv)
                    emb = torch.cat((freqs, freqs), dim=-1)
                    mod.rope_cos.copy_(emb.cos())
                    mod.rope_sin.copy_(emb.sin())
            elif isinstance(mod, Embedding):
                mod.positions.copy_(torch.arange(cfg.seq_len, device=mod.positions.device))


def _normal_(t: torch.Tensor, std: float, gen: torch.Generator | None) -> None:
    nn.init.normal_(t, 0.0, std, generator=gen if t.device.type == "cpu" else None)


def gpt_config(name: str) -> TransformerConfig:
    return replace(GPT_CONFIGS[name])


# GPT-2 sizes: Radford et al. 2019; GPT-3 sizes: Brown et al. 2020, Table 2.1 (vocab padded to a
# multiple of 128*8 as Megatron-LM does, so tp up to 8 divides it). 1T: Narayanan et al. 2021, Table 1.
GPT_CONFIGS: dict[str, TransformerConfig] = {
    "gpt-tiny": TransformerConfig(vocab_size=128, hidden=64, num_layers=4, num_heads=4, seq_len=32),
    "gpt-small": TransformerConfig(vocab_size=1024, hidden=256, num_layers=4, num_heads=8, seq_len=128),
    "gpt2-125m": TransformerConfig(vocab_size=50304, hidden=768, num_layers=12, num_heads=12, seq_len=1024),
    "gpt2-350m": TransformerConfig(vocab_size=50304, hidden=1024, num_layers=24, num_heads=16, seq_len=1024),
    "gpt2-1.5b": TransformerConfig(vocab_size=50304, hidden=1600, num_layers=48, num_heads=25, seq_len=1024),
    "gpt3-1.3b": TransformerConfig(vocab_size=51200, hidden=2048, num_layers=24, num_heads=16, seq_len=2048),
    "gpt3-6.7b": TransformerConfig(vocab_size=51200, hidden=4096, num_layers=32, num_heads=32, seq_len=2048),
    "gpt3-13b": TransformerConfig(vocab_size=51200, hidden=5120, num_layers=40, num_heads=40, seq_len=2048),
    "gpt3-175b": TransformerConfig(vocab_size=51200, hidden=12288, num_layers=96, num_heads=96, seq_len=2048),
    "gpt-1t": TransformerConfig(vocab_size=51200, hidden=25600, num_layers=128, num_heads=160, seq_len=2048),
}

# Llama 3 sizes: Meta's Llama 3 / 3.1 model cards (Dubey et al. 2024, Table 3).
_LLAMA = dict(style="llama", tie_embeddings=False, bias=False, rope_theta=500000.0)
LLAMA_CONFIGS: dict[str, TransformerConfig] = {
    "llama-tiny": TransformerConfig(vocab_size=128, hidden=64, num_layers=4, num_heads=4, num_kv_heads=2,
                                    ffn_hidden=128, seq_len=32, **_LLAMA),
    "llama3-8b": TransformerConfig(vocab_size=128256, hidden=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                                   ffn_hidden=14336, seq_len=8192, attention="sdpa", **_LLAMA),
    "llama3-70b": TransformerConfig(vocab_size=128256, hidden=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                                    ffn_hidden=28672, seq_len=8192, attention="sdpa", **_LLAMA),
    # the long-context phase's sequence (Dubey et al. 2024 §3.4.2: context grown to 128K tokens)
    "llama3-70b-128k": TransformerConfig(vocab_size=128256, hidden=8192, num_layers=80, num_heads=64,
                                         num_kv_heads=8, ffn_hidden=28672, seq_len=131072, attention="sdpa",
                                         **_LLAMA),
    "llama3-405b": TransformerConfig(vocab_size=128256, hidden=16384, num_layers=126, num_heads=128,
                                     num_kv_heads=8, ffn_hidden=53248, seq_len=8192, attention="sdpa", **_LLAMA),
}

# Mixture-of-experts transformers (planner.models.moe). moe-llama-tiny has Mixtral's structure
# (RMSNorm, RoPE, grouped-query attention, SwiGLU experts, top-2 with renormalised weights).
# Mixtral 8x7B: Jiang et al. 2024, "Mixtral of Experts" (arXiv:2401.04088), Table 1 (dim 4096,
# 32 layers, head_dim 128, 32 heads, 8 kv heads, hidden_dim 14336, vocab 32000, 8 experts,
# top-2, context 32768; trained here at seq_len 4096) and its released config.json (rope_theta
# 1e6, rms_norm_eps 1e-5, untied embeddings): "47B" parameters in the paper, 46.70B counted.
MOE_CONFIGS: dict[str, TransformerConfig] = {
    "moe-gpt-tiny": TransformerConfig(vocab_size=128, hidden=64, num_layers=2, num_heads=4, seq_len=32,
                                      ffn_hidden=128, num_experts=4, top_k=2),
    "moe-llama-tiny": TransformerConfig(vocab_size=128, hidden=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                        ffn_hidden=128, seq_len=32, num_experts=4, top_k=2, **_LLAMA),
    "mixtral-8x7b": TransformerConfig(vocab_size=32000, hidden=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                                      ffn_hidden=14336, seq_len=4096, num_experts=8, top_k=2, attention="sdpa",
                                      **{**_LLAMA, "rope_theta": 1e6}),
}
