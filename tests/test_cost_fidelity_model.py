"""The CPU-fidelity modelling fixes (issue 7 follow-up), each against a closed form:
per-kind memory curves, per-collective link figures, non-overlapping communication, shared
cores on oversubscribed hosts, and the host optimizer-step rate."""

from __future__ import annotations

import pytest

from cost_models.compute import op_time_s
from cost_models.efficiency import curves_for
from specs import EfficiencyPoint, HardwareSpec


def _with_curves(hw: HardwareSpec, **eff: float) -> HardwareSpec:
    curves = {k: [EfficiencyPoint(size=1.0, efficiency=v)] for k, v in eff.items()}
    return hw.model_copy(update={"efficiency": curves})


def test_each_memory_bound_op_uses_its_own_calibrated_curve():
    hw = _with_curves(HardwareSpec.preset("dgx-a100-80gb"), memory=0.8, elementwise=0.4, other=0.1)
    curves = curves_for(hw)
    bw, nb = hw.device.memory_bandwidth_bytes_per_s, 1e9
    for kind, eff in [("elementwise", 0.4), ("dropout", 0.4), ("norm", 0.1), ("softmax", 0.1),
                      ("loss", 0.1), ("embedding", 0.8), ("matmul", 0.8)]:
        assert op_time_s(0.0, nb, kind, hw, curves, 1.0) == pytest.approx(nb / (bw * eff)), kind


def test_uncalibrated_memory_kinds_fall_back_to_the_memory_curve():
    hw = _with_curves(HardwareSpec.preset("dgx-a100-80gb"), memory=0.5)
    curves = curves_for(hw)
    bw = hw.device.memory_bandwidth_bytes_per_s
    for kind in ("elementwise", "norm", "other"):
        assert op_time_s(0.0, 1e9, kind, hw, curves, 1.0) == pytest.approx(1e9 / (bw * 0.5))
