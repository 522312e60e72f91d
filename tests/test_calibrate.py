"""autoplan calibrate: the fits recover known parameters, the preset scaling matches specs, and a
real (tiny) calibration run writes a HardwareSpec with physically sane values."""

from __future__ import annotations

import math

import pytest
import yaml

from runtime import calibrate as cal
from specs import HardwareSpec


# ----------------------------------------------------------------------------- tier 1: pure
@pytest.mark.tier1
@pytest.mark.parametrize(
    "name,n", [("all_reduce", 4), ("all_gather", 4), ("reduce_scatter", 8), ("p2p", 2)]
)
def test_fit_alpha_beta_recovers_ring_parameters(name, n):
    steps_f, bus_f = cal.RING[name]
    alpha, bw = 37e-6, 2.5e9
    pts = [(s, steps_f(n) * alpha + bus_f(n) * s / bw) for s in (2**12, 2**16, 2**20, 2**24)]
    a, b = cal.fit_alpha_beta(pts, steps_f(n), bus_f(n))
    assert a == pytest.approx(alpha, rel=1e-6)
    assert b == pytest.approx(bw, rel=1e-6)


@pytest.mark.tier1
def test_fit_alpha_beta_clamps_negative_latency():
    # Pure bandwidth with a little noise that would make the unconstrained alpha negative.
    pts = [(2**20, 1.0e-3 * 0.98), (2**22, 4.0e-3), (2**24, 16.0e-3 * 1.01)]
    a, b = cal.fit_alpha_beta(pts, 1, 1.0)
    assert a >= 0 and 0.9e9 < b < 1.2e9


@pytest.mark.tier1
def test_fit_link_recovers_joint_parameters():
    alpha, bw, n = 120e-6, 0.8e9, 4
    measured = {
        name: [
            (s, cal.model_time_s(name, s, 2 if name == "p2p" else n, alpha, bw))
            for s in (2**12, 2**18, 2**24)
        ]
        for name in cal.RING
    }
    a, b, rms = cal.fit_link(measured, n)
    assert a == pytest.approx(alpha, rel=0.05)
    assert b == pytest.approx(bw, rel=0.05)
    assert rms < 0.05


@pytest.mark.tier1
def test_model_time_matches_cost_model_formulas():
    comm = pytest.importorskip("cost_models.comm")
    alpha, bw = 50e-6, 3e9
    for n in (2, 4, 8):
        link = comm.GroupLink(n, bw, alpha, 1, n)
        for s in (1e3, 1e6, 1e8):
            assert cal.model_time_s("all_reduce", s, n, alpha, bw) == pytest.approx(
                comm.all_reduce_s(s, link)
            )
            assert cal.model_time_s("all_gather", s, n, alpha, bw) == pytest.approx(
                comm.all_gather_s(s, link)
            )
            assert cal.model_time_s("reduce_scatter", s, n, alpha, bw) == pytest.approx(
                comm.reduce_scatter_s(s, link)
            )
            assert cal.model_time_s("broadcast", s, n, alpha, bw) == pytest.approx(
                comm.broadcast_s(s, link)
            )
            assert cal.model_time_s("p2p", s, 2, alpha, bw) == pytest.approx(comm.p2p_s(s, link))


@pytest.mark.tier1
def test_efficiency_curve_is_sorted_and_in_range():
    pts = cal.efficiency_curve([(1e9, 50.0), (1e6, 5.0), (1e12, 120.0)], peak=100.0)
    assert [p["size"] for p in pts] == [1e6, 1e9, 1e12]
    assert [p["efficiency"] for p in pts] == [0.05, 0.5, 1.0]


@pytest.mark.tier1
@pytest.mark.parametrize("devices", [1, 2, 3, 4, 8])
def test_shared_host_scale_agrees_with_preset(devices):
    from importlib import resources

    raw = yaml.safe_load((resources.files("specs") / "presets" / "cpu.yaml").read_text())
    mine = HardwareSpec.model_validate(cal.shared_host_scale(raw, devices))
    assert mine == HardwareSpec.preset("cpu", devices=devices)


# ----------------------------------------------------------------- tier 3: a real tiny run
def _check_sane(hw: HardwareSpec, nproc: int) -> None:
    assert hw.devices_per_node == nproc and hw.num_nodes == 1
    for dtype, flops in hw.device.peak_flops_per_s.items():
        assert 1e8 < flops < 1e15, (dtype, flops)  # 0.1 GFLOP/s .. 1 PFLOP/s
    assert 1e8 < hw.device.memory_bandwidth_bytes_per_s < 1e13
    assert 1e-8 < hw.device.kernel_launch_s < 1e-2
    assert 1e6 < hw.intra_node.bandwidth_bytes_per_s < 1e13  # 1 MB/s .. 10 TB/s
    assert 0 <= hw.intra_node.latency_s < 0.1
    assert 0 < hw.collective_efficiency <= 1
    assert 0 < hw.device.memory_bytes <= hw.host.memory_bytes
    assert 1e5 < hw.host.cpu_adam_params_per_s < 1e12
    for kind in ("matmul", "attention", "conv", "memory", "elementwise", "other"):
        pts = hw.efficiency[kind]
        assert pts and all(0 < p.efficiency <= 1 for p in pts)
        assert [p.size for p in pts] == sorted(p.size for p in pts)
    assert "measured by autoplan calibrate on" in hw.sources["device"]


@pytest.mark.tier3
@pytest.mark.slow
def test_calibrate_quick_run_writes_a_loadable_spec(tmp_path):
    out = tmp_path / "myhw.yaml"
    data = cal.run(2, out, quick=True, device_type="cpu", show_progress=False)
    hw = HardwareSpec.from_file(out)
    _check_sane(hw, 2)
    assert (tmp_path / "myhw.measurements.json").exists()
    # The preset form (as in specs/presets/cpu.yaml) scales back to the same spec.
    preset = cal.build_spec_data(data["_measurements"], nproc=2, date="today", host="test")
    assert "shared_host" in preset
    # concurrency measured for the training-like block mix and for cold copies
    shared = preset["shared_host"]
    assert 0 < shared["core_efficiency"] <= 1 and 0 < shared["memory_efficiency"] <= 1
    check = data["_measurements"]["shared_host_check"]
    assert check["block_alone"] > 0 and check["copy_alone"] > 0
    assert data["_measurements"]["sync_penalty_s"] >= 0
    hw2 = HardwareSpec.model_validate(cal.shared_host_scale(preset, 2))
    assert hw2.shared_memory_efficiency == shared["memory_efficiency"]
    again = HardwareSpec.model_validate(cal.shared_host_scale(preset, 2))
    assert again.device.peak_flops_per_s.keys() == hw.device.peak_flops_per_s.keys()
    assert math.isclose(again.intra_node.latency_s, hw.intra_node.latency_s)


@pytest.mark.tier1
def test_bundled_cpu_preset_is_sane():
    hw = HardwareSpec.preset("cpu", devices=4)
    _check_sane(hw, 4)


@pytest.mark.slow  # a few seconds of real microbenchmarks
def test_calibrate_one_device_skips_links(tmp_path):
    data = cal.run(1, tmp_path / "one.yaml", quick=True, device_type="cpu", show_progress=False)
    hw = HardwareSpec.from_file(tmp_path / "one.yaml")
    assert hw.num_devices == 1 and "no link measured" in hw.sources["intra_node"]
    assert data["_measurements"]["collectives"] == {}


@pytest.mark.tier1
def test_calibrate_rejects_zero_processes():
    from specs import SpecError

    with pytest.raises(SpecError, match="--nproc"):
        cal.run(0, None, quick=True, device_type="cpu", show_progress=False)


def test_operand_sets_span_the_flush_footprint():
    import torch

    from runtime.calibrate_bench import MAX_OPERAND_SETS, operand_sets

    a, b = torch.ones(256, 256), torch.ones(256, 256)  # 512 KiB a set
    sets = operand_sets((a, b), 8 * 2**20)
    assert len(sets) == 16 and sets[0][0] is a
    # copies, not views of the same storage: a call on one set leaves the others cold
    ptrs = {t.data_ptr() for s in sets for t in s}
    assert len(ptrs) == 32
    assert len(operand_sets((a,), 2**40)) == MAX_OPERAND_SETS
    assert len(operand_sets((torch.ones(2**20),), 2**10)) == 1  # one set bigger than the footprint


def test_time_op_rotates_through_every_set_without_repeating_back_to_back():
    import torch

    from runtime.calibrate_bench import time_op

    seen: list[int] = []
    sets = [(i,) for i in range(5)]
    time_op(lambda i: seen.append(i), torch.device("cpu"), 0.001, batches=2, sets=sets)
    assert len(seen) > 10
    assert set(seen) == set(range(5))
    assert all(x != y for x, y in zip(seen, seen[1:], strict=False))  # consecutive calls never reuse a set
    assert seen[:6] == [0, 1, 2, 3, 4, 0]
