"""Activation checkpointing as planned (no process group needed): full wraps whole blocks and
recomputes them in backward; selective wraps only the attention; gradients are unchanged."""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.utils._python_dispatch import TorchDispatchMode

from planner.models import build_model
from runtime.checkpointing import apply_activation_checkpointing
from tests.runtime_plans import make_plan

_WRAP = "_checkpoint_wrapped_module."


class _OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] = self.counts.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def _op_counts(model, tokens) -> dict[str, int]:
    """aten ops run by one forward + backward (recomputation shows up as repeated forward ops)."""
    with _OpCount() as c:
        model(tokens).sum().backward()
    return c.counts


def _grads(model, tokens) -> dict[str, torch.Tensor]:
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    return {n.replace(_WRAP, ""): p.grad.clone() for n, p in model.named_parameters()}


def _pair(name: str):
    torch.manual_seed(0)
    plain = build_model(name, dtype=torch.float64).module
    model = build_model(name, dtype=torch.float64).module
    model.load_state_dict(plain.state_dict())
    return plain, model, torch.randint(0, 128, (2, 32))


def test_full_recomputes_each_block_and_keeps_gradients():
    plain, model, tokens = _pair("gpt-tiny")
    assert apply_activation_checkpointing(model, make_plan("gpt-tiny", recompute="full")) == []
    assert all(isinstance(layer, CheckpointWrapper) for layer in model.layers)
    base, ckpt = _op_counts(plain, tokens), _op_counts(model, tokens)
    for op in ("aten.gelu.default", "aten._softmax.default"):  # every block op runs again in backward
        assert ckpt[op] == 2 * base[op], (op, base[op], ckpt[op])
    assert ckpt["aten.addmm.default"] > base["aten.addmm.default"]  # GPT's biased projections too
    ref, got = _grads(plain, tokens), _grads(model, tokens)
    for n, g in ref.items():
        torch.testing.assert_close(got[n], g, rtol=0, atol=1e-12)


def test_selective_recomputes_only_attention():
    plain, model, tokens = _pair("llama-tiny")
    apply_activation_checkpointing(model, make_plan("llama-tiny", recompute="selective"))
    assert all(isinstance(layer.attn, CheckpointWrapper) for layer in model.layers)
    assert not any(isinstance(layer, CheckpointWrapper) or isinstance(layer.mlp, CheckpointWrapper)
                   for layer in model.layers)
    base, ckpt = _op_counts(plain, tokens), _op_counts(model, tokens)
    assert ckpt["aten._softmax.default"] == 2 * base["aten._softmax.default"]  # attention core recomputed
    assert ckpt["aten.mm.default"] == base["aten.mm.default"]  # projections saved, not recomputed
    assert ckpt["aten.silu.default"] == base["aten.silu.default"]  # MLP untouched
    ref, got = _grads(plain, tokens), _grads(model, tokens)
    for n, g in ref.items():
        torch.testing.assert_close(got[n], g, rtol=0, atol=1e-12)


def test_selective_without_attention_says_so():
    model = build_model("mlp-tiny").module
    notes = apply_activation_checkpointing(model, make_plan("mlp-tiny", recompute="selective"))
    assert notes and "no attention module" in notes[0]
