"""Tier 1: the tracer offers no attention head split for a module that views q/k/v with a fixed
head count (OPT's `view(bsz, -1, num_heads, head_dim)`), and still offers it for the
head-inferring `view(B, T, -1, head_dim)`; both under torch.fx and torch.export."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from planner.tracer import trace

HIDDEN, HEADS, SEQ = 32, 4, 8


class Block(nn.Module):
    def __init__(self, fixed_heads: bool):
        super().__init__()
        self.fixed_heads = fixed_heads
        self.norm = nn.LayerNorm(HIDDEN)
        self.q_proj = nn.Linear(HIDDEN, HIDDEN)
        self.k_proj = nn.Linear(HIDDEN, HIDDEN)
        self.v_proj = nn.Linear(HIDDEN, HIDDEN)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN)
        self.fc1 = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.fc2 = nn.Linear(2 * HIDDEN, HIDDEN)

    def _heads(self, t: torch.Tensor, b: int, s: int) -> torch.Tensor:
        hd = HIDDEN // HEADS
        if self.fixed_heads:  # OPT: the head count is a constant, the sequence axis is inferred
            return t.view(b, -1, HEADS, hd).transpose(1, 2)
        return t.view(b, s, -1, hd).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s = x.shape[0], x.shape[1]
        h = self.norm(x)
        q, k, v = (self._heads(p(h), b, s) for p in (self.q_proj, self.k_proj, self.v_proj))
        probs = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(HIDDEN // HEADS), dim=-1)
        x = x + self.o_proj((probs @ v).transpose(1, 2).reshape(b, s, -1))
        return x + self.fc2(F.gelu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, fixed_heads: bool):
        super().__init__()
        self.layers = nn.ModuleList([Block(fixed_heads) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _kinds(fixed_heads: bool, export: bool) -> set[str]:
    model = Net(fixed_heads)
    if export:  # a tensor factory fx cannot trace sends the tracer to torch.export
        model.layers[0].forward = _with_branch(model.layers[0])
    graph = trace(model, (torch.randn(1, SEQ, HIDDEN),))
    if export:
        assert graph.traced_by == "export"
    return {c.kind for lt in graph.layer_types.values() for c in lt.tp_candidates}


def _with_branch(block: Block):
    plain = Block.forward.__get__(block)

    def forward(x):
        # a tensor factory with a traced size: symbolic_trace fails here, torch.export does not
        return plain(x + torch.zeros(x.shape[1], HIDDEN, dtype=x.dtype))

    return forward


@pytest.mark.tier1
@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
def test_fixed_head_count_gets_no_head_split(export):
    kinds = _kinds(fixed_heads=True, export=export)
    assert "attention" not in kinds, kinds
    assert "mlp" in kinds, kinds  # the block's MLP is still split


@pytest.mark.tier1
@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
def test_inferred_head_count_keeps_the_head_split(export):
    kinds = _kinds(fixed_heads=False, export=export)
    assert {"attention", "mlp"} <= kinds, kinds
