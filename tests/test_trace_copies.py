"""Materialising copies the tracer counts per op (planner/measure.py COPY_OPS, planner/tracer.py
_copy_owners) against a count by hand from the shapes of the bundled GPT attention."""

from __future__ import annotations

import pytest
import torch

from planner.models import build_model
from planner.models.transformer import Transformer, TransformerConfig
from planner.tracer import trace

pytestmark = pytest.mark.tier1

B, T, C, H = 2, 16, 64, 4


@pytest.fixture(scope="module")
def gpt_layer():
    cfg = TransformerConfig(vocab_size=128, hidden=C, num_layers=2, num_heads=H, seq_len=T)
    with torch.device("meta"):
        model = Transformer(cfg)
    g = trace(model, (torch.zeros(B, T, dtype=torch.long, device="meta"),))
    return g.layer(1)


def test_attention_copy_bytes_match_hand_count(gpt_layer):
    """Eager attention `q.view(B,T,H,d).transpose(1,2)`, `torch.matmul(q, k.transpose(-2,-1))`,
    `torch.matmul(probs, v).transpose(1,2).reshape(B,T,C)`: torch.matmul folds (B,H) with a
    reshape, which copies a non-contiguous operand. Forward: q, k^T and v into bmm layout and the
    head merge (4 copies); backward: the grad of probs @ v's output (transposed by the head merge)
    into bmm layout, and the q, k, v grads (transposed back from heads) reshaped to (B*T, C) for
    the projections' GEMMs (4 copies). Every copy holds T*C elements per sample, read + written."""
    itemsize = 4  # traced in fp32
    per_copy = 2 * T * C * itemsize
    ops = gpt_layer.ops
    assert sum(o.copy_bytes_per_sample for o in ops) == 4 * per_copy
    assert sum(o.bwd_copy_bytes_per_sample for o in ops) == 4 * per_copy
    assert sum(o.num_copies for o in ops) == 4
    assert sum(o.num_bwd_copies for o in ops) == 4


def test_copies_attributed_to_the_ops_that_cause_them(gpt_layer):
    by = {o.name.rsplit(".", 1)[-1]: o for o in gpt_layer.ops}
    per_copy = 2 * T * C * 4
    # q @ k^T: q and k^T into bmm layout
    assert (by["matmul"].num_copies, by["matmul"].copy_bytes_per_sample) == (2, 2 * per_copy)
    assert by["matmul"].num_bwd_copies == 0
    # probs @ v: v into bmm layout, plus the head-merge reshape of its output (a view-like node,
    # folded into its producer); backward: its transposed output grad into bmm layout
    assert (by["matmul_1"].num_copies, by["matmul_1"].copy_bytes_per_sample) == (2, 2 * per_copy)
    assert (by["matmul_1"].num_bwd_copies, by["matmul_1"].bwd_copy_bytes_per_sample) == (1, per_copy)
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert (by[proj].num_bwd_copies, by[proj].bwd_copy_bytes_per_sample) == (1, per_copy), proj
        assert by[proj].copy_bytes_per_sample == 0
        assert by[proj].tp_split == "column"  # the copies split by tp like their op
    assert {by["matmul"].tp_split, by["matmul_1"].tp_split} == {"head"}
    for name in ("o_proj", "up_proj", "down_proj"):
        assert by[name].copy_bytes_per_sample == by[name].bwd_copy_bytes_per_sample == 0


def test_attention_matmuls_are_batched_gemms_linears_are_not(gpt_layer):
    by = {o.name.rsplit(".", 1)[-1]: o for o in gpt_layer.ops}
    assert by["matmul"].gemm_batched is True and by["matmul_1"].gemm_batched is True
    assert by["matmul"].output_shape == [B, H, T, T]
    assert by["matmul"].gemm_mnk[2] == C // H
    for name in ("q_proj", "o_proj", "up_proj"):
        assert by[name].gemm_batched is False
    assert by["gelu"].gemm_batched is None


def test_copy_bytes_scale_out_of_the_per_sample_figure():
    """Per-sample copy bytes do not depend on the traced batch."""
    def total(batch):
        bm = build_model("gpt-tiny", device="meta", batch=batch)
        g = trace(bm.module, bm.example_inputs)
        lt = g.layer(1)
        return (sum(o.copy_bytes_per_sample for o in lt.ops), sum(o.bwd_copy_bytes_per_sample for o in lt.ops))

    one, three = total(1), total(3)
    assert one == three and one[0] > 0


def test_model_without_noncontiguous_reshapes_has_no_copies():
    bm = build_model("mlp-tiny", device="meta", batch=4)
    g = trace(bm.module, bm.example_inputs)
    for lt in g.layer_types.values():
        for o in lt.ops:
            assert o.copy_bytes_per_sample == o.bwd_copy_bytes_per_sample == 0, o.name
            assert o.num_copies == o.num_bwd_copies == 0


def test_explicit_copy_ops_are_not_counted_twice():
    """A `.contiguous()` / `.clone()` node is an op of its own (charged by its bytes); its copy is
    not charged again as a hidden copy."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            y = self.lin(x).transpose(1, 2).contiguous()
            return y.transpose(1, 2).clone()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Block()
            self.b = Block()

        def forward(self, x):
            return self.b(self.a(x))

    g = trace(Net(), (torch.zeros(2, 4, 8),))
    ops = g.layer(0).ops
    names = {o.target for o in ops}
    assert {"contiguous", "clone"} <= names
    assert all(o.copy_bytes_per_sample == 0 for o in ops)
