"""Mixture-of-experts layers in traced graphs: the one op per layer that computes its experts,
and its `specs.ExpertsInfo`.

Two forms are recognised, both one node whose operands hold all E experts' stacked weights
(get_attr nodes, so the op's param_bytes are all experts'):
- `planner.models.moe.expert_mlp(routed (N*k, D), counts (E,), w1 (E, F, D), w2 (E, D, F),
  w3 (E, F, D) | None)`, the bundled models' fx.wrap'ped call. Its FLOPs and saved tensors are
  measured like any op (on fake tensors it splits the rows evenly over the experts: the same
  dropless total). gemms: 2 (GELU, w3 None) or 3 (SwiGLU).
- a Hugging Face transformers 5 experts module in its plain layout (`is_hf_experts`:
  MixtralExperts, Qwen2MoeExperts, Qwen3MoeExperts; called as experts(hidden (N, D),
  top_k_index (N, k), top_k_weights (N, k)) -> (N, D), weighted and summed per token). Its eager
  forward loops over the experts the routing hit (`nonzero`, `where`: data-dependent, so neither
  torch.fx nor torch.export can follow it; its grouped_mm form exports, but as a custom op that
  FlopCounterMode does not count). While the tracer captures the model (`hf_experts_standins`),
  each such module's forward calls the custom op `autoplan::hf_experts` instead: one opaque node
  with a fake kernel, counted from the dropless routing (rows = N*k, F = the expert width):

      fwd FLOPs = 2 * rows * D * F * 3           gate|up (one 2F-wide GEMM) and down
      bwd FLOPs = 2 * fwd                        (`autoplan::hf_experts_backward`: input + weight grads)
      saved     = rows * (2D + 4F) activations   what the eager forward keeps per routed row: the
                  gathered input (D), gate|up (2F), act(gate) (F), act(gate)*up (F), down's output (D)

  The model is left as it was after the capture. The custom ops have fake kernels only: the
  traced graph is for planning, never run on values.

`experts_info` reads E, D, F from the weights' shapes, k from the routing (`top_k_index`'s width;
for `expert_mlp` the `topk` call its routed rows come from, else the enclosing module's `top_k`)
and the tokens per sample from the rows: routed rows = batch * tokens_per_sample * k.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import fx, nn
from torch.utils.flop_counter import register_flop_formula

from planner.blocks import node_module_path
from planner.ops import target_name
from specs import ExpertsInfo

BUNDLED_EXPERTS_OP = "expert_mlp"  # planner.models.moe.expert_mlp
HF_EXPERTS_OP = "hf_experts"  # autoplan::hf_experts (below)
_HF_GEMMS = 3  # SwiGLU-style act(gate) * up, then down: gate|up is one GEMM of twice the width


def is_hf_experts(mod: nn.Module) -> bool:
    """A Hugging Face transformers 5 experts module in its plain layout: stacked `gate_up_proj`
    (E, 2F, D) [gate; up] and `down_proj` (E, D, F), no bias (the layout runtime.expert_parallel
    shards)."""
    gate_up, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    return (
        isinstance(gate_up, nn.Parameter)
        and isinstance(down, nn.Parameter)
        and gate_up.dim() == 3
        and down.dim() == 3
        and hasattr(mod, "num_experts")
        and hasattr(mod, "act_fn")
        and getattr(mod, "is_concatenated", True)
        and not getattr(mod, "is_transposed", False)
        and not getattr(mod, "has_bias", False)
        and getattr(mod, "has_gate", True)
    )


_NO_VALUES = ("autoplan::{} is the planner's stand-in for a Hugging Face experts module while it "
              "traces (planner.experts); it has no kernel for real tensors")


@torch.library.custom_op("autoplan::hf_experts", mutates_args=())
def _hf_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError(_NO_VALUES.format("hf_experts"))


@_hf_experts.register_fake
def _(hidden, top_k_index, top_k_weights, gate_up, down):
    return hidden.new_empty(hidden.shape)


@torch.library.custom_op("autoplan::hf_experts_backward", mutates_args=())
def _hf_experts_backward(grad: torch.Tensor, hidden: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    raise NotImplementedError(_NO_VALUES.format("hf_experts_backward"))


@_hf_experts_backward.register_fake
def _(grad, hidden, top_k_index, top_k_weights, gate_up, down):
    return (torch.empty_like(hidden), torch.empty_like(top_k_weights), torch.empty_like(gate_up),
            torch.empty_like(down))


def _setup_context(ctx, inputs, output):
    hidden, top_k_index, top_k_weights, gate_up, down = inputs
    rows, d, f = top_k_index.numel(), hidden.shape[-1], down.shape[-1]
    # what the eager forward keeps per routed row (module docstring); fake tensors only
    kept = [hidden.new_empty(rows, w) for w in (d, 2 * f, f, f, d)]
    ctx.save_for_backward(hidden, top_k_index, top_k_weights, gate_up, down, *kept)


def _backward(ctx, grad):
    hidden, top_k_index, top_k_weights, gate_up, down = ctx.saved_tensors[:5]
    d_hidden, d_weights, d_gate_up, d_down = torch.ops.autoplan.hf_experts_backward.default(
        grad, hidden, top_k_index, top_k_weights, gate_up, down)
    return d_hidden, None, d_weights, d_gate_up, d_down


_hf_experts.register_autograd(_backward, setup_context=_setup_context)


def _hf_fwd_flops(top_k_index_shape, hidden_shape, down_shape) -> int:
    rows = 1
    for s in top_k_index_shape:
        rows *= s
    return 2 * rows * hidden_shape[-1] * down_shape[-1] * _HF_GEMMS


@register_flop_formula(torch.ops.autoplan.hf_experts)
def _hf_experts_flop(hidden_shape, top_k_index_shape, top_k_weights_shape, gate_up_shape, down_shape,
                     *args, **kwargs) -> int:
    return _hf_fwd_flops(top_k_index_shape, hidden_shape, down_shape)


@register_flop_formula(torch.ops.autoplan.hf_experts_backward)
def _hf_experts_backward_flop(grad_shape, hidden_shape, top_k_index_shape, top_k_weights_shape,
                              gate_up_shape, down_shape, *args, **kwargs) -> int:
    return 2 * _hf_fwd_flops(top_k_index_shape, hidden_shape, down_shape)


def _standin_forward(mod: nn.Module):
    def forward(hidden_states, top_k_index, top_k_weights):
        return torch.ops.autoplan.hf_experts.default(hidden_states, top_k_index, top_k_weights,
                                                     mod.gate_up_proj, mod.down_proj)
    return forward


@contextlib.contextmanager
def hf_experts_standins(model: nn.Module) -> Iterator[int]:
    """While open, every Hugging Face experts module of `model` (`is_hf_experts`) calls
    `autoplan::hf_experts` (module docstring); yields how many were replaced. Restores them."""
    replaced = {m: m.__dict__.get("forward") for m in model.modules() if is_hf_experts(m)}
    for m in replaced:
        m.forward = _standin_forward(m)
    try:
        yield len(replaced)
    finally:
        for m, own in replaced.items():  # an instance's own forward (e.g. expert parallelism's) back
            if own is None:
                del m.forward
            else:
                m.forward = own


def experts_info(n: fx.Node, gm: nn.Module, values: dict, batch: int, *, within: set[fx.Node],
                 modules: dict[str, nn.Module] | None = None) -> ExpertsInfo | None:
    """The ExpertsInfo of node `n` when it computes a mixture-of-experts layer's experts, else None.

    Args:
        n, gm: the node and its graph module.
        values: the nodes' fake values at the example batch `batch`.
        within: the nodes of n's block (where its routing is looked for).
        modules: the original model's modules by path (the enclosing MoE module's `top_k`, where
            the block has no topk call).
    """
    if n.op != "call_function":
        return None
    name = target_name(n, gm)
    if name == BUNDLED_EXPERTS_OP:
        routed, w1, w2, w3 = (_arg(n, i, key) for i, key in ((0, "routed"), (2, "w1"), (3, "w2"), (4, "w3")))
        routed, w1, w2, w3 = (values.get(a) if isinstance(a, fx.Node) else None for a in (routed, w1, w2, w3))
        if not (isinstance(routed, torch.Tensor) and isinstance(w1, torch.Tensor) and isinstance(w2, torch.Tensor)):
            return None
        weights = [w for w in (w1, w2, w3) if isinstance(w, torch.Tensor)]
        num_experts, ffn, hidden = (int(s) for s in w1.shape)
        rows, top_k = int(routed.shape[0]), _top_k(n, within, modules)
        gemms = 3 if isinstance(w3, torch.Tensor) else 2
    elif name == HF_EXPERTS_OP:
        hid, index, gate_up, down = (values.get(a) if isinstance(a, fx.Node) else None
                                     for a in (n.args[0], n.args[1], n.args[3], n.args[4]))
        if not all(isinstance(t, torch.Tensor) for t in (hid, index, gate_up, down)):
            return None
        weights = [gate_up, down]
        num_experts, hidden, ffn = int(gate_up.shape[0]), int(gate_up.shape[-1]), int(down.shape[-1])
        rows, top_k = int(index.numel()), int(index.shape[-1])
        gemms = _HF_GEMMS
    else:
        return None
    if not top_k or rows % (top_k * batch):
        return None
    return ExpertsInfo(
        num_experts=num_experts, top_k=top_k, hidden=hidden, ffn_hidden=ffn, gemms=gemms,
        tokens_per_sample=rows // (top_k * batch),
        num_params=sum(w.numel() for w in weights),
        param_bytes=float(sum(w.numel() * w.element_size() for w in weights)),
    )


def _arg(n: fx.Node, i: int, key: str):
    return n.args[i] if len(n.args) > i else n.kwargs.get(key)


def _top_k(n: fx.Node, within: set[fx.Node], modules: dict[str, nn.Module] | None) -> int | None:
    """k of the routing feeding the experts op: the `topk` call among its producers in its block
    (nearest first), else the `top_k` of the nearest enclosing module that has one."""
    frontier, seen = [a for a in n.all_input_nodes if a in within], set()
    while frontier:
        nxt = []
        for a in frontier:
            if a in seen:
                continue
            seen.add(a)
            if a.op in ("call_function", "call_method") and target_name(a) == "topk":
                k = a.args[1] if len(a.args) > 1 else a.kwargs.get("k")
                if isinstance(k, int):
                    return k
            nxt.extend(b for b in a.all_input_nodes if b in within)
        frontier = nxt
    path = node_module_path(n)
    while path and modules:
        k = getattr(modules.get(path), "top_k", None)
        if isinstance(k, int):
            return k
        path = path.rsplit(".", 1)[0] if "." in path else ""
    return None
