"""Tier 1: the model fingerprint ignores the batch size and nothing else."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from planner.models import build_model
from planner.models.transformer import Transformer, gpt_config
from planner.tracer import trace


def _fp(name: str, batch: int) -> str:
    bm = build_model(name, device="meta", batch=batch)
    return trace(bm.module, bm.example_inputs).fingerprint


def _gpt_fp(batch: int = 2, **changes) -> str:
    cfg = replace(gpt_config("gpt-tiny"), **changes)
    with torch.device("meta"):
        model = Transformer(cfg)
    return trace(model, (torch.zeros(batch, cfg.seq_len, dtype=torch.long, device="meta"),)).fingerprint


@pytest.mark.tier1
@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny", "mlp-tiny"])
def test_fingerprint_is_batch_independent(name):
    assert _fp(name, 1) == _fp(name, 8) == _fp(name, 3)


@pytest.mark.tier1
def test_fingerprint_depends_on_everything_else():
    base = _gpt_fp()
    assert base == _fp("gpt-tiny", 5)
    assert _gpt_fp(seq_len=16) != base  # input shape beyond the batch
    assert _gpt_fp(hidden=128) != base  # parameter shapes
    assert _gpt_fp(num_heads=8) != base  # same parameters, other activation split (a constant)
    assert _gpt_fp(num_layers=3) != base  # structure
    assert _gpt_fp(bias=False) != base
    assert _fp("llama-tiny", 2) != base and _fp("mlp-tiny", 2) != base
