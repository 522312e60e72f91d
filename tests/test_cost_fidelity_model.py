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


# ----------------------------------------------------------------- per-collective calibration
from cost_models import comm  # noqa: E402
from specs import LinkSpec  # noqa: E402


def _with_collectives(hw: HardwareSpec, **figs: tuple[float, float]) -> HardwareSpec:
    return hw.model_copy(update={"collectives": {
        k: LinkSpec(bandwidth_bytes_per_s=bw, latency_s=a) for k, (bw, a) in figs.items()}})


def test_calibrated_collectives_use_their_own_alpha_beta_inside_a_node():
    base = HardwareSpec.preset("dgx-a100-80gb")
    hw = _with_collectives(base, reduce_scatter=(1e9, 1e-4), all_reduce=(3e9, 2e-4), p2p=(5e9, 1e-5),
                           broadcast=(2e9, 3e-5))
    link, S, n = comm.group_link(hw, 4, 1), 64e6, 4
    assert comm.reduce_scatter_s(S, link) == pytest.approx((n - 1) / n * S / 1e9 + (n - 1) * 1e-4)
    assert comm.all_reduce_s(S, link) == pytest.approx(2 * (n - 1) / n * S / 3e9 + 2 * (n - 1) * 2e-4)
    assert comm.broadcast_s(S, link) == pytest.approx(S / 2e9 + (n - 1) * 3e-5)
    assert comm.p2p_s(S, comm.p2p_link(hw, 1)) == pytest.approx(S / 5e9 + 1e-5)
    # not calibrated: the links, exactly as without the field
    plain = comm.group_link(base, 4, 1)
    assert comm.all_gather_s(S, link) == pytest.approx(comm.all_gather_s(S, plain))
    assert comm.all_to_all_s(S, link) == pytest.approx(comm.all_to_all_s(S, plain))
    # reduce-scatter at 1/3 of all-reduce's busbw: no longer the same time as all-gather
    assert comm.reduce_scatter_s(S, link) > 2 * comm.all_gather_s(S, link)


def test_calibrated_collectives_do_not_apply_across_nodes():
    base = HardwareSpec.preset("dgx-a100-80gb", nodes=2)
    hw = _with_collectives(base, all_reduce=(1e6, 1.0))
    a, b = comm.group_link(hw, 16, 1), comm.group_link(base, 16, 1)
    assert comm.all_reduce_s(1e8, a) == pytest.approx(comm.all_reduce_s(1e8, b))
    assert comm.p2p_s(1e8, comm.p2p_link(hw, 8)) == pytest.approx(comm.p2p_s(1e8, comm.p2p_link(base, 8)))


# ----------------------------------------------------------------- comm that does not overlap
from cost_models import estimate_knobs  # noqa: E402
from specs import Knobs, TrainSpec  # noqa: E402
from tests.graphs import gpt_graph  # noqa: E402

GRAPH = gpt_graph(vocab=2048, hidden=384, layers=8, heads=8, seq_len=128, dtype="fp32")


def _stages(n: int, rec: str = "none") -> list[tuple[int, int, str]]:
    nb = GRAPH.num_blocks
    cuts = [round(i * nb / n) for i in range(n + 1)]
    return [(cuts[i], cuts[i + 1] - 1, rec) for i in range(n)]


def _est(hw: HardwareSpec, **kw):
    kn = Knobs(**{"pp": 1, "tp": 1, "micro_batch_size": 4, **kw})
    m = kn.num_micro_batches
    tr = TrainSpec(global_batch_size=kn.dp * kn.micro_batch_size * m, precision="fp32", optimizer="adamw")
    return estimate_knobs(GRAPH, kn, _stages(kn.pp * kn.virtual_stages), hw, tr)


@pytest.mark.parametrize("sharding", ["none", "zero1", "zero2", "zero3"])
def test_without_overlap_all_data_parallel_comm_is_exposed(sharding):
    gpu = HardwareSpec.preset("dgx-a100-80gb", devices=4)
    serial = gpu.model_copy(update={"comm_overlaps_compute": False})
    a, b = _est(gpu, dp=4, sharding=sharding), _est(serial, dp=4, sharding=sharding)
    assert b.comm["dp"].exposed_s == pytest.approx(b.comm["dp"].time_s)
    assert b.comm["dp"].time_s == pytest.approx(a.comm["dp"].time_s)
    assert a.comm["dp"].exposed_s < a.comm["dp"].time_s  # on a GPU part of it hides
    assert b.step_time_s > a.step_time_s
    assert sum(b.time_breakdown_s.values()) == pytest.approx(b.step_time_s)


# ----------------------------------------------------------------- optimizer step
from cost_models.memory import bytes_per_param, optimizer_step_bytes_per_param  # noqa: E402


def test_optimizer_step_bytes_count_torch_foreach_passes():
    fp32 = bytes_per_param("fp32", "adamw")
    # 8 foreach passes (see the docstring): 80 bytes/param for AdamW, 72 for Adam, 36 for SGD+momentum
    assert optimizer_step_bytes_per_param(fp32, "adamw") == 80
    assert optimizer_step_bytes_per_param(fp32, "adam") == 72
    assert optimizer_step_bytes_per_param(bytes_per_param("fp32", "sgd"), "sgd") == 4 + 20 + 8


def test_optimizer_on_the_host_cpu_runs_at_the_measured_rate():
    gpu = HardwareSpec.preset("dgx-a100-80gb", devices=1)
    host = gpu.model_copy(update={"device_is_host_cpu": True})
    rate = host.host.cpu_adam_params_per_s
    e = _est(host, dp=1)
    assert e.time_breakdown_s["optimizer_s"] == pytest.approx(GRAPH.num_params / rate)
    z = _est(host.model_copy(update={"num_nodes": 1, "devices_per_node": 4}), dp=4, sharding="zero1")
    assert z.time_breakdown_s["optimizer_s"] == pytest.approx(GRAPH.num_params / 4 / rate)


# ----------------------------------------------------------------- oversubscribed shared hosts
from cost_models import sharedhost  # noqa: E402


def _host(n: int, cores: int | None) -> HardwareSpec:
    """A 1-node machine of n processes on `cores` cores, per-process fair share of a per-core
    device (the A100 device figures stand in for a core; only ratios matter here)."""
    base = HardwareSpec.preset("dgx-a100-80gb", devices=n)
    f = 1.0 if cores is None else min(1.0, cores / n)
    dev = base.device.model_copy(update={
        "peak_flops_per_s": {k: v * f for k, v in base.device.peak_flops_per_s.items()},
        "memory_bandwidth_bytes_per_s": base.device.memory_bandwidth_bytes_per_s * f,
        "kernel_launch_s": 0.0})
    return base.model_copy(update={"device": dev, "shared_cores": cores, "device_is_host_cpu": True,
                                   "host": base.host.model_copy(update={"cpu_adam_params_per_s": 1e30})})


def test_unshared_restores_per_core_speed():
    hw = _host(4, 2)
    u = sharedhost.unshared(hw)
    assert u.device.peak_flops_per_s["fp32"] == pytest.approx(_host(4, None).device.peak_flops_per_s["fp32"])
    assert u.shared_cores is None and sharedhost.unshared(hw) == u
    assert not sharedhost.oversubscribed(_host(2, 2)) and sharedhost.oversubscribed(hw)


def test_pipeline_bubbles_give_their_cores_to_busy_ranks():
    # pp=4 gpipe, m=8, one process per stage on 2 cores: the schedule played with the cores shared
    # among runnable ranks (cost_models.sharedsim). Bounds: the critical path at a core each
    # ((m + p - 1)(F + B) for equal stages) and the CPU work p m (F + B) over 2 cores; the
    # warm-up and drain, where fewer than 2 ranks can run, leave cores idle.
    from cost_models.sharedsim import simulate_shared

    hw, per_core = _host(4, 2), _host(4, None)
    kw = dict(pp=4, dp=1, schedule="gpipe", micro_batch_size=2, num_micro_batches=8)
    shared, alone = _est(hw, **kw), _est(per_core, **kw)
    times = alone.stage_times_raw
    work = sum(8 * (f + b + w) for f, b, w, _ in times)
    assert shared.step_time_s > max(alone.step_time_s, work / 2)
    # no optimizer time on this host (rate 1e30) and no tensor parallelism: the pipeline alone
    assert shared.step_time_s == pytest.approx(simulate_shared("gpipe", 4, 8, 1, times, 2.0), rel=1e-9)
    assert shared.time_breakdown_s["core_sharing_s"] == pytest.approx(shared.step_time_s - alone.step_time_s)
    assert sum(shared.time_breakdown_s.values()) == pytest.approx(shared.step_time_s)
    # the static division (every process at half a core throughout) charges the bubble at half speed
    static = _est(hw.model_copy(update={"shared_cores": None}), **kw)
    assert static.step_time_s == pytest.approx(2 * alone.step_time_s, rel=1e-2)  # p2p is not halved
    assert shared.step_time_s < static.step_time_s


def test_lockstep_data_parallel_matches_the_static_division():
    # pp=1: all processes busy at once; W / C + comm = 2 x compute + comm = the static division
    hw = _host(4, 2)
    for sharding in ("none", "zero3"):
        shared = _est(hw, dp=4, sharding=sharding)
        static = _est(hw.model_copy(update={"shared_cores": None}), dp=4, sharding=sharding)
        assert shared.step_time_s == pytest.approx(static.step_time_s, rel=1e-6)


def test_no_sharing_when_cores_suffice_or_on_gpus():
    kw = dict(pp=2, dp=1, schedule="1f1b", micro_batch_size=2, num_micro_batches=4)
    assert _est(_host(2, 2), **kw).step_time_s == pytest.approx(_est(_host(2, None), **kw).step_time_s)
    assert "core_sharing_s" not in _est(HardwareSpec.preset("dgx-a100-80gb", devices=2), **kw).time_breakdown_s


def test_measured_core_efficiency_scales_the_host_capacity():
    kw = dict(pp=4, dp=1, schedule="gpipe", micro_batch_size=2, num_micro_batches=8)
    full = _host(4, 2)
    half = full.model_copy(update={"shared_core_efficiency": 0.5, "shared_memory_efficiency": 0.5})
    alone = _est(_host(4, None), **kw)
    work = sum(8 * (f + b + w) for f, b, w, _ in alone.stage_times_raw)
    t_full, t_half = _est(full, **kw).step_time_s, _est(half, **kw).step_time_s
    assert t_full > work / 2 and t_half > work / (2 * 0.5)
    assert t_half == pytest.approx(2 * t_full, rel=1e-3)  # every action's work doubles (p2p does not)


def test_compute_and_memory_contention_slow_their_own_ops():
    """With every core busy, compute-bound ops slow by shared_core_efficiency and memory-bound ones
    by shared_memory_efficiency: the work term lies strictly between the two uniform cases."""
    from cost_models import sharedhost

    kw = dict(pp=4, dp=1, schedule="gpipe", micro_batch_size=2, num_micro_batches=8)
    full = _host(4, 2)
    mem_only = full.model_copy(update={"shared_memory_efficiency": 0.5})
    flops_only = full.model_copy(update={"shared_core_efficiency": 0.5})
    both = full.model_copy(update={"shared_core_efficiency": 0.5, "shared_memory_efficiency": 0.5})
    t_full, t_mem, t_flops, t_both = (_est(h, **kw).step_time_s for h in (full, mem_only, flops_only, both))
    assert t_full < t_mem < t_both and t_full < t_flops < t_both
    # the split adds up: what each resource's slowdown adds is the whole slowdown's share
    assert (t_mem - t_full) + (t_flops - t_full) == pytest.approx(t_both - t_full, rel=0.05)
    c = sharedhost.contended(mem_only)
    u = sharedhost.unshared(mem_only)
    assert c.device.memory_bandwidth_bytes_per_s == pytest.approx(0.5 * u.device.memory_bandwidth_bytes_per_s)
    assert c.device.peak_flops_per_s == u.device.peak_flops_per_s
    assert c.host.cpu_adam_params_per_s == pytest.approx(0.5 * u.host.cpu_adam_params_per_s)


def test_calibrate_core_efficiency_closed_form():
    from runtime.calibrate import core_efficiency

    assert core_efficiency(aggregate=2e9, alone=1e9, cores=2, nproc=4) == 1.0
    assert core_efficiency(aggregate=1e9, alone=1e9, cores=2, nproc=4) == 0.5
    assert core_efficiency(aggregate=3e9, alone=1e9, cores=2, nproc=4) == 1.0  # clamped
    assert core_efficiency(aggregate=0.8e9, alone=1e9, cores=4, nproc=2) == 0.4


# ----------------------------------------------------------------- synchronisation on shared hosts
def test_sync_points_closed_forms():
    L = 8  # GRAPH: embed, 8 GPT layers (2 row-parallel outputs each), head
    k = lambda **kw: Knobs(**{"pp": 1, "dp": 1, "tp": 1, "micro_batch_size": 4, **kw})  # noqa: E731
    # DDP: fp32 gradients in 25 MiB buckets, once a step
    assert sharedhost.sync_points(GRAPH, k(dp=4), _stages(1)) == -(-4 * GRAPH.num_params // (25 * 2**20))
    # TP per micro-batch: 2 forward + 2 backward per layer, the vocab embedding (fwd) and head (bwd)
    assert sharedhost.sync_points(GRAPH, k(tp=2), _stages(1)) == 4 * L + 2
    assert sharedhost.sync_points(GRAPH, k(tp=2, sequence_parallel=True), _stages(1)) == 2 * (4 * L + 2)
    assert sharedhost.sync_points(GRAPH, k(tp=2, recompute="full"), _stages(1, "full")) == 4 * L + 2 + 2 * L + 1
    assert sharedhost.sync_points(GRAPH, k(tp=2, num_micro_batches=3), _stages(1)) == 3 * (4 * L + 2)
    # FSDP per micro-batch and block: zero3 gathers twice and reduce-scatters; zero2 gathers once
    nb = GRAPH.num_blocks
    assert sharedhost.sync_points(GRAPH, k(dp=4, sharding="zero3"), _stages(1)) == 3 * nb
    assert sharedhost.sync_points(GRAPH, k(dp=4, sharding="zero2", num_micro_batches=2), _stages(1)) == 2 * 2 * nb
    # pipeline: a receive per micro-batch in forward (not stage 0) and backward (not the last)
    pp = dict(micro_batch_size=2, num_micro_batches=8, schedule="1f1b")
    assert sharedhost.sync_points(GRAPH, k(pp=2, **pp), _stages(2)) == 8
    assert sharedhost.sync_points(GRAPH, k(pp=4, **pp), _stages(4)) == 16
    # interleaved (8 stages on 4 ranks): rank 1 holds stages 1 and 5, both inner: 4 receives per micro-batch
    il = k(pp=4, micro_batch_size=2, num_micro_batches=8, schedule="interleaved_1f1b", virtual_stages=2)
    assert sharedhost.sync_points(GRAPH, il, _stages(8)) == 8 * 4


def test_sync_penalty_adds_its_waits_to_the_shared_step():
    kw = dict(dp=2, tp=2, micro_batch_size=4)
    base = _host(4, 2)
    d = 1e-3
    slow = base.model_copy(update={"shared_sync_penalty_s": d})
    a, b = _est(base, **kw), _est(slow, **kw)
    n = sharedhost.sync_points(GRAPH, Knobs(pp=1, tp=2, dp=2, micro_batch_size=4), _stages(1))
    assert b.step_time_s - a.step_time_s == pytest.approx(n * d, rel=1e-9)
    assert b.time_breakdown_s["core_sharing_s"] - a.time_breakdown_s["core_sharing_s"] == pytest.approx(n * d)
    # no sharing (cores for every process, or GPUs): the field changes nothing
    roomy = _host(4, 4)
    assert _est(roomy.model_copy(update={"shared_sync_penalty_s": d}), **kw).step_time_s == pytest.approx(
        _est(roomy, **kw).step_time_s)
