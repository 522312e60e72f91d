"""The cost model on a graph from planner.trace, cross-checked with the analytic graph."""

from __future__ import annotations

import pytest

from cost_models import block_costs, estimate_knobs
from specs import HardwareSpec, Knobs, TrainSpec
from tests.graphs import gpt_graph_from_config

pytestmark = pytest.mark.tier1


@pytest.fixture(scope="module")
def traced():
    from planner import trace
    from planner.models import build_model

    bm = build_model("gpt-tiny", batch=2, device="meta")
    return trace(bm.module, bm.example_inputs)


def test_traced_flops_match_analytic(traced):
    ref = gpt_graph_from_config("gpt-tiny", dtype="fp32")
    assert traced.fwd_flops_per_sample == pytest.approx(ref.fwd_flops_per_sample, rel=1e-9)
    assert traced.num_params == ref.num_params


@pytest.mark.parametrize("kw", [
    dict(pp=1, dp=4, tp=1, sharding="zero3"),
    dict(pp=2, dp=1, tp=2, sequence_parallel=True, schedule="1f1b"),
    dict(pp=2, dp=2, tp=1, schedule="zero_bubble"),
])
def test_estimate_on_traced_gpt_tiny(traced, kw):
    hw = HardwareSpec.preset("cpu", devices=4)
    tr = TrainSpec(global_batch_size=kw["dp"] * 4, precision="fp32")
    n = traced.num_blocks
    half = n // 2
    stages = [(0, n - 1, "selective")] if kw["pp"] == 1 else [(0, half - 1, "none"), (half, n - 1, "full")]
    e = estimate_knobs(traced, Knobs(micro_batch_size=1, num_micro_batches=4, **kw), stages, hw, tr)
    assert e.step_time_s > 0 and e.fits
    assert sum(e.time_breakdown_s.values()) == pytest.approx(e.step_time_s)
    assert e.to_prediction().step_time_s == e.step_time_s


def test_traced_and_analytic_activations_agree_without_dropout_masks(traced):
    """gpt-tiny has dropout 0, so the traced layer saves the analytic bytes minus the masks."""
    hw = HardwareSpec.preset("cpu", devices=1)
    tr = TrainSpec(precision="fp32")
    got = block_costs(traced, hw, tr, tp=1, sequence_parallel=False, micro_batch_size=1, recompute="none")
    ref = gpt_graph_from_config("gpt-tiny", dtype="fp32")
    want = block_costs(ref, hw, tr, tp=1, sequence_parallel=False, micro_batch_size=1, recompute="none")
    s, h, a = 32, 64, 4
    # the analytic graph (Korthikanti) has two residual dropout masks (1 byte each), the attention
    # dropout mask (1 byte) and the attention dropout output (fp32): none exist at dropout 0
    no_dropout = 2 * s * h + a * s * s + 4 * a * s * s
    assert got.blocks[1].activation_bytes == pytest.approx(want.blocks[1].activation_bytes - no_dropout, rel=0.01)
