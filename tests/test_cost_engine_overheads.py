"""Data-parallel engines' own copies (cost_models.ranks: fsdp_copies_s, DataParallelTerms.step_copy_s),
each against a closed form: FSDP2 copies the local shard into the all-gather input and the
gathered buffer out into the unsharded parameters at every gather, and the unsharded gradients
into every reduce-scatter's input; DDP copies gradients into its buckets and back once a step."""

from __future__ import annotations

import math

import pytest

from cost_models import estimate_knobs
from cost_models.compute import copies_time_s
from cost_models.efficiency import curves_for
from cost_models.memory import DDP_BUCKET_BYTES
from specs import HardwareSpec, Knobs, TrainSpec
from tests.graphs import gpt_graph

GRAPH = gpt_graph(vocab=2048, hidden=384, layers=8, heads=8, seq_len=128, dtype="fp32")
HW = HardwareSpec.preset("dgx-a100-80gb", devices=4)
TRAIN = TrainSpec(global_batch_size=16, precision="fp32", optimizer="adamw")
ONE_STAGE = [(0, GRAPH.num_blocks - 1, "none")]


def _est(sharding: str, **kw):
    kn = Knobs(**{"pp": 1, "tp": 1, "dp": 4, "micro_batch_size": 4, "sharding": sharding, **kw})
    return estimate_knobs(GRAPH, kn, ONE_STAGE, HW, TRAIN)


def _copy(n_bytes: float, kernels: int = 1) -> float:
    return copies_time_s(n_bytes, kernels, HW, curves_for(HW))


def _block_params() -> list[float]:
    """Parameters per block as the FSDP terms take them: the stage's mean block (as its
    all-gathers and reduce-scatters are costed)."""
    nb = GRAPH.num_blocks
    return [sum(GRAPH.layer(b).num_params for b in range(nb)) / nb] * nb


def _grad_bytes() -> float:
    return 4 * GRAPH.num_params  # fp32 gradients; the tied embedding once


def test_zero3_charges_gather_copies_in_forward_and_backward_and_reduce_scatter_copy_in():
    base, z3 = _est("zero1"), _est("zero3")
    n = 4
    fwd = bwd = 0.0
    for p in _block_params():
        gather = _copy(2 * 4 * p / n) + _copy(2 * 4 * p)  # fp32: copy-in of the shard, copy-out of all
        fwd += gather
        bwd += gather + _copy(2 * 4 * p)  # and the gradients into the reduce-scatter input
    assert z3.time_breakdown_s["compute_forward_s"] == pytest.approx(
        base.time_breakdown_s["compute_forward_s"] + fwd, rel=1e-9)
    # zero1's backward carries DDP's bucket copies once per step; zero3's does not
    assert z3.time_breakdown_s["compute_backward_s"] == pytest.approx(
        base.time_breakdown_s["compute_backward_s"] - _ddp_copy() + bwd, rel=1e-9)
    assert fwd > 0 and bwd > fwd


def _ddp_copy() -> float:
    grad = _grad_bytes()
    return _copy(4 * grad, 2 * math.ceil(grad / DDP_BUCKET_BYTES))


def test_zero2_gathers_in_forward_only_and_copies_gradients_once_per_step():
    once = _copy(2 * _grad_bytes())
    for mb, m in ((4, 1), (2, 2), (1, 4)):
        z1, z2, z3 = (_est(s, micro_batch_size=mb, num_micro_batches=m) for s in ("zero1", "zero2", "zero3"))
        # forward: one gather per block per micro-batch, as zero3
        assert z2.time_breakdown_s["compute_forward_s"] == pytest.approx(z3.time_breakdown_s["compute_forward_s"])
        # backward: the same compute as zero1 (no gathers), with the reduce-scatter copy-in once a
        # step in place of DDP's bucket copies, whatever the micro-batch count
        assert z2.time_breakdown_s["compute_backward_s"] - z1.time_breakdown_s["compute_backward_s"] == (
            pytest.approx(once - _ddp_copy(), rel=1e-9, abs=1e-15))


def _backward_at(mb: int) -> float:
    """Backward compute of one micro-batch of `mb` samples on one device (nothing to copy)."""
    e = estimate_knobs(GRAPH, Knobs(pp=1, tp=1, dp=1, micro_batch_size=mb), ONE_STAGE,
                       HardwareSpec.preset("dgx-a100-80gb", devices=1),
                       TrainSpec(global_batch_size=mb, precision="fp32", optimizer="adamw"))
    return e.time_breakdown_s["compute_backward_s"]


def test_ddp_copies_gradients_into_buckets_and_back_once_per_step():
    for mb, m in ((4, 1), (2, 2), (1, 4)):
        e = _est("none", micro_batch_size=mb, num_micro_batches=m)
        assert e.time_breakdown_s["compute_backward_s"] == pytest.approx(m * _backward_at(mb) + _ddp_copy(),
                                                                         rel=1e-9)
    assert _ddp_copy() > 0


def test_copies_are_part_of_the_step_and_its_breakdown():
    for sharding in ("none", "zero1", "zero2", "zero3"):
        e = _est(sharding)
        assert sum(e.time_breakdown_s.values()) == pytest.approx(e.step_time_s)


def test_copy_in_shrinks_with_more_shards_copy_out_does_not():
    from cost_models import CostModel
    from cost_models.ranks import fsdp_copies_s

    model = CostModel(GRAPH, HW, TRAIN)
    f2, _ = fsdp_copies_s(model, 1e9, 1, 2, True)
    f8, _ = fsdp_copies_s(model, 1e9, 1, 8, True)
    assert f8 < f2
    assert f8 > _copy(2 * 4e9)  # the copy-out of the whole block remains
    _, b_zero2 = fsdp_copies_s(model, 1e9, 1, 8, False)
    assert b_zero2 == 0.0


# ------------------------------------------------------------- DTensor's host time (CPU hosts)
from cost_models.compute import TP_SPLIT  # noqa: E402
from specs import DTensorOverhead  # noqa: E402


def _host_cpu(overhead: DTensorOverhead | None, devices: int, gpu: bool = False) -> HardwareSpec:
    hw = HardwareSpec.preset("dgx-a100-80gb", devices=devices)
    return hw.model_copy(update={"device_is_host_cpu": not gpu, "dtensor_overhead": overhead})


def _ops(pred) -> float:
    return float(sum(1 for b in range(GRAPH.num_blocks) for op in GRAPH.layer(b).ops if pred(op)))


def _est_on(overhead: DTensorOverhead | None, gpu: bool = False, **kw):
    kn = Knobs(**{"pp": 1, "tp": 1, "dp": 1, "micro_batch_size": 4, **kw})
    tr = TrainSpec(global_batch_size=kn.dp * kn.micro_batch_size * kn.num_micro_batches, precision="fp32",
                   optimizer="adamw")
    return estimate_knobs(GRAPH, kn, ONE_STAGE, _host_cpu(overhead, kn.pp * kn.dp * kn.tp, gpu), tr)


def test_dtensor_overhead_per_tensor_parallel_op_in_forward_backward_and_optimizer():
    ov = DTensorOverhead(forward_s=1e-3, backward_s=3e-3, optimizer_s=5e-4)
    n_tp = _ops(lambda op: op.tp_split in TP_SPLIT and op.param_bytes > 0)
    assert n_tp > 0
    for m in (1, 2):
        kw = dict(tp=2, micro_batch_size=4 // m, num_micro_batches=m)
        a, b = _est_on(None, **kw), _est_on(ov, **kw)
        da = {k: b.time_breakdown_s[k] - a.time_breakdown_s[k] for k in a.time_breakdown_s}
        assert da["compute_forward_s"] == pytest.approx(m * n_tp * 1e-3, rel=1e-9)
        assert da["compute_backward_s"] == pytest.approx(m * n_tp * 3e-3, rel=1e-9)
        assert da["optimizer_s"] == pytest.approx(n_tp * 5e-4, rel=1e-9)
    # tp = 1: no DTensor in compute, nor in a plain optimizer
    assert _est_on(ov).step_time_s == pytest.approx(_est_on(None).step_time_s)


def test_dtensor_optimizer_overhead_covers_every_parameter_fsdp2_holds():
    ov = DTensorOverhead(forward_s=0.0, backward_s=0.0, optimizer_s=5e-4)
    n_all = _ops(lambda op: op.param_bytes > 0)
    for sharding in ("zero2", "zero3"):
        a = _est_on(None, dp=2, sharding=sharding)
        b = _est_on(ov, dp=2, sharding=sharding)
        assert b.time_breakdown_s["optimizer_s"] - a.time_breakdown_s["optimizer_s"] == pytest.approx(
            n_all * 5e-4, rel=1e-9)
    # DDP's parameters are plain tensors
    a, b = _est_on(None, dp=2), _est_on(ov, dp=2)
    assert b.step_time_s == pytest.approx(a.step_time_s)


def test_dtensor_overhead_is_not_charged_on_gpus():
    ov = DTensorOverhead(forward_s=1e-3, backward_s=1e-3, optimizer_s=1e-3)
    assert _est_on(ov, gpu=True, tp=2).step_time_s == pytest.approx(_est_on(None, gpu=True, tp=2).step_time_s)
    assert _est_on(ov, tp=2).step_time_s > _est_on(None, tp=2).step_time_s


# ---------------------------------------------------------- the pipelining engine's host time
def _pp_stages(n: int) -> list[tuple[int, int, str]]:
    nb = GRAPH.num_blocks
    cuts = [round(i * nb / n) for i in range(n + 1)]
    return [(cuts[i], cuts[i + 1] - 1, "none") for i in range(n)]


def _stage_times(overhead: float, pp: int, gpu: bool = False):
    hw = _host_cpu(None, pp, gpu).model_copy(update={"pipeline_action_overhead_s": overhead})
    kn = Knobs(pp=pp, tp=1, dp=1, micro_batch_size=2, num_micro_batches=4, schedule="1f1b")
    tr = TrainSpec(global_batch_size=8, precision="fp32", optimizer="adamw")
    return estimate_knobs(GRAPH, kn, _pp_stages(pp), hw, tr)


def test_pipeline_engine_time_per_forward_and_backward_action_on_cpu_hosts():
    a, b = _stage_times(0.0, 2), _stage_times(2e-3, 2)
    for (f0, b0, w0, c0), (f1, b1, w1, c1) in zip(a.stage_times_raw, b.stage_times_raw, strict=True):
        assert (f1 - f0, b1 - b0, w1 - w0, c1 - c0) == pytest.approx((2e-3, 2e-3, 0.0, 0.0), abs=1e-15)
    # each rank's forward and backward compute carry it once per micro-batch
    assert b.time_breakdown_s["compute_forward_s"] - a.time_breakdown_s["compute_forward_s"] == pytest.approx(4 * 2e-3)
    # one stage (no pipeline engine) and GPUs: not charged
    assert _stage_times(2e-3, 1).step_time_s == pytest.approx(_stage_times(0.0, 1).step_time_s)
    assert _stage_times(2e-3, 2, gpu=True).step_time_s == pytest.approx(_stage_times(0.0, 2, gpu=True).step_time_s)
