"""Compiled inner loops of the pipeline simulation (numba), with the pure-Python path as fallback.

The schedule structure stays data compiled once per (schedule, pp, m, v) (cost_models.simulator,
cost_models.periodic); what runs once per distinct set of stage times is the max-plus pass over
the actions

    end(a) = max(end(prev_on_rank(a)), end(dep(a)) + p2p) + duration(a)

which CPython runs at ~0.1 us per action. The kernels below are that pass, line for line, over
int64 index arrays (-1 "none" mapped to n, the index of a 0.0 sentinel), compiled by numba to
machine code (a few ns per action): the same floating-point operations in the same order, so the
results are bit-identical to the Python loops (tests/test_cost_kernels.py compares them on every
schedule). `play_rounds` is cost_models.periodic.play's loop (rounds, steady-phase fast-forward);
`run_plain` is cost_models.simulator._run's timing pass.

numba compiles each kernel on first use (~1 s) and caches the machine code next to this file
(`cache=True`; later processes load it in milliseconds). Where numba is missing, or
AUTOPLAN_JIT=0 is set, JIT is False and callers keep their Python loops.
"""

from __future__ import annotations

import os
from itertools import chain

import numpy as np

JIT = False
if os.environ.get("AUTOPLAN_JIT", "1") != "0":
    try:
        import numba

        JIT = True
    except ImportError:  # pragma: no cover - numba is a dependency; kept for stripped installs
        numba = None


def _njit(fn):
    return numba.njit(cache=True, nogil=True)(fn) if JIT else fn


def index_array(xs, none: int) -> np.ndarray:
    """int64 array of `xs` with -1 ("none") replaced by `none` (the sentinel slot)."""
    a = np.array(xs, dtype=np.int64)
    a[a < 0] = none
    return a


@_njit
def _durations(T, split):  # pragma: no cover - compiled
    """cost_models.simulator._durations, flat: d[3 s + kind] and lg[s] (lg[S] = 0.0: no p2p)."""
    S = T.shape[0]
    d = np.empty(3 * S)
    lg = np.zeros(S + 1)
    for s in range(S):
        d[3 * s] = T[s, 0]
        if split:
            d[3 * s + 1] = T[s, 1]
            d[3 * s + 2] = T[s, 2]
        else:
            d[3 * s + 1] = T[s, 1] + T[s, 2]
            d[3 * s + 2] = 0.0
        lg[s] = T[s, 3]
    return d, lg


@_njit
def _busy(d, counts, round_counts, extra, stage_rank, p):  # pragma: no cover - compiled
    """Busy time per rank: sum over its stages of nF F + nB B + nW W (simulator._run's loop)."""
    busy = np.zeros(p)
    for s in range(counts.shape[0]):
        nf = counts[s, 0] + extra * round_counts[s, 0]
        nb = counts[s, 1] + extra * round_counts[s, 1]
        nw = counts[s, 2] + extra * round_counts[s, 2]
        busy[stage_rank[s]] += nf * d[3 * s] + nb * d[3 * s + 1] + nw * d[3 * s + 2]
    return busy


@_njit
def play_rounds(rp, dep, lag_slot, dur_slot, last_of_rank, counts, round_counts, stage_rank, T, split, A, L, N, J,
                total, extra, rel):  # pragma: no cover - compiled
    """cost_models.periodic.play's pass and simulator._run_periodic's busy times: (step, busy per rank)."""
    d, lg = _durations(T, split)
    n = rp.shape[0]
    end = np.zeros(n + 1)
    for i in range(A):
        y = end[rp[i]]
        x = end[dep[i]] + lg[lag_slot[i]]
        end[i] = (x if x > y else y) + d[dur_slot[i]]
    streak = 0
    c = 0.0
    last_pos = A + (N - 1) * L
    for k in range(total):
        if k < N:
            cur = A + k * L
        else:  # slide the window of the last J + 1 rounds down by one round
            cur = last_pos
            for j in range(last_pos - J * L, last_pos):
                end[j] = end[j + L]
        for i in range(cur, cur + L):
            y = end[rp[i]]
            x = end[dep[i]] + lg[lag_slot[i]]
            end[i] = (x if x > y else y) + d[dur_slot[i]]
        if k == 0:
            continue
        lo = end[cur] - end[cur - L]
        hi = lo
        for j in range(1, L):
            df = end[cur + j] - end[cur - L + j]
            if df < lo:
                lo = df
            if df > hi:
                hi = df
        tol = rel * abs(end[cur + L - 1])
        if hi - lo <= tol:
            streak = streak + 1 if streak and abs(lo - c) <= tol else 1
            c = lo
        else:
            streak = 0
        if streak >= J and k >= J:
            skip = total - 1 - k
            if skip > 0:  # rounds k-J+1..k, moved on by `skip` rounds, become the run's last J
                src = cur - (J - 1) * L
                cnt = cur + L - src
                vals = np.empty(cnt)
                for j in range(cnt):
                    vals[j] = end[src + j] + skip * c
                dst = last_pos - (J - 1) * L
                for j in range(cnt):
                    end[dst + j] = vals[j]
            break
    for i in range(A + N * L, n):
        y = end[rp[i]]
        x = end[dep[i]] + lg[lag_slot[i]]
        end[i] = (x if x > y else y) + d[dur_slot[i]]
    step = end[last_of_rank[0]]
    for r in range(1, last_of_rank.shape[0]):
        if end[last_of_rank[r]] > step:
            step = end[last_of_rank[r]]
    return step, _busy(d, counts, round_counts, extra, stage_rank, last_of_rank.shape[0])


@_njit
def run_plain(rank, dep, lag_slot, dur_slot, counts, stage_rank, T, split, p):  # pragma: no cover - compiled
    """cost_models.simulator._run's timing pass without a timeline: (step, busy per rank)."""
    d, lg = _durations(T, split)
    n = rank.shape[0]
    end = np.zeros(n + 1)
    free = np.zeros(p)
    for i in range(n):
        r = rank[i]
        start = free[r]
        x = lg[lag_slot[i]] + end[dep[i]]
        if x > start:
            start = x
        e = start + d[dur_slot[i]]
        end[i] = e
        free[r] = e
    step = free[0]
    for r in range(1, p):
        if free[r] > step:
            step = free[r]
    return step, _busy(d, counts, counts, 0, stage_rank, p)


def times_array(times) -> np.ndarray:
    """(F, B, W, p2p) per stage as an S x 4 float64 array."""
    return np.fromiter(chain.from_iterable(times), np.float64, 4 * len(times)).reshape(len(times), 4)


def warm_up() -> float:
    """Load (or compile) every kernel now, on a one-action input, rather than at the first
    simulation; returns the seconds it took (CPU time). A no-op without JIT."""
    import time

    t0 = time.process_time()
    if JIT:
        one = np.zeros(1, dtype=np.int64)
        cnt = np.zeros((1, 3), dtype=np.int64)
        T = np.zeros((1, 4))
        run_plain(one, one, one, one, cnt, one, T, False, 1)
        play_rounds(one, one, one, one, one, cnt, cnt, one, T, True, 0, 1, 1, 1, 1, 0, 1e-13)
    return time.process_time() - t0
