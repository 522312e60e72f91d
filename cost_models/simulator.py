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
per (schedule, pp, m, v) and the timing pass is one loop over the actions. Results are cached
per (structure, stage times).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from cost_models.schedules import Schedule, build_schedule

_KIND = {"F": 0, "B": 1, "W": 2}


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
        return max(range(len(self.busy_s)), key=lambda r: self.busy_s[r])


@dataclass(frozen=True, slots=True)
class _Compiled:
    # per action, in a valid processing order: (rank, kind, stage, mb, dep index or -1, p2p stage or -1)
    order: tuple[tuple[int, int, int, int, int, int], ...]
    num_ranks: int
    num_stages: int


@lru_cache(maxsize=256)
def _compile(sched: Schedule) -> _Compiled:
    p = sched.pp
    S = sched.num_stages
    rank_of = sched.stage_rank
    index: dict[tuple[int, int, int], int] = {}
    order: list[tuple[int, int, int, int, int, int]] = []
    ptr = [0] * p
    remaining = sum(len(a) for a in sched.actions)
    while remaining:
        progressed = False
        for r in range(p):
            acts = sched.actions[r]
            while ptr[r] < len(acts):
                a = acts[ptr[r]]
                k, s, mb = _KIND[a.kind], a.stage, a.microbatch
                if k == 0:
                    dep = (0, s - 1, mb) if s > 0 else None
                    lag = s - 1 if s > 0 and rank_of[s - 1] != r else -1
                elif k == 1:
                    dep = (1, s + 1, mb) if s < S - 1 else (0, s, mb)
                    lag = s if s < S - 1 and rank_of[s + 1] != r else -1
                else:
                    dep, lag = (1, s, mb), -1
                if dep is not None and dep not in index:
                    break
                if k == 1 and (0, s, mb) not in index:
                    break
                index[(k, s, mb)] = len(order)
                order.append((r, k, s, mb, index[dep] if dep is not None else -1, lag))
                ptr[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: str(sched.actions[r][ptr[r]]) for r in range(p) if ptr[r] < len(sched.actions[r])}
            raise ValueError(f"schedule {sched.name} deadlocks: next actions {stuck} wait on each other")
    return _Compiled(tuple(order), p, S)


def _run(comp: _Compiled, dur: tuple[tuple[float, float, float], ...], lag: tuple[float, ...],
         split: bool, want_timeline: bool) -> ScheduleResult:
    p, S = comp.num_ranks, comp.num_stages
    end = [0.0] * len(comp.order)
    free = [0.0] * p
    busy = [0.0] * p
    inflight = [0] * p
    peak = [0] * p
    st_in = [0] * S
    st_peak = [0] * S
    release = 2 if split else 1
    timeline = []
    for i, (r, k, s, mb, dep, lg) in enumerate(comp.order):
        start = free[r]
        if dep >= 0:
            ready = end[dep] + (lag[lg] if lg >= 0 else 0.0)
            if ready > start:
                start = ready
        d = dur[s][k]
        e = start + d
        end[i] = e
        free[r] = e
        busy[r] += d
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
        if want_timeline:
            timeline.append((r, "FBW"[k], s, mb, start, e))
    step = max(free)
    top = max(busy)
    bubble = 1.0 - top / step if step > 0 else 0.0
    if want_timeline:
        timeline.sort(key=lambda t: (t[0], t[4]))
    return ScheduleResult(step, max(0.0, bubble), tuple(busy), tuple(peak), tuple(st_peak), tuple(timeline))


def simulate(schedule: Schedule, stage_times, *, timeline: bool = True) -> ScheduleResult:
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


def _durations(stage_times, split: bool):
    dur, lag = [], []
    for st in stage_times:
        if isinstance(st, tuple):
            f, b, w, c = st
        else:
            f, b, w, c = st.forward_s, st.backward_s, st.weight_s, st.p2p_s
        dur.append((f, b, w) if split else (f, b + w, 0.0))
        lag.append(c)
    return tuple(dur), tuple(lag)


_CACHE: dict = {}
_CACHE_MAX = 50_000


def simulate_cached(name: str, pp: int, m: int, v: int, times: tuple[tuple[float, float, float, float], ...]) -> ScheduleResult:
    """`simulate` without a timeline, memoised on the schedule and the stage times.

    The simulator is homogeneous (scaling every time by a scales the step time by a and leaves
    bubble and in-flight counts unchanged), so the key is the times relative to the first
    stage's forward, rounded to 1e-9; the cached result is rescaled.
    """
    scale = times[0][0] or 1.0
    key = (name, pp, m, v, tuple(round(x / scale, 9) for t in times for x in t))
    hit = _CACHE.get(key)
    if hit is None:
        sched = build_schedule(name, pp, m, v)
        dur, lag = _durations(tuple(tuple(x / scale for x in t) for t in times), sched.split_backward)
        hit = _run(_compile(sched), dur, lag, sched.split_backward, False)
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[key] = hit
    if scale == 1.0:
        return hit
    return ScheduleResult(hit.step_time_s * scale, hit.bubble_fraction, tuple(b * scale for b in hit.busy_s),
                          hit.peak_in_flight, hit.peak_in_flight_per_stage)
