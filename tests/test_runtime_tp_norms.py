"""Tier 1: under sequence parallelism the runtime runs the residual stream's norms as
SequenceParallel even when the plan names none (the planner names only norms the tracer sees as
one op: gpt's nn.LayerNorm, not llama's hand-written RMSNorm)."""

from __future__ import annotations

import pytest
from torch import nn

from planner.api import trace_model
from planner.build_plan import tp_styles
from planner.models import build_model
from runtime.tensor_parallel import residual_norms


@pytest.mark.tier1
@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_residual_norms_are_every_block_norm(name):
    built = build_model(name, device="meta")
    model = built.module
    found = residual_norms(model, [f"layers.{i}" for i in range(len(model.layers))] + ["embed", "head"])
    norms = [n for n, m in model.named_modules() if type(m).__name__ in ("LayerNorm", "RMSNorm")]
    assert sorted(found) == sorted(norms) and norms, (found, norms)


@pytest.mark.tier1
@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_planner_sp_plan_norms_all_run_sequence_parallel(name):
    # A planner sp plan for llama names no 'sequence' style (its RMSNorm traces as pow/mean/rsqrt),
    # which made PP x TP x sp plans fail; every norm must be styled by the plan or by the runtime.
    import fnmatch

    styles = tp_styles(trace_model(name, None), 2, True)
    model = build_model(name, device="meta").module
    blocks = [f"layers.{i}" for i in range(len(model.layers))] + ["embed", "head"]
    covered = set(residual_norms(model, blocks)) | {
        n for n, _ in model.named_modules() for p, s in styles.items() if s == "sequence" and fnmatch.fnmatchcase(n, p)}
    norms = {n for n, m in model.named_modules() if type(m).__name__ in ("LayerNorm", "RMSNorm")}
    assert norms and norms <= covered, norms - covered


@pytest.mark.tier1
def test_norms_inside_attention_and_conv_norms_are_left_alone():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_norm = nn.LayerNorm(8)  # on head-split tensors: not the residual stream

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.attn = Attn()
            self.bn = nn.BatchNorm1d(8)
            self.gn = nn.GroupNorm(2, 8)

    model = nn.Sequential(Block())
    assert residual_norms(model, ["0"]) == ["0.norm"]
