"""Saved bytes of fused attention (F.scaled_dot_product_attention) by kernel family.

The tracer measures blocks with the math path forced (planner.trace), whose saved tensors include
the a*s^2 probabilities; GPU flash/memory-efficient kernels keep only q, k, v, the output and an
fp32 log-sum-exp. `fused_attention_bytes` splits a block's measured bytes into both families
(specs.graph.FusedAttentionSaved), so the cost model picks by the target's kernels
(HardwareSpec.attention_kernel) without tracing again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from planner.blocks import BlockSpec
from planner.ops import op_kind, target_name
from specs.graph import FusedAttentionSaved


@dataclass
class _FusedAttention:
    """Saved bytes of a block's fused attention calls at the example batch (see FusedAttentionSaved)."""

    nodes: frozenset
    math: float = 0.0
    math_core: float = 0.0
    flash: float = 0.0
    flash_fp32: float = 0.0
    flash_core: float = 0.0
    kv: float = 0.0
    context_parallel: bool = True

    def per_sample(self, batch: int) -> FusedAttentionSaved:
        return FusedAttentionSaved(
            math_bytes_per_sample=self.math / batch, math_core_bytes_per_sample=self.math_core / batch,
            flash_bytes_per_sample=self.flash / batch, flash_fp32_bytes_per_sample=self.flash_fp32 / batch,
            flash_core_bytes_per_sample=self.flash_core / batch, kv_bytes_per_sample=self.kv / batch,
            context_parallel=self.context_parallel)


_ATTENTION_INPUTS = ("query", "key", "value")


def fused_attention_bytes(fused: list[fx.Node], b: BlockSpec, gm, values, m, dependent) -> _FusedAttention:
    """Split the measured (math-path) saved bytes of fused attention calls by kernel family.

    Per call n, from the saved tensors measured on the math path (each attributed to the node whose
    output storage it is; the math path's own tensors are `internal` to n):
      own     = n's internal tensors: bmm-layout copies of q, k, v, the probabilities, the dropout mask
      out     = n's output as its consumers keep it (saved by reference, or a copy made by view-like
                nodes or `contiguous` after it, e.g. the head merge `transpose(1, 2).reshape(...)`)
      inputs  = q, k, v (and a batch-dependent attn_mask), each argument once, where nothing else
                keeps its storage (traced back through view-like nodes to the node that made it;
                a repeat for grouped-query attention is a copy the kernel keeps at its own size)
    Math path: math = own + out (part of the measured total); selective recompute drops
    math_core = own - inputs (it re-runs the call from q, k, v, which it keeps).
    Flash-family kernels keep q, k, v, the output and an fp32 log-sum-exp (batch x heads x queries):
    flash = inputs + the output (on CUDA the output's layout makes the head merge a view, so its
    consumers keep the same storage: counted once); flash_fp32 = the log-sum-exp; selective drops
    the log-sum-exp and, where no consumer keeps the output, the output (flash_core).
    Context parallelism: kv = the key and value arguments' bytes; context_parallel = no call has an
    attn_mask tensor."""
    members = set(b.nodes)
    kept = {s.producer for s in m.saved.values() if not s.internal}  # nodes whose output storage is saved
    res = _FusedAttention(frozenset(fused))
    counted: set[fx.Node] = set()  # arguments already charged (q, k, v may be one tensor)
    for n in fused:
        after = _view_users(n, members, gm)
        own = sum(s.nbytes for s in m.saved.values() if s.producer is n and s.internal)
        out_kept = sum(s.nbytes for s in m.saved.values()
                       if (s.producer is n and not s.internal) or s.producer in after)
        args = [n.args[i] if i < len(n.args) else n.kwargs.get(name)
                for i, name in enumerate(_ATTENTION_INPUTS)]
        mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
        res.kv += sum(_nbytes(values.get(a)) for a in args[1:3] if isinstance(a, fx.Node))
        if isinstance(mask, fx.Node):
            res.context_parallel = False  # torch's context_parallel splits causal or unmasked calls only
        if isinstance(mask, fx.Node) and mask in dependent:
            args.append(mask)
        inputs = 0.0
        for a in args:
            if not isinstance(a, fx.Node):
                continue
            if a in counted or any(x in kept for x in _storage_chain(a, members, gm)):
                continue
            counted.add(a)
            inputs += _nbytes(values.get(a))
        q = values.get(args[0]) if isinstance(args[0], fx.Node) else None
        out = _nbytes(values.get(n), first=True)
        lse = 4.0 * (q.numel() // q.shape[-1]) if isinstance(q, torch.Tensor) and q.dim() else 0.0
        res.math += own + out_kept
        res.math_core += max(0.0, own - inputs)
        res.flash += inputs + out
        res.flash_fp32 += lse
        res.flash_core += 0.0 if out_kept else out
    return res


def _view_users(n: fx.Node, members: set, gm) -> set[fx.Node]:
    """Nodes of the block that read n through view-like nodes (and `contiguous`: a no-op on the
    output of a flash kernel, whose layout makes the head merge contiguous) only, n excluded."""
    out: set[fx.Node] = set()
    stack = [n]
    while stack:
        for u in stack.pop().users:
            name = target_name(u, gm)
            if (u in members and u not in out and u.op != "output"
                    and (op_kind(name) is None or name == "contiguous")):
                out.add(u)
                stack.append(u)
    return out


def _storage_chain(a: fx.Node, members: set, gm) -> list[fx.Node]:
    """`a` and the nodes it views, back through view-like nodes inside the block to the node that
    made the storage (a view-like node that had to copy, e.g. reshape after expand, is on it too)."""
    chain = [a]
    while (a in members and a.op in ("call_function", "call_method") and a.all_input_nodes
           and op_kind(target_name(a, gm)) is None):
        a = a.all_input_nodes[0]
        chain.append(a)
    return chain


def _nbytes(v, first: bool = False) -> float:
    ts = [t for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor)]
    return float(sum(t.numel() * t.element_size() for t in (ts[:1] if first else ts)))
