"""Default efficiency curves: achieved fraction of peak as a function of problem size.

Model: an op of `size` (FLOPs for compute kinds, bytes moved for memory kinds) achieves
`efficiency(kind, size)` of the device's peak. The curve is piecewise linear in log10(size),
clamped at both ends. A calibrated `HardwareSpec.efficiency[kind]` (from `autoplan calibrate`,
i.e. microbenchmarks on the real machine) always replaces the default curve of that kind.
Memory-bound ops use the curve of their own kind (MEMORY_CURVE: copy-like "memory",
"elementwise", or row-reduction "other"), each falling back to "memory" where not calibrated.

The defaults below are ESTIMATES read off published microbenchmark plots, not fitted to any
end-to-end training throughput (the dgx-h100-80gb and dgx-h200 presets carry curves measured on
those GPUs instead, specs/presets):

- compute (matmul, attention, conv): NVIDIA "Matrix Multiplication Background User's Guide"
  (docs.nvidia.com/deeplearning/performance/dl-performance-matrix-multiplication), whose
  A100 GEMM plots show small problems (~1e8 FLOPs) latency-bound at a few-to-15% of peak,
  1e10-FLOP problems around half of peak, and large square GEMMs (>1e12 FLOPs) at 70-80%
  of the dense tensor-core peak. FlashAttention-2 (Dao 2023, Fig. 4-6) reaches 50-73% of
  A100 peak on long sequences, so attention uses a curve one notch below matmul.
- memory-bound ops (norm, softmax, elementwise, ...): BabelStream/STREAM copy/triad on
  A100/H100 reach ~85-90% of the datasheet HBM bandwidth for buffers >= 1e8 bytes; below
  ~1e6 bytes launch latency dominates (Jia et al. 2018 "Dissecting Volta"; NVIDIA Nsight
  traces of small elementwise kernels).

Each point is (size, efficiency). These are guesses with stated sources: replace with
`autoplan calibrate` figures for any number that matters.
"""

from __future__ import annotations

import math

from specs import HardwareSpec

Curve = tuple[tuple[float, float], ...]  # (size, efficiency) pairs, size ascending
Curves = dict[str, Curve]  # by curve kind

# (size, efficiency) pairs, size ascending. See the module docstring for sources.
DEFAULT_CURVES: Curves = {
    # FLOPs per op -> fraction of dense peak FLOP/s
    "matmul": ((1e6, 0.01), (1e8, 0.12), (1e9, 0.30), (1e10, 0.55), (1e11, 0.70), (1e12, 0.78)),
    "conv": ((1e6, 0.01), (1e8, 0.10), (1e9, 0.25), (1e10, 0.45), (1e11, 0.60), (1e12, 0.65)),
    "attention": ((1e6, 0.01), (1e8, 0.08), (1e9, 0.22), (1e10, 0.45), (1e11, 0.60), (1e12, 0.65)),
    # bytes moved per op -> fraction of peak memory bandwidth
    "memory": ((1e4, 0.02), (1e6, 0.25), (1e7, 0.55), (1e8, 0.80), (1e9, 0.85)),
}

# Which curve each graph op kind uses for its compute part (memory kinds have none).
COMPUTE_CURVE = {"matmul": "matmul", "attention": "attention", "conv": "conv"}
# Which curve each graph op kind uses for its bytes. `autoplan calibrate` measures three kinds of
# memory-bound op (runtime/calibrate_bench.py): "memory" = a plain copy, "elementwise" = add/gelu
# (one pass, no reduction), "other" = softmax/layer_norm (row reductions: two or three passes).
# Norms, softmax, reductions and the loss are row reductions; elementwise ops and dropout are
# elementwise; everything else (GEMM/conv operands, embedding gathers, unknown ops) moves bytes
# like a copy. A curve the hardware does not calibrate falls back to its "memory" curve.
MEMORY_CURVE = {
    "elementwise": "elementwise", "dropout": "elementwise",
    "norm": "other", "softmax": "other", "reduction": "other", "loss": "other",
}
MEMORY_CURVE_KEYS = ("memory", "elementwise", "other")


def interpolate(points: Curve, size: float) -> float:
    """Piecewise-linear in log10(size), clamped to the first/last point."""
    if size <= points[0][0]:
        return points[0][1]
    if size >= points[-1][0]:
        return points[-1][1]
    x = math.log10(size)
    for (s0, e0), (s1, e1) in zip(points, points[1:], strict=False):
        if size <= s1:
            x0, x1 = math.log10(s0), math.log10(s1)
            return e0 + (e1 - e0) * (x - x0) / (x1 - x0)
    return points[-1][1]  # pragma: no cover - unreachable


_DEFAULTS = {**DEFAULT_CURVES, **{k: DEFAULT_CURVES["memory"] for k in MEMORY_CURVE_KEYS}}


def curves_for(hw: HardwareSpec) -> Curves:
    """Default curves with the hardware's calibrated ones (if any) substituted, by kind (a
    CostModel makes them once: cost_models.model)."""
    if not hw.efficiency:
        return _DEFAULTS
    curves = dict(DEFAULT_CURVES)
    for kind, pts in sorted(hw.efficiency.items()):
        if pts:
            curves[kind] = tuple(sorted((p.size, p.efficiency) for p in pts))
    for memory_kind in MEMORY_CURVE_KEYS:
        curves.setdefault(memory_kind, curves["memory"])
    return curves


def compute_efficiency(curves: Curves, kind: str, flops: float) -> float:
    """Fraction of peak FLOP/s an op of `flops` FLOPs achieves (matmul/attention/conv)."""
    return interpolate(curves[COMPUTE_CURVE.get(kind, "matmul")], flops)


def memory_efficiency(curves: Curves, n_bytes: float, kind: str = "memory") -> float:
    """Fraction of peak memory bandwidth an op of graph kind `kind` moving `n_bytes` achieves
    (the curve MEMORY_CURVE picks for that kind)."""
    return interpolate(curves[MEMORY_CURVE.get(kind, "memory")], n_bytes)
