"""numba kernels behind cost_models.kernels (imported only when the kernels are loaded, by
kernels.warm_up, which also guards numba's import; the machine code is cached in
kernels.cache_dir(), under the user's cache home).

Each kernel is a line-for-line port of a Python pass that stays in the code base as the reference
(and as the path used without numba): the same floating-point operations in the same order, the
same integer results. tests/test_cost_kernels.py compares every kernel with its reference.

- `play_rounds`: cost_models.periodic.play (+ simulator._run_periodic's busy times);
- `run_plain`: cost_models.simulator._run without a timeline;
- `compile_order`: cost_models.simulator._compile_python (dependency order, in-flight peaks);
- `rounds_structure`: cost_models.periodic._rounds_python (round offsets, steady run, round order).

Index conventions: "none" (-1) is mapped to n, the slot of a 0.0 sentinel, in the arrays the
timing kernels read; the compile kernels keep -1 as the Python code does.
"""

from __future__ import annotations

import numpy as np

from cost_models.kernels import use_cache_dir

use_cache_dir()  # before numba decorates anything here: the cache goes under the user's cache home

from numba import njit  # noqa: E402


@njit(cache=True, nogil=True)
def _durations(T, split):
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
def _busy(d, counts, round_counts, extra, stage_rank, p):
    """Busy time per rank: sum over its stages of nF F + nB B + nW W (simulator._run's loop)."""
    busy = np.zeros(p)
    for s in range(counts.shape[0]):
        nf = counts[s, 0] + extra * round_counts[s, 0]
        nb = counts[s, 1] + extra * round_counts[s, 1]
        nw = counts[s, 2] + extra * round_counts[s, 2]
        busy[stage_rank[s]] += nf * d[3 * s] + nb * d[3 * s + 1] + nw * d[3 * s + 2]
    return busy


@njit(cache=True, nogil=True)
def play_rounds(rp, dep, lag_slot, dur_slot, last_of_rank, counts, round_counts, stage_rank, T, split, A, L, N, J,
                total, extra, rel):
    """periodic.play's pass and simulator._run_periodic's busy times: (step, busy per rank)."""
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


@njit(cache=True, nogil=True)
def run_plain(rank, dep, lag_slot, dur_slot, counts, stage_rank, T, split, p):
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
    return step, _busy(d, counts, counts, 0, stage_rank, p)


@njit(cache=True, nogil=True)
def compile_order(kinds, stages, mbs, starts, rank_of, S, M, p, release):
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


@njit(cache=True, nogil=True)
def rounds_structure(order, S, d, pp):
    """periodic._rounds_python on the plain order: status (0 ok, 1 positive cycle, 2 no steady run
    of 2 rounds, 3 round order not topological) and, in the round order, (rp, dep, lag_slot,
    dur_slot, last_of_rank, round_counts S x 3, start, length, rounds, reach)."""
    n = order.shape[0]
    rp = np.full(n, -1, np.int64)
    deps = np.empty(n, np.int64)
    last = np.full(pp, -1, np.int64)
    typ = np.empty(n, np.int64)
    q = np.empty(n, np.int64)
    for i in range(n):
        r = order[i, 0]
        rp[i] = last[r]
        last[r] = i
        dep = order[i, 4]
        if dep >= 0 and order[dep, 0] == r:
            dep = -1  # same rank: never binding (see periodic._rounds_python)
        deps[i] = dep
        typ[i] = (order[i, 1] * S + order[i, 2]) * d + order[i, 3] % d
        q[i] = order[i, 3] // d
    T = 3 * S * d
    # constraints: per (type of pred, type) the largest q(pred) - q(a), deduplicated by sorting
    keys = np.empty(2 * n, np.int64)
    ws = np.empty(2 * n, np.int64)
    ne = 0
    for i in range(n):
        for t in range(2):
            x = deps[i] if t == 0 else rp[i]
            if x >= 0:
                keys[ne] = typ[x] * T + typ[i]
                ws[ne] = q[x] - q[i]
                ne += 1
    srt = np.argsort(keys[:ne])
    ea = np.empty(ne, np.int64)
    eb = np.empty(ne, np.int64)
    ew = np.empty(ne, np.int64)
    m = 0
    for j in range(ne):
        key = keys[srt[j]]
        w = ws[srt[j]]
        if m > 0 and ea[m - 1] * T + eb[m - 1] == key:
            if w > ew[m - 1]:
                ew[m - 1] = w
        else:
            ea[m] = key // T
            eb[m] = key % T
            ew[m] = w
            m += 1
    used = np.zeros(T, np.bool_)
    n_types = 0
    for i in range(n):
        if not used[typ[i]]:
            used[typ[i]] = True
            n_types += 1
    off = np.zeros(T, np.int64)
    converged = False
    for _ in range(n_types + 1):
        changed = False
        for e in range(m):
            if off[ea[e]] + ew[e] > off[eb[e]]:
                off[eb[e]] = off[ea[e]] + ew[e]
                changed = True
        if not changed:
            converged = True
            break
    empty = np.empty(0, np.int64)
    empty2 = np.empty((0, 3), np.int64)
    if not converged:
        return 1, empty, empty, empty, empty, empty, empty2, 0, 0, 0, 0
    rnd = np.empty(n, np.int64)
    R = 0
    for i in range(n):
        rnd[i] = q[i] + off[typ[i]]
        if rnd[i] + 1 > R:
            R = rnd[i] + 1
    # members of each round, in plain order (stable counting sort)
    mstart = np.zeros(R + 1, np.int64)
    for i in range(n):
        mstart[rnd[i] + 1] += 1
    for r in range(R):
        mstart[r + 1] += mstart[r]
    mem = np.empty(n, np.int64)
    pos = mstart[:R].copy()
    for i in range(n):
        mem[pos[rnd[i]]] = i
        pos[rnd[i]] += 1
    # signature rows (type, dep type, dep round distance, rank-pred type, its distance); a type
    # occurs at most once per round, so a round's sorted rows are its rows sorted by type
    row = np.empty((n, 5), np.int64)
    for i in range(n):
        dp = deps[i]
        x = rp[i]
        row[i, 0] = typ[i]
        row[i, 1] = typ[dp] if dp >= 0 else -1
        row[i, 2] = rnd[i] - rnd[dp] if dp >= 0 else 0
        row[i, 3] = typ[x] if x >= 0 else -1
        row[i, 4] = rnd[i] - rnd[x] if x >= 0 else 0
    # every round's members sorted by type, by one sort on (round, type) (the rounds stay where
    # mstart puts them; a type occurs at most once per round, so the order is the same as per round)
    smem = np.argsort(rnd * T + typ, kind="mergesort")
    best_a = 0
    best_len = 0
    a = 0
    for r in range(1, R + 1):
        same = False
        if r < R and mstart[r + 1] - mstart[r] == mstart[a + 1] - mstart[a]:
            same = True
            for j in range(mstart[r + 1] - mstart[r]):
                u = smem[mstart[r] + j]
                w = smem[mstart[a] + j]
                for f in range(5):
                    if row[u, f] != row[w, f]:
                        same = False
                        break
                if not same:
                    break
        if not same:
            if r - a > best_len:
                best_a = a
                best_len = r - a
            a = r
    ra = best_a
    nrounds = best_len
    if nrounds < 2:
        return 2, empty, empty, empty, empty, empty, empty2, 0, 0, 0, 0
    # canonical order inside the steady run's later rounds: by the position of the type in round ra
    type_pos = np.full(T, -1, np.int64)
    for j in range(mstart[ra], mstart[ra + 1]):
        type_pos[typ[mem[j]]] = j - mstart[ra]
    new = mem.copy()
    for r in range(ra + 1, ra + nrounds):
        for j in range(mstart[r], mstart[r + 1]):
            i = mem[j]
            new[mstart[r] + type_pos[typ[i]]] = i
    where = np.empty(n, np.int64)
    for j in range(n):
        where[new[j]] = j
    start = mstart[ra]
    length = mstart[ra + 1] - mstart[ra]
    reach = 1
    for i in range(n):
        if rnd[i] >= ra:
            if deps[i] >= 0 and rnd[i] - rnd[deps[i]] > reach:
                reach = rnd[i] - rnd[deps[i]]
            if rp[i] >= 0 and rnd[i] - rnd[rp[i]] > reach:
                reach = rnd[i] - rnd[rp[i]]
    n_rp = np.empty(n, np.int64)
    n_dep = np.empty(n, np.int64)
    lag_slot = np.empty(n, np.int64)
    dur_slot = np.empty(n, np.int64)
    for j in range(n):
        i = new[j]
        n_rp[j] = where[rp[i]] if rp[i] >= 0 else -1
        n_dep[j] = where[deps[i]] if deps[i] >= 0 else -1
        if n_rp[j] >= j or n_dep[j] >= j:
            return 3, empty, empty, empty, empty, empty, empty2, 0, 0, 0, 0
        lag_slot[j] = order[i, 5] if order[i, 5] >= 0 else S
        dur_slot[j] = 3 * order[i, 2] + order[i, 1]
    last_of_rank = np.empty(pp, np.int64)
    for r in range(pp):
        last_of_rank[r] = where[last[r]]
    rc = np.zeros((S, 3), np.int64)
    for j in range(mstart[ra], mstart[ra + 1]):
        i = mem[j]
        rc[order[i, 2], order[i, 1]] += 1
    return 0, n_rp, n_dep, lag_slot, dur_slot, last_of_rank, rc, start, length, nrounds, reach
