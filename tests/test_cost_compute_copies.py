"""Compute model: batched matmuls at the efficiency of ONE GEMM, copies as separate kernels
(cost_models/compute.py), against closed forms written out here."""

from __future__ import annotations

import pytest

from cost_models.compute import layer_compute
from cost_models.efficiency import curves_for, interpolate, memory_efficiency
from specs import HardwareSpec, LayerType, OpInfo

pytestmark = pytest.mark.tier1

HW = HardwareSpec.preset("dgx-a100-80gb")
PEAK_FP32 = HW.device.peak_flops_per_s["fp32"]
B, H, T, D = 4, 8, 128, 48  # micro-batch, heads, tokens, head dim (the fidelity GPT's attention)


def _layer(*ops: OpInfo) -> LayerType:
    return LayerType(name="l", module_type="M", num_params=0, param_bytes=0.0,
                     fwd_flops_per_sample=sum(o.fwd_flops_per_sample for o in ops),
                     bwd_flops_per_sample=sum(o.bwd_flops_per_sample for o in ops),
                     saved_bytes_per_sample=0.0, input_bytes_per_sample=0.0,
                     output_bytes_per_sample=0.0, ops=list(ops))


def _scores(**kw) -> OpInfo:
    """q @ k^T of one sample: H GEMMs of (T x D) @ (D x T); no bytes, so it is compute bound."""
    fl = 2.0 * H * T * T * D
    base = dict(name="matmul", target="matmul", kind="matmul", fwd_flops_per_sample=fl,
                bwd_flops_per_sample=2 * fl, bytes_per_sample=0.0, tp_split="head",
                gemm_mnk=(H * T, T, D), output_shape=[1, H, T, T], gemm_batched=True)
    return OpInfo(**{**base, **kw})


def _lc(layer, tp=1, mb=B):
    return layer_compute(layer, HW, precision="fp32", traced_activation_dtype="fp32",
                         traced_param_dtype="fp32", tp=tp, sequence_parallel=False, micro_batch_size=mb)


def test_batched_matmul_uses_one_gemms_efficiency():
    curve = curves_for(HW)["matmul"]
    one_gemm = 2.0 * T * T * D  # 1.57 MFLOP
    total = 2.0 * H * T * T * D * B  # 50 MFLOP: the op's total at micro-batch 4
    assert interpolate(curve, one_gemm) < 0.5 * interpolate(curve, total)  # the test can tell them apart
    lc = _lc(_layer(_scores()))
    assert lc.forward_s == pytest.approx(total / (PEAK_FP32 * interpolate(curve, one_gemm)), rel=1e-12)
    # backward: two GEMMs per forward GEMM, each the same size
    assert lc.input_grad_s == pytest.approx(2 * total / (PEAK_FP32 * interpolate(curve, one_gemm)), rel=1e-12)
    # the per-GEMM size does not change with micro-batch or tp: time is linear in both
    assert _lc(_layer(_scores()), mb=1).forward_s == pytest.approx(lc.forward_s / B, rel=1e-12)
    assert _lc(_layer(_scores()), tp=2).forward_s == pytest.approx(lc.forward_s / 2, rel=1e-12)


def test_unrecorded_batching_follows_params_and_shape():
    """gemm_batched None (graphs made before the field): no parameters and >= 3-D output -> batched."""
    curve = curves_for(HW)["matmul"]
    total = 2.0 * H * T * T * D * B
    lc = _lc(_layer(_scores(gemm_batched=None)))
    assert lc.forward_s == pytest.approx(total / (PEAK_FP32 * interpolate(curve, 2.0 * T * T * D)), rel=1e-12)


def test_folded_matmul_keeps_its_total():
    """A Linear on (B, T, C) is one GEMM of B*T rows: efficiency at the op's total FLOPs."""
    curve = curves_for(HW)["matmul"]
    fl = 2.0 * T * 384 * 384
    lin = OpInfo(name="q_proj", target="Linear", kind="matmul", fwd_flops_per_sample=fl,
                 bwd_flops_per_sample=2 * fl, bytes_per_sample=0.0, param_bytes=1.0, tp_split="column",
                 gemm_mnk=(T, 384, 384), output_shape=[1, T, 384], gemm_batched=False)
    lc = _lc(_layer(lin))
    assert lc.forward_s == pytest.approx(fl * B / (PEAK_FP32 * interpolate(curve, fl * B)), rel=1e-9)
    # the same op marked batched would be slower: the flag is what decides
    lc_b = _lc(_layer(lin.model_copy(update={"gemm_batched": True})))
    assert lc_b.forward_s > 1.5 * lc.forward_s
    # an explicit False wins over the shape rule for an activation x 2-D activation matmul
    folded = _scores(gemm_batched=False)
    assert _lc(_layer(folded)).forward_s == pytest.approx(
        2.0 * H * T * T * D * B / (PEAK_FP32 * interpolate(curve, 2.0 * H * T * T * D * B)), rel=1e-12)


def _copy_time(n_bytes_each: float) -> float:
    bw = HW.device.memory_bandwidth_bytes_per_s
    return max(HW.device.kernel_launch_s, n_bytes_each / (bw * memory_efficiency(curves_for(HW), n_bytes_each)))


def test_copies_are_separate_kernels_in_forward_and_input_grad():
    per_copy = 2.0 * T * H * D * 4  # one sample, fp32, read + write
    base = _scores()
    with_copies = _scores(copy_bytes_per_sample=2 * per_copy, num_copies=2,
                          bwd_copy_bytes_per_sample=per_copy, num_bwd_copies=1)
    a, b = _lc(_layer(base)), _lc(_layer(with_copies))
    each = _copy_time(per_copy * B)
    assert b.forward_s - a.forward_s == pytest.approx(2 * each, rel=1e-9)
    assert b.input_grad_s - a.input_grad_s == pytest.approx(each, rel=1e-9)
    assert b.weight_grad_s == a.weight_grad_s
    assert b.copy_s == pytest.approx(3 * each, rel=1e-9)
    # an attention-core op: selective recompute re-runs its forward copies
    assert b.attention_core_forward_s - a.attention_core_forward_s == pytest.approx(2 * each, rel=1e-9)
    # FLOPs are unchanged by copies
    assert (b.fwd_flops, b.bwd_flops) == (a.fwd_flops, a.bwd_flops)
    # split by tp like the op (head): each copy kernel moves half the bytes
    a2, b2 = _lc(_layer(base), tp=2), _lc(_layer(with_copies), tp=2)
    assert b2.forward_s - a2.forward_s == pytest.approx(2 * _copy_time(per_copy * B / 2), rel=1e-9)
    # bf16 training of an fp32 trace: half the bytes
    bf = layer_compute(_layer(with_copies), HW, precision="bf16", traced_activation_dtype="fp32",
                       traced_param_dtype="fp32", tp=1, sequence_parallel=False, micro_batch_size=B)
    assert bf.copy_s == pytest.approx(3 * _copy_time(per_copy * B / 2), rel=1e-9)


def test_copy_on_a_replicated_op_is_not_split():
    per_copy = 1e6
    op = OpInfo(name="gelu", target="gelu", kind="elementwise", fwd_flops_per_sample=0.0,
                bwd_flops_per_sample=0.0, bytes_per_sample=0.0, tp_split="replicate",
                copy_bytes_per_sample=per_copy, num_copies=1)
    assert _lc(_layer(op), tp=4).copy_s == pytest.approx(_copy_time(per_copy * B), rel=1e-9)
