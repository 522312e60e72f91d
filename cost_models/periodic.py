"""Exact pipeline simulation with a max-plus fast-forward over the steady phase.

The event simulation (cost_models.simulator) computes, in a topological order of the actions,

    end(a) = max(end(prev_on_rank(a)), end(dep(a)) + p2p) + duration(a)

a max-plus linear recurrence (a dependency on the same rank is dropped: the rank's previous
action ended no earlier). Shifting every micro-batch index by D (1, or pp for interleaved 1F1B
with v > 1, whose forward order goes in groups of pp micro-batches) maps the schedule's steady
phase onto itself, so it can be played in *rounds*:

- type of an action = (kind, stage, mb mod D), q = mb // D; round = q + off(type). The offsets
  are the smallest that make every edge x -> a satisfy round(x) <= round(a) (difference
  constraints, solved by longest paths over the types; a positive cycle means no round structure
  and the plain simulation is used). Rounds are played in order, each in the plain simulator's
  topological order, so the whole order is topological.
- a round's signature is, per action, (type, type and round distance of its two predecessors).
  The longest run of rounds with equal signatures is the steady run: round R+1 is round R with
  every micro-batch shifted by D, and so are its predecessors.
- Playing the steady run round by round, once J consecutive rounds (J = the furthest back any
  action from the run on reads) each end exactly c later than the round before (to 1e-13
  relative, less for very long runs), every later steady round does too: max-plus maps commute
  with adding a constant, so end(round R+1) = end(round R) + c for the rest of the run
  (induction over the rounds). The run's last J rounds are written as round R + k c, and the
  drain is played as usual.

Micro-batch counts: beyond the point where the builders' warm-up lengths and held-back W's stop
growing (`_m_saturated`), the schedule with m micro-batches is the one with m' = m - n D plus n
more steady rounds (the builders in cost_models.schedules repeat one steady pattern; the tests
compare against the plain simulation for every schedule, pp 1..16, m 1..64, and large cases). So
the structure is compiled for m' (O(pp^2) actions, cached per (schedule, pp, m', v)) and rounds
beyond m' are played on a sliding window of the last J + 1 rounds until the fast-forward applies.
In-flight peaks are those of m' (steady rounds neither add nor drop in-flight micro-batches);
action counts per stage add n x one round's counts.

Cost: O(pp^2) actions (warm-up, the few rounds until the period shows, drain) instead of
O(pp m) where the steady phase advances every action by the same c each round (e.g. no p2p time).
Where it does not, nothing is skipped and every round is played: with p2p time, 1F1B's steady
rounds alternate F+B and F+B+2 p2p in a pattern pp rounds long (a max-plus cyclicity of pp, not
1), and it settles only after ~7 pp rounds. Checking periods up to 2 S as well was tried: for the
micro-batch counts plans use (m < ~10 pp) it saved little and the extra checks cost more in
CPython than the rounds they skip, so it was not kept. Without a jump every end time is computed
by the same additions, in the same order, as the plain simulation (bit-identical); with one, the skipped rounds are k c instead of k sums,
which agrees to rounding (tests: 1e-9 relative; the tolerance bounds it by 1e-10).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from operator import itemgetter, sub

import numpy as np

from cost_models import kernels
from cost_models.schedules import _check

# schedules whose builders repeat one steady pattern beyond m_sat (see _m_saturated)
_UNIFORM = ("1f1b", "zero_bubble", "interleaved_1f1b")
_REL_TOL = 1e-13


@dataclass(frozen=True, slots=True)
class Periodic:
    """A schedule compiled into rounds (see module docstring); indices are in the round order."""

    num_ranks: int
    num_stages: int
    rp: tuple[int, ...]  # previous action on the same rank, -1 for none (reads the 0.0 sentinel)
    dep: tuple[int, ...]  # data dependency, -1 for none
    lag_slot: tuple[int, ...]  # p2p stage or num_stages (no p2p)
    dur_slot: tuple[int, ...]  # 3 * stage + kind
    last_of_rank: tuple[int, ...]
    start: int  # first action of the steady run
    length: int  # actions per steady round
    rounds: int  # steady rounds compiled (for m_compiled)
    reach: int  # J: the furthest back (in rounds) an action at or after the run reads
    counts: tuple[tuple[int, int, int], ...]  # per stage: F, B, W actions (for m_compiled)
    round_counts: tuple[tuple[int, int, int], ...]  # per stage: F, B, W actions in one steady round
    peak_in_flight: tuple[int, ...]
    peak_in_flight_per_stage: tuple[int, ...]
    stage_rank: tuple[int, ...]
    m_compiled: int
    shift: int  # D
    lag_get: itemgetter = field(compare=False)  # gathers lag_slot from the per-stage p2p list (one C call)
    dur_get: itemgetter = field(compare=False)
    # as int64 arrays for cost_models.jit.play_rounds (made on first use): rp, dep (-1 -> n),
    # lag_slot, dur_slot, last_of_rank, counts, round_counts, stage_rank
    arrays: tuple | None = field(default=None, compare=False, repr=False)


def _shift(name: str, pp: int, v: int) -> int:
    return pp if name == "interleaved_1f1b" and v > 1 else 1


def _m_saturated(name: str, pp: int, v: int) -> int:
    """Micro-batch count from which the builders' warm-up lengths and held-back W's stop growing."""
    if name == "interleaved_1f1b":
        return -(-(2 * (pp - 1) + (v - 1) * pp) // v)
    return pp


_BY_M: dict = {}  # (name, pp, m, v) -> compile_periodic's answer


def compile_periodic(name: str, pp: int, m: int, v: int) -> Periodic | None:
    """The round structure for (name, pp, m, v), compiled for the smallest m' that has the same
    warm-up and drain (uniform builders only) and a steady run long enough; None where the schedule
    has no usable steady run (then the plain simulation is as fast). Memoised per (name, pp, m, v)."""
    key = (name, pp, m, v)
    try:
        return _BY_M[key]
    except KeyError:
        pass
    if len(_BY_M) > 4096:
        _BY_M.clear()
    got = _BY_M[key] = _compile_periodic(name, pp, m, v)
    return got


def _compile_periodic(name: str, pp: int, m: int, v: int) -> Periodic | None:
    _check(name, pp, m, v)
    d = _shift(name, pp, v)
    if name in _UNIFORM:
        base = max(_m_saturated(name, pp, v), 2)
        base += (m - base) % d
        if m < base + 2 * d:
            return None  # too few steady rounds to gain anything: the plain simulation
        # three steady rounds past saturation: enough for the usual reach of 1 (one compile)
        mc = min(m, base + 3 * d)
        while True:
            got = _compiled_rounds(name, pp, mc, v)
            if mc >= m or (got is not None and got.rounds >= got.reach + 2):
                return got
            mc = min(m, mc + d * (2 if got is None else max(1, got.reach + 2 - got.rounds)))
    return _compiled_rounds(name, pp, m, v)


@lru_cache(maxsize=256)
def _compiled_rounds(name: str, pp: int, m: int, v: int) -> Periodic | None:
    """The round structure of the plain order (see _rounds_python); by cost_models.jit.rounds_structure
    once the kernels are loaded (cost_models.kernels), else in Python."""
    from cost_models.simulator import _compiled  # the plain simulator's topological order (shared)

    comp = _compiled(name, pp, m, v)
    d = _shift(name, pp, v)
    if not kernels.ready:
        t0 = time.process_time()
        got = _rounds_python(comp, pp, m, d)
        kernels.charge(time.process_time() - t0)
        return got
    S = comp.num_stages
    status, n_rp, n_dep, lag_slot, dur_slot, last_of_rank, rc, start, length, nrounds, reach = \
        kernels.jit.rounds_structure(comp.order_array, S, d, pp)
    if status in (1, 2):
        return None  # a positive cycle (no round structure) or no steady run of two rounds
    assert status == 0, "round order"
    n = len(n_rp)
    # the kernel's arrays as play_compiled's `arrays` (what kernels.index_array makes of the tuples)
    arrays = (np.where(n_rp < 0, n, n_rp), np.where(n_dep < 0, n, n_dep), lag_slot.astype(np.int64),
              dur_slot.astype(np.int64), last_of_rank.astype(np.int64),
              kernels.index_array(comp.actions_per_rank_stage, -1).reshape(-1, 3),
              rc.astype(np.int64).reshape(-1, 3), kernels.index_array(comp.stage_rank, -1))
    lag_slot, dur_slot = tuple(lag_slot.tolist()), tuple(dur_slot.tolist())
    return Periodic(pp, S, tuple(n_rp.tolist()), tuple(n_dep.tolist()), lag_slot, dur_slot,
                    tuple(last_of_rank.tolist()), int(start), int(length), int(nrounds), int(reach),
                    comp.actions_per_rank_stage, tuple(map(tuple, rc.tolist())), comp.peak_in_flight,
                    comp.peak_in_flight_per_stage, comp.stage_rank, m, d, _getter(lag_slot), _getter(dur_slot),
                    arrays)


def _rounds_python(comp, pp: int, m: int, d: int) -> Periodic | None:
    """The round structure (module docstring) of `comp`, the plain order of (name, pp, m, v)."""
    S = comp.num_stages
    n = len(comp.order)
    # rank predecessor of each action (the plain order keeps each rank's list order)
    last = [-1] * pp
    rp = [-1] * n
    deps = [a[4] for a in comp.order]
    for i, (r, _k, _s, _mb, dep, _lag) in enumerate(comp.order):
        rp[i] = last[r]
        last[r] = i
        if dep >= 0 and comp.order[dep][0] == r:
            # a dependency on the same rank (no p2p) ended no later than the rank's previous
            # action: never binding, and dropping it keeps the rounds' reach short (ZB-H1's W)
            deps[i] = -1
    # types and their round offsets (longest paths; D types per (kind, stage))
    typ = [(k * S + s) * d + mb % d for _r, k, s, mb, _dep, _lag in comp.order]
    q = [mb // d for _r, _k, _s, mb, _dep, _lag in comp.order]
    cons: dict[tuple[int, int], int] = {}  # (type of pred, type) -> largest q(pred) - q(a)
    for i in range(n):
        for x in (deps[i], rp[i]):
            if x >= 0:
                key = (typ[x], typ[i])
                w = q[x] - q[i]
                if cons.get(key, -1 << 60) < w:
                    cons[key] = w
    off = dict.fromkeys(set(typ), 0)
    edges = list(cons.items())
    for _ in range(len(off) + 1):
        changed = False
        for (a, b), w in edges:
            if off[a] + w > off[b]:
                off[b] = off[a] + w
                changed = True
        if not changed:
            break
    else:
        return None  # a positive cycle: no round structure
    rnd = [q[i] + off[typ[i]] for i in range(n)]
    num_rounds = max(rnd) + 1 if n else 0
    members: list[list[int]] = [[] for _ in range(num_rounds)]
    for i in range(n):
        members[rnd[i]].append(i)  # plain order within a round: topological
    sig = []
    for mem in members:
        row = []
        for i in mem:
            dep = deps[i]
            x = rp[i]
            row.append((typ[i], typ[dep] if dep >= 0 else -1, rnd[i] - rnd[dep] if dep >= 0 else 0,
                        typ[x] if x >= 0 else -1, rnd[i] - rnd[x] if x >= 0 else 0))
        sig.append(tuple(sorted(row)))
    # the longest run of equal signatures
    best_a, best_len, a = 0, 0, 0
    for r in range(1, num_rounds + 1):
        if r == num_rounds or sig[r] != sig[a]:
            if r - a > best_len:
                best_a, best_len = a, r - a
            a = r
    ra, nrounds = best_a, best_len
    if nrounds < 2:
        return None
    # canonical order inside steady rounds: by type, as the run's first round orders them
    type_pos = {typ[i]: j for j, i in enumerate(members[ra])}
    for r in range(ra + 1, ra + nrounds):
        members[r].sort(key=lambda i: type_pos[typ[i]])
    new = [i for mem in members for i in mem]
    where = [0] * n
    for j, i in enumerate(new):
        where[i] = j
    start = sum(len(mem) for mem in members[:ra])
    length = len(members[ra])
    reach = 1
    for i in range(n):
        if rnd[i] >= ra:
            for x in (deps[i], rp[i]):
                if x >= 0:
                    reach = max(reach, rnd[i] - rnd[x])
    n_rp = tuple(where[rp[i]] if rp[i] >= 0 else -1 for i in new)
    n_dep = tuple(where[deps[i]] if deps[i] >= 0 else -1 for i in new)
    assert all(x < j for j, x in enumerate(n_rp)) and all(x < j for j, x in enumerate(n_dep)), "round order"
    lag_slot = tuple(comp.flat[i][2] for i in new)
    dur_slot = tuple(comp.flat[i][3] for i in new)
    last_of_rank = tuple(where[x] for x in last)
    rc = [[0, 0, 0] for _ in range(S)]
    for i in members[ra]:
        _r, k, s, _mb, _dep, _lag = comp.order[i]
        rc[s][k] += 1
    return Periodic(pp, S, n_rp, n_dep, lag_slot, dur_slot, last_of_rank, start, length, nrounds, reach,
                    comp.actions_per_rank_stage, tuple(map(tuple, rc)), comp.peak_in_flight,
                    comp.peak_in_flight_per_stage, comp.stage_rank, m, d, _getter(lag_slot), _getter(dur_slot))


def _getter(slots: tuple[int, ...]) -> itemgetter:
    return itemgetter(*slots) if len(slots) > 1 else itemgetter(slice(slots[0], slots[0] + 1))


def _rounds_to_play(pc: Periodic, m: int) -> tuple[int, int, float]:
    """(steady rounds beyond the compiled ones, steady rounds in all, per-round tolerance) for m
    micro-batches. A skip multiplies the tolerance by at most the round count, so the result stays
    within 1e-10 relative of the plain simulation even if a near-tie passed for periodicity."""
    extra = (m - pc.m_compiled) // pc.shift
    total = pc.rounds + extra
    return extra, total, (min(_REL_TOL, 1e-10 / total) if total else _REL_TOL)


def play_compiled(pc: Periodic, m: int, T, split: bool) -> tuple[float, object]:
    """(step time, busy time per rank as an array): `play` and the busy times of
    simulator._run_periodic, compiled (cost_models.jit.play_rounds). `T`: the stage times as
    kernels.times_array gives them; `split`: the schedule splits backward (W apart)."""
    extra, total, rel = _rounds_to_play(pc, m)
    arrays = pc.arrays
    if arrays is None:  # the structure as the kernel reads it, made once
        n = len(pc.rp)
        arrays = (kernels.index_array(pc.rp, n), kernels.index_array(pc.dep, n), kernels.index_array(pc.lag_slot, -1),
                  kernels.index_array(pc.dur_slot, -1), kernels.index_array(pc.last_of_rank, -1),
                  kernels.index_array(pc.counts, -1).reshape(-1, 3), kernels.index_array(pc.round_counts, -1).reshape(-1, 3),
                  kernels.index_array(pc.stage_rank, -1))
        object.__setattr__(pc, "arrays", arrays)
    return kernels.jit.play_rounds(*arrays, T, split, pc.start, pc.length, pc.rounds, pc.reach, total, extra, rel)


def play(pc: Periodic, m: int, d: list[float], lg: list[float]) -> tuple[float, list[float], tuple]:
    """(step time, per-rank end times, action counts per stage) for m micro-batches.

    `d`: durations by slot 3 * stage + kind; `lg`: p2p per stage with a trailing 0.0."""
    extra, total, rel = _rounds_to_play(pc, m)
    A, L, N, J = pc.start, pc.length, pc.rounds, pc.reach
    counts = tuple((f + extra * rf, b + extra * rb, w + extra * rw)
                   for (f, b, w), (rf, rb, rw) in zip(pc.counts, pc.round_counts, strict=True))
    rps, deps = pc.rp, pc.dep
    lags = pc.lag_get(lg)
    durs = pc.dur_get(d)
    n = len(rps)
    end = [0.0] * (n + 1)  # end[-1] stays 0.0: the sentinel for "none"

    def run(i0: int, i1: int) -> None:
        for i in range(i0, i1):
            y = end[rps[i]]
            x = end[deps[i]] + lags[i]
            end[i] = (x if x > y else y) + durs[i]

    run(0, A)
    streak, c = 0, 0.0
    last_pos = A + (N - 1) * L  # where the last compiled steady round lives
    for k in range(total):
        if k < N:
            cur = A + k * L
        else:  # slide the window of the last J + 1 rounds down by one round, play the newest
            cur = last_pos
            w0 = last_pos - J * L
            end[w0:last_pos] = end[w0 + L:last_pos + L]
        run(cur, cur + L)
        if k == 0:
            continue
        diffs = list(map(sub, end[cur:cur + L], end[cur - L:cur]))
        lo, hi = min(diffs), max(diffs)
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
                vals = [x + skip * c for x in end[src:cur + L]]
                end[last_pos - (J - 1) * L:last_pos + L] = vals
            break
    run(A + N * L, n)
    ends = [end[i] for i in pc.last_of_rank]
    return max(ends), ends, counts
