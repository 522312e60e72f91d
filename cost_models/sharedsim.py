"""A pipeline schedule played on processes that share fewer cores than there are processes.

cost_models.simulator gives every pp rank a device of its own. On a shared host (N processes,
C < N cores, cost_models.sharedhost) a rank that waits for a receive lends its core to the
others, but a rank that computes gets only its share of the cores: the OS scheduler divides
them among the runnable processes (processor sharing, as Linux's CFS approximates it).
`simulate_shared` plays the same schedule as data (the plain simulator's compiled dependency
order: same actions, same dependencies, same p2p delays) as a fluid model:

- a rank runs its actions in list order; an action is runnable once the rank's previous action
  ended and its dependency ended p2p(s) earlier (a send delays the receiver; it takes no core);
- between events every runnable rank progresses at min(1, cores / runnable ranks) of a core;
  an action's work is its duration at one core's speed;
- each rank may end with `tail` work (its optimizer step and once-per-step copies), runnable
  once its last action ended.

`cores` is the share of one pipeline: C / (dp x tp) when dp x tp identical pipelines run side by
side. Durations are CPU work: the stage times at per-core contended speed (compute, the engines'
host work and the tensor-parallel collectives, whose gloo copies and reductions also run on the
cores). With cores >= pp every rank runs at full speed and the result is the plain simulation's
step (tests); with one core and no p2p delay it is the sum of all work.

Cost: O(events x pp), events <= 2 x actions; only oversubscribed hosts (CPU presets) use it.
"""

from __future__ import annotations

from collections.abc import Sequence

from cost_models.simulator import _durations, compile_schedule

_EPS = 1e-12


def simulate_shared(name: str, pp: int, m: int, v: int, times: Sequence[tuple[float, float, float, float]], cores: float,
                    tail: list[float] | None = None) -> float:
    """Step time (the last rank's end) of schedule `name` under processor sharing (module docstring).

    `times`: (F, B, W, p2p) per virtual stage, as for simulator.play; `tail`: work per pp
    rank after its last action (None: none)."""
    if cores <= 0:
        raise ValueError(f"simulate_shared: cores must be > 0 (got {cores})")
    comp = compile_schedule(name, pp, m, v)
    dur, lag = _durations(times, name == "zero_bubble")
    order = comp.order
    n = len(order)
    work = [dur[s][k] for _r, k, s, _mb, _dep, _lg in order]
    delay = [lag[lg] if lg >= 0 else 0.0 for _r, _k, _s, _mb, _dep, lg in order]
    per_rank: list[list[int]] = [[] for _ in range(pp)]
    for i, a in enumerate(order):
        per_rank[a[0]].append(i)
    tails = list(tail) if tail is not None else [0.0] * pp
    end = [-1.0] * n
    ptr = [0] * pp
    left: list[float | None] = [None] * pp  # remaining work of the running action (None: waiting)
    running: list[int] = [-1] * pp  # action index, or n for the tail, -1 none
    done = [False] * pp
    t = 0.0
    while True:
        # start what can start now; note when waiting ranks become runnable
        next_ready = float("inf")
        for r in range(pp):
            if done[r] or left[r] is not None:
                continue
            if ptr[r] == len(per_rank[r]):
                if tails[r] > 0.0:
                    left[r], running[r] = tails[r], n
                    ptr[r] += 1
                else:
                    done[r] = True
                continue
            if ptr[r] > len(per_rank[r]):
                done[r] = True
                continue
            i = per_rank[r][ptr[r]]
            dep = order[i][4]
            if dep >= 0:
                if end[dep] < 0.0:
                    continue  # waits for another rank's action still to run
                ready = end[dep] + delay[i]
                if ready > t + _EPS:
                    next_ready = min(next_ready, ready)
                    continue
            left[r], running[r] = work[i], i
            ptr[r] += 1
        active = [(r, work_left) for r, work_left in enumerate(left) if work_left is not None]
        if not active:
            if next_ready == float("inf"):
                break  # every rank is done
            t = next_ready
            continue
        speed = min(1.0, cores / len(active))
        dt = min(work_left for _r, work_left in active) / speed
        if next_ready - t < dt:
            dt = next_ready - t
        t += dt
        for r, work_left in active:
            rem = work_left - dt * speed
            if rem <= _EPS * max(1.0, t):
                i = running[r]
                if i < n:
                    end[i] = t
                left[r], running[r] = None, -1
            else:
                left[r] = rem
    return t
