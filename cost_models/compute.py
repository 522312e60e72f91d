"""Compute time of ops and layers: a roofline with size-dependent efficiency and a launch floor.

Per op, for one micro-batch on one tensor-parallel rank:

    time_s = max(flops / (peak_flops_per_s[dtype] * eff_compute(kind, flops)),
                 bytes / (memory_bandwidth_bytes_per_s * eff_memory(bytes)),
                 kernel_launch_s)

- `flops` and `bytes` are the op's per-sample figures x micro-batch size, divided by its split:
  ops split by tensor parallelism (`column`, `row`, `head`, `vocab`, `conv_out`) by `tp`;
  `sequence` ops (norms, dropout, residual adds) by `tp` only with sequence parallelism;
  `replicate` ops are computed in full on every tp rank.
- Efficiency curves: cost_models.efficiency (calibrated curves from the HardwareSpec win); the
  bytes of each op use the memory curve of its kind (copy / elementwise / row reduction).
- dtype: bf16/fp16 mixed precision computes in that dtype; fp32 training uses the fp32 peak
  (PyTorch's default keeps TF32 off for matmuls).
- Backward: from the op's backward FLOPs. An op with parameters splits them into the
  input-gradient part (B) and the weight-gradient part (W, one GEMM the size of the forward,
  Narayanan et al. 2021 / Qi et al. 2023), so zero-bubble schedules can move W. Memory-bound
  ops read the saved input and the output grad and write the input grad: 2x forward bytes
  (an estimate). Ops without FLOP counts cost their bytes only.
- Bytes recorded at the traced dtype are rescaled to the training dtype by itemsize ratio.
- Batched matmuls: an activation x activation matmul with batch dims (`OpInfo.gemm_batched`, e.g.
  attention's q @ k^T on (B, heads, T, d)) runs as B*heads independent GEMMs (aten.bmm), so its
  compute efficiency is looked up at the FLOPs of ONE GEMM, 2 * out[-2] * out[-1] * k, not at the
  op's total (GPT hidden 384, 8 heads, T 128: 1.5 MFLOP per GEMM against 50 MFLOP per op at
  micro-batch 4). Its backward GEMMs have the same size. A Linear (or a matmul with a 2-D
  operand) on a 3-D input is one GEMM of batch * seq rows (PyTorch folds it): its total is kept.
- Copies: `OpInfo.copy_bytes_per_sample` / `bwd_copy_bytes_per_sample` (materialising copies the
  tracer saw around the op, planner/measure.py) are charged as `num_copies` / `num_bwd_copies`
  separate kernels of equal size, each with its own launch, at the copy ("memory") efficiency
  curve and the memory bandwidth: forward copies in forward time, backward copies in
  input-grad (B) time. They split by tp like their op and scale with micro-batch and dtype like
  activation bytes.
- The attention core (ops split by `head`, or of kind `attention`) is timed separately: selective
  recompute re-runs exactly that forward, its copies included.
"""

from __future__ import annotations

from dataclasses import dataclass

from cost_models.efficiency import Curves, compute_efficiency, curves_for, memory_efficiency
from specs import ExpertsInfo, HardwareSpec, LayerType, OpInfo

ITEMSIZE = {"fp64": 8, "fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int64": 8,
            "float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
COMPUTE_KINDS = frozenset({"matmul", "attention", "conv"})
TP_SPLIT = frozenset({"column", "row", "head", "vocab", "conv_out"})


def itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name ('bf16', 'fp32', 'float32', ...)."""
    try:
        return ITEMSIZE[dtype.replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(ITEMSIZE))}") from None


def compute_dtype(precision: str) -> str:
    """The dtype matmuls run in for a TrainSpec.precision."""
    return {"bf16": "bf16", "fp16": "fp16"}.get(precision, "fp32")


def peak_flops_per_s(hw: HardwareSpec, dtype: str) -> float:
    """Dense peak FLOP/s of the device in `dtype`; falls back to fp32 when the preset lacks it."""
    peaks = hw.device.peak_flops_per_s
    if dtype in peaks:
        return peaks[dtype]
    if "fp32" in peaks:
        return peaks["fp32"]
    return min(peaks.values())


def op_time_s(flops: float, n_bytes: float, kind: str, hw: HardwareSpec, curves: Curves, peak: float,
              *, eff_flops: float | None = None) -> float:
    """Roofline time of one kernel (see module docstring). `eff_flops`: the problem size the
    compute efficiency is looked up at (one GEMM of a batched matmul); default `flops`."""
    t = hw.device.kernel_launch_s
    if flops > 0 and kind in COMPUTE_KINDS:
        size = flops if eff_flops is None else eff_flops
        t = max(t, flops / (peak * compute_efficiency(curves, kind, size)))
    if n_bytes > 0:
        bw = hw.device.memory_bandwidth_bytes_per_s
        t = max(t, n_bytes / (bw * memory_efficiency(curves, n_bytes, kind)))
    if flops > 0 and kind not in COMPUTE_KINDS:
        # FLOPs of an op we have no compute curve for (e.g. a fused norm): at the matmul curve.
        t = max(t, flops / (peak * compute_efficiency(curves, "matmul", flops)))
    return t


def gemm_flops(op: OpInfo) -> float | None:
    """FLOPs of ONE GEMM of a batched matmul op (2 * out[-2] * out[-1] * k), None for an op that is
    a single GEMM (or not a matmul). Batched: `op.gemm_batched`, or where the tracer did not record
    it, a matmul without parameters whose output has >= 3 dims."""
    if op.kind != "matmul" or op.gemm_mnk is None or not op.output_shape or len(op.output_shape) < 3:
        return None
    batched = op.gemm_batched if op.gemm_batched is not None else op.param_bytes == 0
    if not batched:
        return None
    return 2.0 * op.output_shape[-2] * op.output_shape[-1] * op.gemm_mnk[2]


def copies_time_s(n_bytes: float, kernels: int, hw: HardwareSpec, curves: Curves) -> float:
    """Time of `kernels` copy kernels moving `n_bytes` (read + write) in all, taken as equal
    in size, each at the copy ("memory") curve and the memory bandwidth, with its own launch."""
    if n_bytes <= 0:
        return 0.0
    k = max(kernels, 1)
    return k * op_time_s(0.0, n_bytes / k, "memory", hw, curves, 1.0)


def expert_op_scaling(experts: ExpertsInfo, mb: float, ep: int, imbalance: float) -> tuple[float, int, float]:
    """(work factor, parameter split, FLOPs of one expert GEMM) of a mixture-of-experts layer's
    experts op on one rank, for `mb` samples per micro-batch.

    One process computes all E experts on its N*k routed rows (N = tokens, dropless), as the
    traced op does. Under expert parallelism (ep > 1) a rank holds E/ep experts (the op reads
    1/ep of their weights) and computes the rows every rank of its EP group routes to them: N*k
    on average, `imbalance` times that on the busiest rank, which the others wait for at the
    combine all-to-all (work factor = imbalance; 1 at ep = 1, where a rank computes its own
    tokens whatever the routing). Each expert's GEMMs run at its row count, N*k*ep/E on average
    (x imbalance: the busiest expert), so the compute efficiency is looked up at
    2 * rows * hidden * ffn_hidden FLOPs, the size of one expert's GEMM, not at the op's total:
    more ep gives each expert more rows, larger GEMMs, higher efficiency."""
    rows = experts.routed_rows_per_sample * mb * ep / experts.num_experts
    work = imbalance if ep > 1 else 1.0
    gemm = 2.0 * max(rows * imbalance, 1.0) * experts.hidden * experts.ffn_hidden
    return work, ep, gemm


@dataclass(frozen=True, slots=True)
class LayerCompute:
    """Compute times of one layer for one micro-batch on one tp rank (seconds) and its FLOPs."""

    forward_s: float
    input_grad_s: float  # B: backward w.r.t. inputs (and all of backward for ops without params)
    weight_grad_s: float  # W: backward w.r.t. parameters
    attention_core_forward_s: float  # what selective recompute re-runs
    fwd_flops: float  # per tp rank, this micro-batch
    bwd_flops: float
    attention_core_fwd_flops: float
    copy_s: float = 0.0  # part of forward_s + input_grad_s spent in materialising copies


def is_attention_core(op: OpInfo) -> bool:
    return op.tp_split == "head" or op.kind == "attention"


def layer_compute(
    layer: LayerType,
    hw: HardwareSpec,
    *,
    precision: str,
    traced_activation_dtype: str,
    traced_param_dtype: str,
    tp: int,
    sequence_parallel: bool,
    micro_batch_size: float,
    curves: Curves | None = None,
    ep: int = 1,
    expert_load_imbalance: float = 1.0,
    cp: int = 1,
) -> LayerCompute:
    """Forward / input-grad / weight-grad times of `layer` (see module docstring). `curves`: the
    efficiency curves of `hw` (cost_models.efficiency.curves_for; made here when not given).
    `ep`, `expert_load_imbalance`: expert parallelism of its experts op, if any
    (`expert_op_scaling`). `cp`: context parallelism; `micro_batch_size` is then the tokens a rank
    holds in samples (micro-batch / cp) and a batched matmul's GEMMs (attention's) are 1/cp the
    size (its queries are the local ones)."""
    curves = curves if curves is not None else curves_for(hw)
    dtype = compute_dtype(precision)
    peak = peak_flops_per_s(hw, dtype)
    act_scale = itemsize(dtype) / itemsize(traced_activation_dtype)
    par_scale = itemsize(dtype) / itemsize(traced_param_dtype)
    mb = micro_batch_size
    forward_s = input_grad_s = weight_grad_s = core_forward_s = copy_s = 0.0
    fwd_flops = bwd_flops = core_flops = 0.0
    ops = layer.ops
    if not ops:
        # A block the tracer gave no per-op detail for: one matmul-like op with its totals.
        split = tp if layer.tp_candidates else 1
        f = layer.fwd_flops_per_sample * mb / split
        b = layer.bwd_flops_per_sample * mb / split
        act_bytes = (layer.input_bytes_per_sample + layer.output_bytes_per_sample) * mb * act_scale / split
        param_bytes = layer.param_bytes * par_scale / split
        op_forward_s = op_time_s(f, act_bytes + param_bytes, "matmul", hw, curves, peak)
        weight_flops = min(f, b / 2) if layer.num_params else 0.0
        op_weight_s = op_time_s(weight_flops, param_bytes, "matmul", hw, curves, peak) if weight_flops else 0.0
        op_input_s = op_time_s(b - weight_flops, act_bytes, "matmul", hw, curves, peak)
        return LayerCompute(op_forward_s, op_input_s, op_weight_s, 0.0, f, b, 0.0)
    for op in ops:
        if op.tp_split in TP_SPLIT:
            split = tp
        elif op.tp_split == "sequence" and sequence_parallel:
            split = tp
        else:
            split = 1
        f = op.fwd_flops_per_sample * mb / split
        b = op.bwd_flops_per_sample * mb / split
        act_bytes = op.bytes_per_sample * mb * act_scale / split
        # parameters read by the op (an embedding lookup reads only its rows: counted in act_bytes)
        param_bytes = 0.0 if op.kind == "embedding" else op.param_bytes * par_scale / (split if op.tp_split in TP_SPLIT else 1)
        gemm_size = gemm_flops(op)  # one GEMM of a batched matmul: independent of tp and micro-batch
        if gemm_size is not None and cp > 1:
            gemm_size /= cp
        if op.experts is not None:
            work, param_split, gemm_size = expert_op_scaling(op.experts, mb, ep, expert_load_imbalance)
            f, b, act_bytes, param_bytes = f * work, b * work, act_bytes * work, param_bytes / param_split
        op_forward_s = op_time_s(f, act_bytes + param_bytes, op.kind, hw, curves, peak, eff_flops=gemm_size)
        copy_forward_s = copies_time_s(op.copy_bytes_per_sample * mb * act_scale / split, op.num_copies, hw, curves)
        copy_backward_s = copies_time_s(op.bwd_copy_bytes_per_sample * mb * act_scale / split, op.num_bwd_copies,
                                        hw, curves)
        forward_s += op_forward_s + copy_forward_s
        input_grad_s += copy_backward_s
        copy_s += copy_forward_s + copy_backward_s
        fwd_flops += f
        bwd_flops += b
        if is_attention_core(op):
            core_forward_s += op_forward_s + copy_forward_s
            core_flops += f
        if op.param_bytes > 0 and b > 0 and op.kind in COMPUTE_KINDS:
            weight_flops = min(f, b / 2)  # weight grad: one GEMM the size of the forward
            per_gemm = gemm_size if op.experts is not None else None  # one expert's GEMM
            weight_grad_s += op_time_s(weight_flops, param_bytes + act_bytes / 2, op.kind, hw, curves, peak,
                                       eff_flops=per_gemm)
            input_grad_s += op_time_s(b - weight_flops, act_bytes, op.kind, hw, curves, peak, eff_flops=per_gemm)
        elif b > 0:
            # a batched matmul's backward GEMMs (dA = dC B^T, dB = A^T dC) are each the size of
            # one forward GEMM
            input_grad_s += op_time_s(b, 2 * act_bytes, op.kind, hw, curves, peak, eff_flops=gemm_size)
        else:
            input_grad_s += op_time_s(0.0, 2 * act_bytes, op.kind, hw, curves, peak)
    return LayerCompute(forward_s, input_grad_s, weight_grad_s, core_forward_s, fwd_flops, bwd_flops, core_flops, copy_s)
