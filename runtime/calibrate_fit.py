"""Pure alpha-beta fits for `autoplan calibrate`: per-collective fits (`fit_alpha_beta`) and the
joint link fit (`fit_link`) with the cost model's own collective formulas (`model_time_s`,
cost_models/comm.py's docstring). No measurement, no torch.distributed."""

from __future__ import annotations

import math

RING = {
    "all_reduce": (lambda n: 2 * (n - 1), lambda n: 2 * (n - 1) / n),
    "all_gather": (lambda n: n - 1, lambda n: (n - 1) / n),
    "reduce_scatter": (lambda n: n - 1, lambda n: (n - 1) / n),
    "broadcast": (lambda n: n - 1, lambda n: 1.0),
    "p2p": (lambda n: 1, lambda n: 1.0),
}


# ------------------------------------------------------------------------------- pure helpers
def fit_alpha_beta(
    points: list[tuple[float, float]], steps: float, bus: float
) -> tuple[float, float]:
    """Fit t = steps * alpha + bus * S / B to [(S_bytes, t_s)]; returns (alpha_s, B_bytes_per_s).

    Weighted least squares on relative error (each row divided by its t), alpha and 1/B clamped
    to >= 0 (a clamped coefficient is refitted alone).
    """
    if len(points) < 2:
        raise ValueError("fit_alpha_beta: need at least two message sizes")
    rows = [(steps / t, bus * s / t) for s, t in points]  # target is 1 for every row
    a11 = sum(r[0] * r[0] for r in rows)
    a12 = sum(r[0] * r[1] for r in rows)
    a22 = sum(r[1] * r[1] for r in rows)
    b1 = sum(r[0] for r in rows)
    b2 = sum(r[1] for r in rows)
    det = a11 * a22 - a12 * a12
    alpha, inv_bw = (a22 * b1 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det
    if alpha < 0:
        alpha, inv_bw = 0.0, b2 / a22
    elif inv_bw <= 0:
        alpha, inv_bw = b1 / a11, 0.0
    largest_s, largest_t = max(points)
    if bus * largest_s * inv_bw < 0.1 * largest_t:
        # The size term explains under 10% of the largest message's time (noise, or messages too
        # small to resolve the bandwidth, e.g. a --quick run on a busy host): the data cannot tell
        # B, so take the conservative rate that attributes the largest message's whole time to
        # transfer (a lower bound on B) rather than an unbounded slope.
        inv_bw = largest_t / (bus * largest_s)
    return alpha, 1.0 / inv_bw


def model_time_s(name: str, n_bytes: float, n: int, alpha_s: float, bw_bytes_per_s: float) -> float:
    """The cost model's time for one collective (the formulas of cost_models/comm.py's docstring:
    ring, or tree where NCCL has one and it is better)."""
    if name == "p2p":
        return n_bytes / bw_bytes_per_s + alpha_s
    if name == "all_reduce":
        ring = 2 * (n - 1) / n * n_bytes / bw_bytes_per_s + 2 * (n - 1) * alpha_s
        tree = 2 * n_bytes / bw_bytes_per_s + 2 * math.ceil(math.log2(n)) * alpha_s
        return min(ring, tree)
    if name == "broadcast":
        return n_bytes / bw_bytes_per_s + min(n - 1, math.ceil(math.log2(n))) * alpha_s
    return (n - 1) / n * n_bytes / bw_bytes_per_s + (n - 1) * alpha_s  # all-gather, reduce-scatter


def fit_link(
    measured: dict[str, list[tuple[float, float]]], nproc: int
) -> tuple[float, float, float]:
    """One (alpha_s, B_bytes_per_s) for every collective, as the cost model uses one link for all.

    Minimises the mean squared log(predicted / measured) over all collectives and sizes (a
    log-spaced grid, then a finer one around the best). Returns (alpha_s, B, rms log error).
    """
    pts = [
        (name, s, t, 2 if name == "p2p" else nproc)
        for name, rows in measured.items()
        for s, t in rows
    ]

    def loss(alpha: float, bw: float) -> float:
        return sum(
            math.log(model_time_s(nm, s, n, alpha, bw) / t) ** 2 for nm, s, t, n in pts
        ) / len(pts)

    best = (float("inf"), 1e-5, 1e9)
    lo_a, hi_a, lo_b, hi_b = -7.0, -1.0, 6.0, 13.0  # log10 ranges: 0.1 us..100 ms, 1 MB/s..10 TB/s
    for _ in range(3):
        step_a, step_b = (hi_a - lo_a) / 40, (hi_b - lo_b) / 40
        for i in range(41):
            for j in range(41):
                a, b = 10 ** (lo_a + i * step_a), 10 ** (lo_b + j * step_b)
                v = loss(a, b)
                if v < best[0]:
                    best = (v, a, b)
        la, lb = math.log10(best[1]), math.log10(best[2])
        lo_a, hi_a, lo_b, hi_b = la - 2 * step_a, la + 2 * step_a, lb - 2 * step_b, lb + 2 * step_b
    return best[1], best[2], math.sqrt(best[0])
