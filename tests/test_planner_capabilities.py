"""Tier 1: the planner never returns what the runtime refuses (planner.capabilities), and records why."""

from __future__ import annotations

import pytest

from planner.api import autoplan
from planner.capabilities import executable_candidate, knob_problem
from specs import Constraints, HardwareSpec, SpecError, TPCandidate, TrainSpec
from tests.graphs import gpt_graph

KW = dict(vocab=1024, hidden=256, layers=4, heads=8, seq_len=128)


def _ok(**kw):
    base = dict(sharding="none", offload="none", pp=1, dp=2, tp=1, precision="bf16")
    return knob_problem(**{**base, **kw}) is None


@pytest.mark.tier1
def test_rules():
    assert _ok(sharding="zero1", dp=8)
    assert not _ok(sharding="zero1", dp=4, tp=2)
    assert not _ok(sharding="zero1", dp=4, pp=2)
    assert _ok(sharding="none", dp=4, pp=2, tp=2)  # FSDP2 replicate in the runtime: allowed
    assert _ok(sharding="zero2", dp=4, pp=2, tp=2)
    assert not _ok(offload="cpu", sharding="none")
    assert not _ok(offload="cpu", sharding="zero1")
    assert _ok(offload="cpu", sharding="zero3")
    assert not _ok(precision="fp16", pp=2)
    assert _ok(precision="fp16", pp=1)
    assert not executable_candidate(TPCandidate(kind="conv", modules={"conv1": "conv_out"}, divisor=64))
    assert executable_candidate(TPCandidate(kind="mlp", modules={"up": "colwise", "down": "rowwise"}, divisor=8))


def _plan(devices, batch, cons=None, **train):
    g = gpt_graph(**KW)
    hw = HardwareSpec.preset("dgx-a100-80gb", devices=devices)
    return autoplan(None, hw, graph=g, train=TrainSpec(global_batch_size=batch, **train), constraints=cons)


@pytest.mark.tier1
def test_search_never_returns_refused_points_and_says_why():
    plan = _plan(8, 16, allow_offload=True)
    points = [plan.knobs(), *(a.knobs for a in plan.alternatives)]
    for k in points:
        assert knob_problem(sharding=k.sharding, offload=k.offload, pp=k.pp, dp=k.dp, tp=k.tp,
                            precision="bf16") is None, k
    reasons = " | ".join(r.reason for r in plan.rejected)
    assert "zero1 with tp=" in reasons and "runtime refuses" in reasons
    assert "offload=cpu with none" in reasons


@pytest.mark.tier1
def test_pinned_refused_point_is_an_error_naming_the_rule():
    with pytest.raises(SpecError, match="zero1 with tp=2"):
        _plan(8, 16, Constraints(sharding="zero1", tp=2, pp=1))


@pytest.mark.tier1
def test_fp16_never_pipelines():
    plan = _plan(8, 32, Constraints(tp=1), precision="fp16")
    assert plan.mesh.pp == 1 and all(a.knobs.pp == 1 for a in plan.alternatives)
    assert any("fp16 with pp=" in r.reason for r in plan.rejected)
    with pytest.raises(SpecError, match="fp16 with pp=2"):
        _plan(8, 32, Constraints(pp=2), precision="fp16")


@pytest.mark.tier1
def test_conv_candidates_are_not_split():
    from planner.api import trace_model

    g = trace_model("resnet18", None)
    hw = HardwareSpec.preset("dgx-a100-80gb", devices=8)
    plan = autoplan(None, hw, graph=g, train=TrainSpec(global_batch_size=64))
    assert plan.mesh.tp == 1
    assert any("conv" in r.reason and "not executable" in r.reason for r in plan.rejected)
