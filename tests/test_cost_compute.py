"""Compute model: FLOPs against closed forms, roofline behaviour, efficiency curves."""

from __future__ import annotations

import pytest

from cost_models import block_costs
from cost_models.compute import layer_compute, op_time_s
from cost_models.efficiency import DEFAULT_CURVES, curves_for, interpolate
from specs import EfficiencyPoint, HardwareSpec, TrainSpec
from tests.graphs import gpt_graph, gpt_graph_from_config

pytestmark = pytest.mark.tier1


def korthikanti_step_flops(B: int, L: int, s: int, h: int, V: int) -> float:
    """Model FLOPs of one GPT step (Korthikanti et al. 2022, eq. for 72BLsh^2)."""
    return 72 * B * L * s * h * h * (1 + s / (6 * h) + V / (12 * h * L))


@pytest.mark.parametrize("name", ["gpt2-125m", "gpt3-1.3b", "gpt3-175b"])
def test_graph_flops_match_72BLsh2(name):
    g = gpt_graph_from_config(name)
    from planner.models.transformer import GPT_CONFIGS

    c = GPT_CONFIGS[name]
    B = 8
    got = (g.fwd_flops_per_sample + g.bwd_flops_per_sample) * B
    want = korthikanti_step_flops(B, c.num_layers, c.seq_len, c.hidden, c.vocab_size)
    assert got == pytest.approx(want, rel=1e-12)


def test_graph_flops_close_to_6ND():
    """6ND (Kaplan et al. 2020) ignores attention-score FLOPs: within s/6h + embeddings of 72BLsh^2."""
    g = gpt_graph_from_config("gpt3-175b")
    tokens = 2048
    six_nd = 6 * g.num_params * tokens
    got = g.fwd_flops_per_sample + g.bwd_flops_per_sample
    assert got / six_nd == pytest.approx(1 + 2048 / (6 * 12288), rel=0.02)


def test_estimate_model_flops_and_mfu_consistent():
    from cost_models import estimate_knobs
    from specs import Knobs

    g = gpt_graph(vocab=1024, hidden=256, layers=4, heads=8, seq_len=128)
    hw = HardwareSpec.preset("dgx-a100-80gb", devices=2)
    tr = TrainSpec(global_batch_size=8)
    e = estimate_knobs(g, Knobs(pp=1, dp=2, tp=1, micro_batch_size=2, num_micro_batches=2),
                       [(0, g.num_blocks - 1, "none")], hw, tr)
    want = korthikanti_step_flops(8, 4, 128, 256, 1024)
    assert e.model_flops_per_step == pytest.approx(want, rel=1e-12)
    assert e.mfu == pytest.approx(want / (e.step_time_s * 2 * 3.12e14), rel=1e-9)
    assert e.hfu == pytest.approx(e.mfu, rel=1e-9)  # no recompute


def test_roofline_compute_vs_memory_bound_and_launch_floor():
    hw = HardwareSpec.preset("dgx-a100-80gb")
    curves = curves_for(hw)
    peak = 3.12e14
    big = op_time_s(1e13, 1e6, "matmul", hw, curves, peak)
    assert big == pytest.approx(1e13 / (peak * DEFAULT_CURVES["matmul"][-1][1]))
    mem = op_time_s(0.0, 1e9, "elementwise", hw, curves, peak)
    assert mem == pytest.approx(1e9 / (2.039e12 * DEFAULT_CURVES["memory"][-1][1]))
    assert op_time_s(10.0, 10.0, "matmul", hw, curves, peak) == hw.device.kernel_launch_s


def test_efficiency_grows_with_size_and_calibration_replaces_default():
    pts = DEFAULT_CURVES["matmul"]
    effs = [interpolate(pts, 10 ** x) for x in range(5, 14)]
    assert effs == sorted(effs)
    hw = HardwareSpec.preset("dgx-a100-80gb")
    cal = hw.model_copy(update={"efficiency": {"matmul": [EfficiencyPoint(size=1.0, efficiency=0.5)]}})
    assert interpolate(curves_for(cal)["matmul"], 1e12) == 0.5


def test_tp_halves_split_compute_and_sp_splits_norms():
    g = gpt_graph(vocab=51200, hidden=4096, layers=2, heads=32, seq_len=2048)
    hw = HardwareSpec.preset("dgx-a100-80gb")
    lt = g.layer_types["gpt_layer"]
    kw = dict(precision="bf16", traced_activation_dtype="bf16", traced_param_dtype="bf16", micro_batch_size=1)
    one = layer_compute(lt, hw, tp=1, sequence_parallel=False, **kw)
    two = layer_compute(lt, hw, tp=2, sequence_parallel=False, **kw)
    two_sp = layer_compute(lt, hw, tp=2, sequence_parallel=True, **kw)
    assert two.fwd_flops == pytest.approx(one.fwd_flops / 2)
    assert one.forward_s / 2 < two.forward_s < one.forward_s  # smaller GEMMs, replicated norms
    assert two_sp.forward_s < two.forward_s


def test_recompute_adds_forward_work():
    g = gpt_graph(vocab=1024, hidden=1024, layers=2, heads=16, seq_len=1024)
    hw = HardwareSpec.preset("dgx-a100-80gb")
    tr = TrainSpec()
    kw = dict(tp=1, sequence_parallel=False, micro_batch_size=2)
    none = block_costs(g, hw, tr, recompute="none", **kw).blocks[1]
    sel = block_costs(g, hw, tr, recompute="selective", **kw).blocks[1]
    full = block_costs(g, hw, tr, recompute="full", **kw).blocks[1]
    assert none.recompute_s == 0
    assert 0 < sel.recompute_s < full.recompute_s == pytest.approx(full.forward_compute_s)
    assert sel.recompute_flops == pytest.approx(4 * 1024 * 1024 * 1024 * 2)  # 4 s^2 h x mb
    assert none.activation_bytes > sel.activation_bytes > full.activation_bytes
