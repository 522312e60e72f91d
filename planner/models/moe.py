"""A mixture-of-experts MLP (Mixtral / torchtitan style, dropless token choice) for the bundled
transformers (`TransformerConfig(num_experts=E, top_k=k)`).

Per layer, for the N = B*T tokens x (N, D):
    probs = softmax(router(x))                       # router: Linear(D, E), no bias
    w, e = topk(probs, k); w = w / w.sum(-1)         # k experts per token, renormalised (Mixtral)
    routed, counts, slot = sort_by_expert(x, e)      # N*k rows grouped by expert, counts (E,)
    y = experts(routed, counts)                      # expert i's MLP on its counts[i] rows
    out[token of slot j] += w[slot j] * y[j]         # combine
No capacity: every token reaches its k experts (dropless), so the result does not depend on how
tokens are grouped into batches or ranks, which is what lets expert parallelism
(runtime.expert_parallel) match one process exactly. No auxiliary load-balancing loss.

`GroupedExperts` holds the E experts as stacked weights w1 (E, F, D), w2 (E, D, F) and, for the
llama style (SwiGLU), w3 (E, F, D); gpt style is GELU(x w1^T) w2^T. Its forward takes the rows
already grouped by expert and their counts, so expert parallelism only has to move rows between
ranks around it (forward hooks) and hand it the local experts' counts.

Tracing (torch.fx): the router, top-k, sort and combine trace as ordinary nodes; the per-expert
computation needs the counts as Python ints (a data-dependent split), so it is one
`torch.fx.wrap`ped call, `expert_mlp`, kept whole by the tracer. On tensors without values (meta
or fake: shape propagation, FLOP counting, torch.export) it splits the rows evenly over the
experts: a dropless layer computes N*k expert rows whatever the split, so FLOPs and saved bytes
are the same. With real tensors it runs one GEMM pair per expert, or `torch._grouped_mm` (one
grouped GEMM) where PyTorch has it for the dtype and layout (`grouped_mm_supported`); float64, the
equality tests' dtype, has none on CPU and takes the loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _is_valueless(t: torch.Tensor) -> bool:
    """Meta or fake tensors (the tracer's): their values cannot be read."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` (expert parallelism's 1/ep,
    runtime.expert_parallel)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def local_expert_weight(w: torch.Tensor | None, grad_scale: float = 1.0) -> torch.Tensor | None:
    """An expert-parallel DTensor weight's local experts (with autograd); a plain tensor as is;
    its gradient scaled by grad_scale."""
    if w is None:
        return None
    w = w.to_local() if hasattr(w, "to_local") else w
    return w if grad_scale == 1.0 else _ScaleGrad.apply(w, grad_scale)


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs (x, w^T), measured on torch 2.14: on CPU float32 and
    bfloat16 with 16-byte aligned rows (float64 is refused, "Expected mat_a to be Float32, BFloat16
    or Float16 matrix, got Double"; unaligned, "strides should be multiple of 16 bytes"); on CUDA
    bfloat16 (its meta kernel refuses float32)."""
    if not hasattr(torch, "_grouped_mm") or _is_valueless(x):
        return False
    dtypes = (torch.float32, torch.bfloat16) if x.device.type == "cpu" else (torch.bfloat16,)
    if x.dtype not in dtypes:
        return False
    return all((s * x.element_size()) % 16 == 0 for s in (x.shape[-1], w.shape[-1], w.shape[-2]))


def _split_sizes(counts: torch.Tensor, num_rows: int, num_experts: int) -> list[int]:
    if _is_valueless(counts):
        base, extra = divmod(num_rows, num_experts)
        return [base + (1 if i < extra else 0) for i in range(num_experts)]
    return [int(c) for c in counts.tolist()]


def _linear_grouped(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)


@torch.fx.wrap
def expert_mlp(
    routed: torch.Tensor,
    counts: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """Expert i's MLP on rows counts[:i].sum() .. counts[:i+1].sum() of `routed` (M, D) -> (M, D).
    w1/w3 (E, F, D), w2 (E, D, F); w3 None: GELU MLP, else SwiGLU. Expert-parallel DTensor
    weights contribute their local experts (counts then has the local experts' length); the
    weights' gradients are multiplied by grad_scale."""
    w1, w2, w3 = (local_expert_weight(w, grad_scale) for w in (w1, w2, w3))
    num_experts = w1.shape[0]
    if grouped_mm_supported(routed, w1):
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        h = _linear_grouped(routed, w1, offsets)
        h = F.gelu(h) if w3 is None else F.silu(h) * _linear_grouped(routed, w3, offsets)
        return _linear_grouped(h, w2, offsets)
    outs = []
    for i, x in enumerate(routed.split(_split_sizes(counts, routed.shape[0], num_experts))):
        h = x @ w1[i].t()
        h = F.gelu(h) if w3 is None else F.silu(h) * (x @ w3[i].t())
        outs.append(h @ w2[i].t())
    return torch.cat(outs)


class GroupedExperts(nn.Module):
    """E expert MLPs as stacked weights; forward(routed (M, D) grouped by expert, counts (E,))."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, style: str):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, ffn, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.w3 = nn.Parameter(torch.empty(num_experts, ffn, hidden)) if style == "llama" else None
        self.grad_scale = 1.0  # set by expert parallelism (runtime.expert_parallel): 1/ep

    def forward(self, routed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return expert_mlp(routed, counts, self.w1, self.w2, self.w3, self.grad_scale)


def sort_by_expert(tokens: torch.Tensor, experts: torch.Tensor, num_experts: int):
    """The N*k (token, expert) pairs grouped by expert, tokens in order within an expert.

    Returns (routed rows (N*k, D), counts (E,) int64, slot: for each routed row, its index in the
    flattened (N, k) choices)."""
    flat = experts.reshape(-1)
    slot = torch.argsort(flat, stable=True)
    counts = flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))
    k = experts.shape[-1]
    return tokens[slot // k], counts, slot


class MoE(nn.Module):
    """Router + top-k + grouped experts: (B, T, D) -> (B, T, D). See the module docstring."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, style: str):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = GroupedExperts(num_experts, hidden, ffn, style)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        probs = F.softmax(self.router(tokens), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        routed, counts, slot = sort_by_expert(tokens, experts, self.num_experts)
        y = self.experts(routed, counts) * weights.reshape(-1, 1)[slot]
        out = torch.zeros_like(tokens).index_add(0, slot // self.top_k, y)
        return out.reshape(shape)
