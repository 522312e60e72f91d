"""Small models with the structures real LLMs have, written the way their sources write them, for
the runtime's equality cases (tests/coverage_cases.py, `local/<name>`) and the tracer's tests.

- `fused_chunk`: one Linear makes q, k and v; split with `.chunk(3, dim=-1)` (nanoGPT, Phi-2).
- `fused_split`: the same split by sizes, `.split([h, h, h], dim=-1)` (GPT-2's c_attn, Falcon).
- `fused_gqa`: q, k and v of different widths in one Linear, `.split([h, kv, kv], -1)` (Phi-3).
- `fused_heads`: Megatron/GPT-NeoX layout, `view(B, T, heads, 3 * hd)` then chunk per head.
- `head_norm`: separate q/k/v projections with an RMSNorm over head_dim applied to q and k per
  head (Qwen3's q_norm / k_norm, OLMo2-like).
- `rotary_shared`: a Llama whose rotary cos/sin are computed once at the top of the model and
  passed to every layer (Hugging Face's `position_embeddings`), so a pipeline must carry them.

Every model: tokens (B, T) -> logits (B, T, vocab); blocks are `embed`, `layers.i`, `head`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, HIDDEN, HEADS, KV_HEADS, SEQ, LAYERS = 64, 32, 4, 2, 16, 2
HEAD_DIM = HIDDEN // HEADS


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last axis (head_dim when applied per head)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, H, T, d) attention with an explicit causal mask (traceable: the mask is a buffer)."""
    t = q.shape[2]
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask[:t, :t], float("-inf"))
    return torch.matmul(F.softmax(scores, dim=-1), v)


class Attention(nn.Module):
    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        kv = (KV_HEADS if variant == "fused_gqa" else HEADS) * HEAD_DIM
        self.kv_width = kv
        if variant.startswith("fused"):
            self.qkv = nn.Linear(HIDDEN, HIDDEN + 2 * kv)
        else:
            self.q_proj = nn.Linear(HIDDEN, HIDDEN)
            self.k_proj = nn.Linear(HIDDEN, HIDDEN)
            self.v_proj = nn.Linear(HIDDEN, HIDDEN)
        if variant == "head_norm":
            self.q_norm = HeadRMSNorm(HEAD_DIM)
            self.k_norm = HeadRMSNorm(HEAD_DIM)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN)
        self.register_buffer("mask", torch.ones(SEQ, SEQ, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None):
        b, t, _ = x.shape
        if self.variant == "fused_chunk":
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        elif self.variant == "fused_split":
            q, k, v = self.qkv(x).split([HIDDEN, HIDDEN, HIDDEN], dim=-1)
        elif self.variant == "fused_gqa":
            q, k, v = self.qkv(x).split([HIDDEN, self.kv_width, self.kv_width], dim=-1)
        elif self.variant == "fused_heads":
            q, k, v = self.qkv(x).view(b, t, -1, 3 * HEAD_DIM).chunk(3, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.variant != "fused_heads":
            q, k, v = (z.view(b, t, -1, HEAD_DIM) for z in (q, k, v))
        if self.variant == "head_norm":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        if cos is not None:
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return self.o_proj(_causal(q, k, v, self.mask).transpose(1, 2).reshape(b, t, -1))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Layer(nn.Module):
    def __init__(self, variant: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(HIDDEN)
        self.attn = Attention(variant)
        self.norm2 = nn.LayerNorm(HIDDEN)
        self.up = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.down = nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Rotary(nn.Module):
    """cos/sin tables for positions 0..T-1 (computed once per forward, shared by all layers)."""

    def __init__(self):
        super().__init__()
        inv = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM))
        freqs = torch.outer(torch.arange(SEQ, dtype=torch.float64), inv)
        self.register_buffer("table", torch.cat((freqs, freqs), dim=-1), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.table[: x.shape[1]].to(x.dtype)
        return t.cos(), t.sin()


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, HIDDEN)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok(tokens)


class StructureLM(nn.Module):
    def __init__(self, variant: str, num_layers: int = LAYERS):
        super().__init__()
        self.variant = variant
        self.embed = Embed()
        self.rotary = Rotary() if variant == "rotary_shared" else None
        self.layers = nn.ModuleList(Layer(variant) for _ in range(num_layers))
        self.head = Head()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary(x)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.head(x)


VARIANTS = ("fused_chunk", "fused_split", "fused_gqa", "fused_heads", "head_norm", "rotary_shared")


def build_structure(variant: str, num_layers: int = LAYERS) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The model and an example input (2 sequences of SEQ tokens)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown structure {variant!r}; known: {', '.join(VARIANTS)}")
    return StructureLM(variant, num_layers), (torch.zeros(2, SEQ, dtype=torch.long),)
