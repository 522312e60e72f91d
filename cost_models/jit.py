"""numba kernels behind cost_models.kernels (imported only when the kernels are loaded, by
kernels.warm_up, which also guards numba's import; the machine code is cached in
kernels.cache_dir(), under the user's cache home).

Each kernel is a line-for-line port of a Python pass that stays in the code base as the reference
(and as the path used without numba): the same floating-point operations in the same order, the
same integer results. tests/test_cost_kernels.py compares every kernel with its reference.

- `run_plain`: cost_models.simulator._run without a timeline;
- `compile_order`: cost_models.simulator._compile_python (dependency order, in-flight peaks);

Index conventions: "none" (-1) is mapped to n, the slot of a 0.0 sentinel, in the arrays the
timing kernels read; the compile kernels keep -1 as the Python code does.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from cost_models.kernels import use_cache_dir

use_cache_dir()  # before numba decorates anything here: the cache goes under the user's cache home

from numba import njit  # noqa: E402

# the kernels' array types (numba's Dispatcher keeps the annotated signatures for mypy)
Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]


@njit(cache=True, nogil=True)
def _durations(T: Floats, split: bool) -> tuple[Floats, Floats]:
    """simulator._durations, flat: d[3 s + kind] and lg[s] (lg[S] = 0.0: no p2p)."""
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


@njit(cache=True, nogil=True)
def _busy(d: Floats, counts: Ints, stage_rank: Ints, p: int) -> Floats:
    """Busy time per rank: sum over its stages of nF F + nB B + nW W (simulator._run's loop)."""
    busy = np.zeros(p)
    for s in range(counts.shape[0]):
        nf = counts[s, 0]
        nb = counts[s, 1]
        nw = counts[s, 2]
        busy[stage_rank[s]] += nf * d[3 * s] + nb * d[3 * s + 1] + nw * d[3 * s + 2]
    return busy


@njit(cache=True, nogil=True)
def run_plain(rank: Ints, dep: Ints, lag_slot: Ints, dur_slot: Ints, counts: Ints, stage_rank: Ints, T: Floats,
              split: bool, p: int) -> tuple[float, Floats]:
    """simulator._run's timing pass without a timeline: (step, busy per rank)."""
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
    return step, _busy(d, counts, stage_rank, p)


@njit(cache=True, nogil=True)
def compile_order(kinds: Ints, stages: Ints, mbs: Ints, starts: Ints, rank_of: Ints, S: int, M: int, p: int,
                  release: int) -> tuple[bool, Ints, Ints, Ints, Ints]:
    """simulator._compile_python's scan: (ok, order n x 6 (rank, kind, stage, mb, dep, lag), peak
    in flight per rank, per stage, action counts per stage (S x 3)); ok False: a deadlock."""
    n = kinds.shape[0]
    index = np.full(3 * S * M, -1, np.int64)
    order = np.empty((n, 6), np.int64)
    ptr = starts[:p].copy()
    cnt = 0
    remaining = n
    ok = True
    while remaining:
        progressed = False
        for r in range(p):
            i = ptr[r]
            e = starts[r + 1]
            while i < e:
                k = kinds[i]
                s = stages[i]
                mb = mbs[i]
                if k == 0:
                    if s > 0:
                        dep = index[(s - 1) * M + mb]
                        if dep < 0:
                            break
                        lag = s - 1 if rank_of[s - 1] != r else -1
                    else:
                        dep = -1
                        lag = -1
                elif k == 1:
                    own = index[s * M + mb]
                    if own < 0:
                        break
                    if s < S - 1:
                        dep = index[(S + s + 1) * M + mb]
                        if dep < 0:
                            break
                        lag = s if rank_of[s + 1] != r else -1
                    else:
                        dep = own
                        lag = -1
                else:
                    dep = index[(S + s) * M + mb]
                    if dep < 0:
                        break
                    lag = -1
                index[(k * S + s) * M + mb] = cnt
                order[cnt, 0] = r
                order[cnt, 1] = k
                order[cnt, 2] = s
                order[cnt, 3] = mb
                order[cnt, 4] = dep
                order[cnt, 5] = lag
                cnt += 1
                i += 1
            if i != ptr[r]:
                remaining -= i - ptr[r]
                ptr[r] = i
                progressed = True
        if not progressed:
            ok = False
            break
    inflight = np.zeros(p, np.int64)
    peak = np.zeros(p, np.int64)
    st_in = np.zeros(S, np.int64)
    st_peak = np.zeros(S, np.int64)
    counts = np.zeros((S, 3), np.int64)
    for r in range(p):
        for i in range(starts[r], starts[r + 1]):
            k = kinds[i]
            s = stages[i]
            counts[s, k] += 1
            if k == 0:
                inflight[r] += 1
                st_in[s] += 1
                if inflight[r] > peak[r]:
                    peak[r] = inflight[r]
                if st_in[s] > st_peak[s]:
                    st_peak[s] = st_in[s]
            elif k == release:
                inflight[r] -= 1
                st_in[s] -= 1
    return ok, order[:cnt], peak, st_peak, counts
