"""Event simulator for pipeline schedules.

Plays a `Schedule` with per-(virtual-)stage times. Each rank runs its actions in order, one at
a time; an action starts when the rank is free and its dependency has finished:

    F(s, m) after F(s-1, m) + p2p(s-1)   (activation sent from stage s-1; none on the same rank)
    B(s, m) after B(s+1, m) + p2p(s)     (its output's gradient comes back; B of the last stage
                                          follows that stage's own F(s, m))
    W(s, m) after B(s, m)

Durations: F = forward_s, B = backward_s, W = weight_s of the stage's `StageTimes`. p2p(s) is
`stage_times[s].p2p_s`, the time to send stage s's boundary activation (its gradient is the
same size); it delays the receiver but does not occupy either rank (sends are asynchronous).

Results: step time (last action's end), per-rank busy time, bubble fraction (idle share of the
busiest rank: the part of the step the pipeline adds), peak in-flight micro-batches per rank
(a micro-batch is in flight on a stage from its F until its B, or its W when backward is
split: conservative for zero-bubble, whose B frees most of it), and the timeline.

Speed: the dependency order depends only on the schedule's structure, so it is compiled once
per (schedule, pp, m, v) (`compile_schedule`; a CostModel keeps it, cost_models.model) and the
timing pass is one loop over the actions (`play`, ~0.1-0.3 us per action in CPython). This
Python pass is the reference; the one compiled kernel (cost_models.kernels / cost_models.jit:
the same two passes line for line in numba, a few ns per action, bit-identical,
tests/test_cost_kernels.py) replaces it where a CostModel was made with `compiled`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from cost_models import kernels
from cost_models.schedules import Schedule, build_schedule_plain

if TYPE_CHECKING:
    from specs import StageTimes

_KIND = {"F": 0, "B": 1, "W": 2}

# per action of a compiled schedule: (rank, kind 0/1/2 = F/B/W, stage, micro-batch, dep index or
# -1, p2p stage or -1)
OrderRow = tuple[int, int, int, int, int, int]
Int64s = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class ScheduleResult:
    step_time_s: float
    bubble_fraction: float
    busy_s: tuple[float, ...]  # per pp rank
    peak_in_flight: tuple[int, ...]  # per pp rank, summed over its virtual stages
    peak_in_flight_per_stage: tuple[int, ...]  # per virtual stage
    timeline: tuple[tuple[int, str, int, int, float, float], ...] = ()  # (rank, kind, stage, mb, start, end)

    @property
    def busiest_rank(self) -> int:
        return self.busy_s.index(max(self.busy_s))  # the first busiest


class _Compiled:
    """A schedule's dependency order and in-flight peaks (a property of its structure, not of the
    times). Built by the Python scan (tuples) or by the compiled one (an n x 6 int64 array); the
    other form is made on first use, so either path serves every reader."""

    __slots__ = ("num_ranks", "num_stages", "peak_in_flight", "peak_in_flight_per_stage", "actions_per_rank_stage",
                 "stage_rank", "_order", "_order_array", "_cols", "_flat", "_arrays")

    def __init__(self, order: tuple[OrderRow, ...] | None, num_ranks: int, num_stages: int,
                 peak_in_flight: tuple[int, ...], peak_in_flight_per_stage: tuple[int, ...],
                 actions_per_rank_stage: tuple[tuple[int, int, int], ...], stage_rank: tuple[int, ...],
                 order_array: Int64s | None = None):
        # order: per action, in a valid processing order, (rank, kind, stage, mb, dep index or -1,
        # p2p stage or -1); None when order_array (the same as an n x 6 array) is given
        self._order = order
        self._order_array = order_array
        self.num_ranks, self.num_stages = num_ranks, num_stages
        self.peak_in_flight, self.peak_in_flight_per_stage = peak_in_flight, peak_in_flight_per_stage
        self.actions_per_rank_stage, self.stage_rank = actions_per_rank_stage, stage_rank
        self._cols: tuple[tuple[int, ...], ...] | None = None
        self._flat: tuple[tuple[int, int, int, int], ...] | None = None
        self._arrays: tuple[Int64s, Int64s, Int64s, Int64s, Int64s, Int64s] | None = None

    @property
    def order(self) -> tuple[OrderRow, ...]:
        if self._order is None:
            assert self._order_array is not None  # one of the two forms is always given
            self._order = tuple(map(tuple, self._order_array.tolist()))
        return self._order

    @property
    def num_actions(self) -> int:
        if self._order is not None:
            return len(self._order)
        assert self._order_array is not None  # one of the two forms is always given
        return len(self._order_array)

    @property
    def order_array(self) -> Int64s:
        if self._order_array is None:
            assert self._order is not None  # one of the two forms is always given
            self._order_array = kernels.index_array(self._order, -1).reshape(len(self._order), 6)
        return self._order_array

    @property
    def flat(self) -> tuple[tuple[int, int, int, int], ...]:
        """Per action (rank, dep index or -1, lag slot, duration slot): lag slot S means "no p2p"
        (a 0.0 appended to the lag list); dep -1 reads a 0.0 sentinel."""
        if self._flat is None:
            self._flat = tuple(zip(*self._columns(), strict=True)) if self.order else ()
        return self._flat

    def _columns(self) -> tuple[tuple[int, ...], ...]:
        """(rank, dep, lag slot, duration slot) of every action, as four columns."""
        if self._cols is None:
            S = self.num_stages
            self._cols = tuple(zip(*[(r, dep, lag if lag >= 0 else S, 3 * s + k)
                                     for r, k, s, _mb, dep, lag in self.order], strict=True)) or ((), (), (), ())
        return self._cols

    @property
    def rank(self) -> tuple[int, ...]:
        return self._columns()[0]

    @property
    def dep(self) -> tuple[int, ...]:
        return self._columns()[1]

    @property
    def lag_slot(self) -> tuple[int, ...]:
        return self._columns()[2]

    @property
    def dur_slot(self) -> tuple[int, ...]:
        return self._columns()[3]

    @property
    def arrays(self) -> tuple[Int64s, Int64s, Int64s, Int64s, Int64s, Int64s]:
        """(rank, dep with -1 -> n, lag slot, duration slot, action counts S x 3, stage -> rank) as
        int64 arrays, for cost_models.jit.run_plain."""
        if self._arrays is None:
            order = self.order_array
            n = order.shape[0]
            dep = order[:, 4].copy()
            dep[dep < 0] = n
            lag = order[:, 5].copy()
            lag[lag < 0] = self.num_stages
            self._arrays = (order[:, 0].copy(), dep, lag, 3 * order[:, 2] + order[:, 1],
                            kernels.index_array(self.actions_per_rank_stage, -1).reshape(-1, 3),
                            kernels.index_array(self.stage_rank, -1))
        return self._arrays

    def _key(self) -> tuple[object, ...]:
        return (self.order, self.num_ranks, self.num_stages, self.peak_in_flight, self.peak_in_flight_per_stage,
                self.actions_per_rank_stage, self.stage_rank)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Compiled) and self._key() == other._key()

    # defining __eq__ without __hash__ leaves the class unhashable (Python sets __hash__ to None)


def compile_schedule(name: str, pp: int, m: int, v: int, *, compiled: bool = False) -> _Compiled:
    """The dependency order of schedule `name` (pp ranks, m micro-batches, v virtual stages per
    rank); by the compiled kernel when `compiled` (cost_models.kernels loaded), else in Python."""
    return _compile(build_schedule_plain(name, pp, m, v), compiled=compiled)


_ACTION_KIND, _ACTION_STAGE, _ACTION_MB = itemgetter(0), itemgetter(1), itemgetter(2)  # of an Action
_KIND_CODE = np.full(128, -1, dtype=np.int64)
_KIND_CODE[[ord("F"), ord("B"), ord("W")]] = [0, 1, 2]


def _compile(sched: Schedule, *, compiled: bool = False) -> _Compiled:
    """The dependency order of `sched` (see _compile_python); by cost_models.jit.compile_order
    when `compiled` and the kernels are loaded (cost_models.kernels), else in Python."""
    if not (compiled and kernels.ready):
        return _compile_python(sched)
    p, S = sched.pp, sched.num_stages
    starts = np.zeros(p + 1, dtype=np.int64)
    np.cumsum([len(a) for a in sched.actions], out=starts[1:])
    n = int(starts[-1])
    if not n:
        return _compile_python(sched)
    # the actions' kinds, stages and micro-batches as arrays, each by one C-level pass
    acts = sched.actions
    kinds = _KIND_CODE[np.frombuffer("".join(map(_ACTION_KIND, chain.from_iterable(acts))).encode("ascii"),
                                     dtype=np.uint8)]
    ss = np.fromiter(map(_ACTION_STAGE, chain.from_iterable(acts)), np.int64, n)
    ms = np.fromiter(map(_ACTION_MB, chain.from_iterable(acts)), np.int64, n)
    jit = kernels.jit
    assert jit is not None  # kernels.ready: loaded
    ok, order, peak, stage_peak, counts = jit.compile_order(
        kinds, ss, ms, starts, np.array(sched.stage_rank, dtype=np.int64), S, sched.num_micro_batches, p,
        2 if sched.split_backward else 1)
    if not ok:
        return _compile_python(sched)  # raises the deadlock error with the stuck actions
    return _Compiled(None, p, S, tuple(peak.tolist()), tuple(stage_peak.tolist()), tuple(map(tuple, counts.tolist())),
                     sched.stage_rank, order)


def _compile_python(sched: Schedule) -> _Compiled:
    p = sched.pp
    S = sched.num_stages
    M = sched.num_micro_batches
    rank_of = sched.stage_rank
    index = [-1] * (3 * S * M)  # (kind * S + stage) * M + mb -> position in `order`
    order: list[tuple[int, int, int, int, int, int]] = []
    ptr = [0] * p
    remaining = sum(len(a) for a in sched.actions)
    while remaining:
        progressed = False
        for r in range(p):
            acts = sched.actions[r]
            n = len(acts)
            i = ptr[r]
            while i < n:
                kind, s, mb = acts[i]
                k = _KIND[kind]
                if k == 0:
                    dep = index[(s - 1) * M + mb] if s > 0 else -1
                    if s > 0 and dep < 0:
                        break
                    lag = s - 1 if s > 0 and rank_of[s - 1] != r else -1
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
                        dep, lag = own, -1
                else:
                    dep = index[(S + s) * M + mb]
                    if dep < 0:
                        break
                    lag = -1
                index[(k * S + s) * M + mb] = len(order)
                order.append((r, k, s, mb, dep, lag))
                i += 1
            if i != ptr[r]:
                remaining -= i - ptr[r]
                ptr[r] = i
                progressed = True
        if not progressed:
            stuck = {r: str(sched.actions[r][ptr[r]]) for r in range(p) if ptr[r] < len(sched.actions[r])}
            raise ValueError(f"schedule {sched.name} deadlocks: next actions {stuck} wait on each other")
    # In-flight micro-batches change only with a rank's own actions, which run in list order,
    # so their peaks are a property of the schedule, not of the times.
    release = 2 if sched.split_backward else 1
    inflight, peak = [0] * p, [0] * p
    st_in, st_peak = [0] * S, [0] * S
    counts = [[0, 0, 0] for _ in range(S)]
    for r, acts in enumerate(sched.actions):
        for a in acts:
            k, s = _KIND[a[0]], a[1]
            counts[s][k] += 1
            if k == 0:
                inflight[r] += 1
                st_in[s] += 1
                peak[r] = max(peak[r], inflight[r])
                st_peak[s] = max(st_peak[s], st_in[s])
            elif k == release:
                inflight[r] -= 1
                st_in[s] -= 1
    return _Compiled(tuple(order), p, S, tuple(peak), tuple(st_peak), tuple((nf, nb, nw) for nf, nb, nw in counts),
                     rank_of)


def _run(comp: _Compiled, dur: tuple[tuple[float, float, float], ...], lag: tuple[float, ...],
         split: bool, want_timeline: bool) -> ScheduleResult:
    p = comp.num_ranks
    d = [x for t in dur for x in t]
    lg = [*lag, 0.0]
    end = [0.0] * (len(comp.flat) + 1)  # end[-1] stays 0.0: the sentinel for "no dependency"
    free = [0.0] * p
    timeline: list[tuple[int, str, int, int, float, float]] = []  # stays empty without want_timeline
    if want_timeline:
        for i, ((r, dep, li, di), (_, k, s, mb, _, _)) in enumerate(zip(comp.flat, comp.order, strict=True)):
            start = free[r]
            x = end[dep] + lg[li]
            if x > start:
                start = x
            e = start + d[di]
            end[i] = free[r] = e
            timeline.append((r, "FBW"[k], s, mb, start, e))
        timeline.sort(key=lambda t: (t[0], t[4]))
    else:
        lags = [lg[li] for li in comp.lag_slot]  # per action, gathered before the sequential pass
        durs = [d[di] for di in comp.dur_slot]
        i = 0
        for r, dep, x, t in zip(comp.rank, comp.dep, lags, durs, strict=True):
            start = free[r]
            x += end[dep]
            if x > start:
                start = x
            end[i] = free[r] = start + t
            i += 1
    busy = [0.0] * p
    for s, (nf, nb, nw) in enumerate(comp.actions_per_rank_stage):
        f, b, w = dur[s]
        busy[comp.stage_rank[s]] += nf * f + nb * b + nw * w
    step = max(free)
    top = max(busy)
    bubble = 1.0 - top / step if step > 0 else 0.0
    return ScheduleResult(step, max(0.0, bubble), tuple(busy), comp.peak_in_flight, comp.peak_in_flight_per_stage,
                          tuple(timeline))


def play(comp: _Compiled, times: Sequence[tuple[float, float, float, float]], split: bool, *,
         compiled: bool = False) -> ScheduleResult:
    """The schedule `comp` played with `times` ((F, B, W, p2p) per virtual stage), no timeline; by
    the compiled kernel when `compiled` and the kernels are loaded (bit-identical to `_run`)."""
    if not (compiled and kernels.ready and comp.num_actions):
        return _run(comp, *_durations(times, split), split, False)
    jit = kernels.jit
    assert jit is not None  # kernels.ready: loaded
    step, busy_array = jit.run_plain(*comp.arrays, kernels.times_array(times), split, comp.num_ranks)
    busy = tuple(busy_array.tolist())
    top = max(busy)
    bubble = 1.0 - top / step if step > 0 else 0.0
    return ScheduleResult(step, max(0.0, bubble), busy, comp.peak_in_flight, comp.peak_in_flight_per_stage)


def simulate(schedule: Schedule, stage_times: Sequence[StageTimes | tuple[float, float, float, float]], *,
             timeline: bool = True) -> ScheduleResult:
    """Play `schedule` with one `specs.StageTimes` (or (F, B, W, p2p) tuple) per virtual stage.

    For schedules that do not split backward, W time (if any) is added to B.
    """
    if len(stage_times) != schedule.num_stages:
        raise ValueError(
            f"simulate: {schedule.num_stages} stage times expected (pp {schedule.pp} x virtual "
            f"{schedule.virtual_stages}), got {len(stage_times)}"
        )
    dur, lag = _durations(stage_times, schedule.split_backward)
    return _run(_compile(schedule), dur, lag, schedule.split_backward, timeline)


def _durations(stage_times: Sequence[StageTimes | tuple[float, float, float, float]], split: bool,
               ) -> tuple[tuple[tuple[float, float, float], ...], tuple[float, ...]]:
    """(F, B, W) per stage as the schedule plays them (W added to B unless `split`), p2p per stage."""
    dur: list[tuple[float, float, float]] = []
    lag: list[float] = []
    for st in stage_times:
        if isinstance(st, tuple):
            f, b, w, c = st
        else:
            f, b, w, c = st.forward_s, st.backward_s, st.weight_s, st.p2p_s
        dur.append((f, b, w) if split else (f, b + w, 0.0))
        lag.append(c)
    return tuple(dur), tuple(lag)


def pipeline_lower_bound(name: str, pp: int, m: int, v: int, times: Sequence[tuple[float, float, float, float]]) -> float:
    """A lower bound on `simulate`'s step time for these stage times, without playing the schedule.

    Every action of rank r (stages r, r + pp, ...) waits for the forward of virtual stages
    0..r-1 of its micro-batch and their sends (F(s) after F(s-1) + p2p(s-1)); the rank then
    runs its m x (F + B + W) of busy time one action at a time; and, in every schedule but
    zero_bubble (whose last action on a rank may be a W), its last action is B of stage r for the
    last micro-batch, which the backwards of stages r-1..0 and their sends must still follow:

        step >= max_r  sum_{s<r} (F_s + p2p_s) + busy_r + sum_{s<r} (B_s + p2p_s)

    (B including W where the schedule does not split it). In zero_bubble (ZB-H1) rank r holds
    back at most min(r + 1, m) weight passes until after its last B, so that B ends no earlier than
    sum_{s<r} (F_s + p2p_s) + busy_r - min(r + 1, m) W_r, and the input-grad chain still follows it.
    Tight for 1F1B with equal stages and no
    p2p time (the simulator's step is exactly this), never above the simulation (tests play all
    schedules).
    `times`: (F, B, W, p2p) per virtual stage, as for `play`.
    """
    split = name == "zero_bubble"
    busy = [0.0] * pp
    for j, (f, b, w, _c) in enumerate(times):
        busy[j % pp] += m * (f + b + w)
    best = pre_f = pre_b = 0.0
    for r in range(pp):
        f, b, w, c = times[r]
        t = pre_f + busy[r] + (0.0 if split else pre_b)
        if split:
            t = max(t, pre_f + busy[r] - min(r + 1, m) * w + pre_b)
        if t > best:
            best = t
        pre_f += f + c
        pre_b += (b if split else b + w) + c
    return best
