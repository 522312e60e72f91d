"""Pipeline stage partition: blocks -> stages by min-max dynamic programming under memory.

Problem. Blocks 0..B-1 are split into S = pp * v contiguous (virtual) stages, cutting only after
blocks listed in `graph.cut_points` (every block boundary when the graph lists none). Stage j
holds blocks a..b and runs one checkpointing mode m in {none, selective, full} (only the modes
allowed). Its time per micro-batch is

    time_j = sum_{i=a..b} time_m[i]            (forward + backward (+ weight) + recompute)

and its memory on its device is

    mem_j  = sum_{i=a..b} state[i] + inflight_j * sum_{i=a..b} act_m[i]

(`state`: parameters, gradients and optimizer states of the block after the data-parallel
sharding; `act_m`: activation bytes one in-flight micro-batch keeps for the block under mode m;
`inflight_j`: micro-batches whose activations stage j holds at its peak, from the schedule).
We minimise the slowest stage, max_j time_j, subject to mem_j <= budget for every stage, with
each stage choosing the fastest mode that fits.

Method. Binary search on the bottleneck T with a greedy feasibility test: stage 0 extends as
far as it can (time <= T and memory fits, in its best mode), then stage 1 from there, and so on.
Because a sub-range of a feasible stage is feasible (time and memory only grow with more blocks),
the greedy reach after k stages is at least that of any feasible partition, so greedy fails only
when no partition with bottleneck T exists: the search is exact up to the tolerance of the
bisection (1e-9 relative), and each test is O(S * modes * log B) with prefix sums and bisection.
After the search each stage takes the fastest mode that fits its memory.

Interleaved schedules put virtual stages j, j+pp, ... on one rank; the caller passes a budget per
virtual stage (capacity / v) so the sum over a rank's chunks fits, a conservative split.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

MODES = ("none", "selective", "full")
INF = float("inf")


@dataclass(frozen=True, slots=True)
class ModeCosts:
    """Per-block costs of one checkpointing mode (index = block index)."""

    mode: str
    time_s: tuple[float, ...]
    act_bytes: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Partition:
    stages: tuple[tuple[int, int, str], ...]  # (first, last, mode) per virtual stage
    stage_time_s: tuple[float, ...]
    stage_memory_bytes: tuple[float, ...]

    @property
    def bottleneck_s(self) -> float:
        return max(self.stage_time_s)


def _prefix(values: Sequence[float]) -> list[float]:
    out = [0.0]
    acc = 0.0
    for v in values:
        acc += v
        out.append(acc)
    return out


class Partitioner:
    """Partitions one block sequence for one set of per-block costs; reusable across budgets.

    Args:
        modes: costs per allowed checkpointing mode, fastest first (none, selective, full).
        state_bytes: per-block parameter + gradient + optimizer bytes on one device.
        ends: block indices after which a stage may end, ascending; must include the last block.
    """

    def __init__(self, modes: Sequence[ModeCosts], state_bytes: Sequence[float], ends: Sequence[int]):
        assert modes and ends, "partition needs at least one mode and one end"
        self.modes = list(modes)
        self.num_blocks = len(state_bytes)
        assert ends[-1] == self.num_blocks - 1, "the last block must end a stage"
        self.ends = list(ends)
        n = self.num_blocks
        st = _prefix(state_bytes)
        self._state_at = st  # prefix over blocks
        self._time = [_prefix(m.time_s) for m in self.modes]
        self._act = [_prefix(m.act_bytes) for m in self.modes]
        # Prefix values at each allowed end (index k -> block ends[k]), for bisection.
        self._time_end = [[p[e + 1] for e in self.ends] for p in self._time]
        self._starts = [0] + [e + 1 for e in self.ends[:-1]]
        self._mem_cache: dict[tuple[int, float], list[float]] = {}
        self.total_time_s = [p[n] for p in self._time]
        self.max_block_time_s = [max(m.time_s) if m.time_s else 0.0 for m in self.modes]

    # ------------------------------------------------------------------ pieces
    def _mem_end(self, mi: int, inflight: float) -> list[float]:
        key = (mi, inflight)
        arr = self._mem_cache.get(key)
        if arr is None:
            st, act = self._state_at, self._act[mi]
            arr = [st[e + 1] + inflight * act[e + 1] for e in self.ends]
            self._mem_cache[key] = arr
        return arr

    def stage_cost(self, first: int, last: int, mode_index: int, inflight: float) -> tuple[float, float]:
        """(time_s, memory_bytes) of one stage holding blocks first..last in a mode."""
        t = self._time[mode_index]
        a = self._act[mode_index]
        st = self._state_at
        time_s = t[last + 1] - t[first]
        mem = (st[last + 1] - st[first]) + inflight * (a[last + 1] - a[first])
        return time_s, mem

    def _reach(self, k0: int, j_max: int, limit_s: float, inflight: float, budget: float) -> tuple[int, float]:
        """(largest end slot k in [k0, j_max] such that a stage from slot k0 to k is feasible, or -1;
        the smallest limit above limit_s at which that reach would grow (inf if never))."""
        start = self._starts[k0]
        best = -1
        event = INF
        for mi in range(len(self.modes)):
            tend = self._time_end[mi]
            t0 = self._time[mi][start]
            k_t = bisect_right(tend, t0 + limit_s * (1 + 1e-12), k0, j_max + 1) - 1
            mend = self._mem_end(mi, inflight)
            m0 = self._state_at[start] + inflight * self._act[mi][start]
            cap = m0 + budget
            if k_t >= k0:
                k_m = bisect_right(mend, cap, k0, k_t + 1) - 1
                if k_m > best:
                    best = k_m
                if k_m < k_t:
                    continue  # memory binds in this mode: more time does not help it
            nxt = k_t + 1
            if nxt <= j_max and mend[nxt] <= cap:
                ev = tend[nxt] - t0
                if ev < event:
                    event = ev
        return best, event

    def _greedy(self, limit_s: float, inflight: Sequence[float], budget: float) -> tuple[list[int] | None, float]:
        """(end slots of the greedy partition with every stage under limit_s, or None; the smallest
        limit above limit_s at which some stage of this greedy could reach further)."""
        num_stages = len(inflight)
        n_ends = len(self.ends)
        k0 = 0
        cuts: list[int] = []
        event = INF
        for j in range(num_stages):
            remaining = num_stages - 1 - j
            j_max = n_ends - 1 - remaining
            if j_max < k0:
                return None, event
            k, ev = self._reach(k0, j_max, limit_s, inflight[j], budget)
            event = min(event, ev)
            if remaining == 0:
                # The last stage must take the rest.
                if k != n_ends - 1:
                    return None, event
                cuts.append(n_ends - 1)
                return cuts, event
            if k < k0:
                return None, event
            cuts.append(k)
            k0 = k + 1
        return None, event

    # ------------------------------------------------------------------ API
    def solve(self, inflight: Sequence[float], budget_bytes: float) -> Partition | None:
        """Min-max partition into len(inflight) stages, each fitting budget_bytes; None if none fits.

        Bisection on the bottleneck whose ends snap to attainable values: a feasible probe lowers
        `hi` to its partition's real bottleneck, an infeasible one raises `lo` to the next limit at
        which the greedy could change, so it stops exactly at the optimum."""
        num_stages = len(inflight)
        if num_stages > len(self.ends):
            return None
        fastest_total = self.total_time_s[0]
        slowest = max(self.total_time_s)
        lo = max(min(self.max_block_time_s), fastest_total / num_stages) * (1 - 1e-12)
        hi = slowest * (1 + 1e-12) + 1e-30
        cuts, _ = self._greedy(hi, inflight, budget_bytes)
        if cuts is None:
            return None
        hi = self._bottleneck(cuts, inflight, budget_bytes)
        probe_lo = False
        while lo < hi * (1 - 1e-12):
            mid = lo if probe_lo else 0.5 * (lo + hi)
            got, event = self._greedy(mid, inflight, budget_bytes)
            if got is None:
                if event >= hi:
                    break  # nothing below hi is attainable: hi is optimal
                lo = max(mid, event)
                probe_lo = not probe_lo  # alternate: try the attainable lo itself, then bisect
            else:
                new_hi = self._bottleneck(got, inflight, budget_bytes)
                if new_hi >= hi:
                    break  # feasible at mid within rounding: hi is optimal
                cuts, hi = got, new_hi
                probe_lo = False
        return self._assign(cuts, inflight, budget_bytes)

    def solve_free(self, num_stages: int) -> Partition | None:
        """Min-max partition ignoring memory, every stage in the fastest mode (the same snapping
        bisection as `solve`, one mode, no memory: O(num_stages log B) per probe).
        The returned stage_memory_bytes are 0 (not computed)."""
        n_ends = len(self.ends)
        if num_stages > n_ends:
            return None
        tend, tpre, starts = self._time_end[0], self._time[0], self._starts
        eps = 1 + 1e-12

        def greedy(limit: float):
            k0, cuts, event, worst = 0, [], INF, 0.0
            for j in range(num_stages):
                j_max = n_ends - num_stages + j
                t0 = tpre[starts[k0]]
                k = bisect_right(tend, t0 + limit * eps, k0, j_max + 1) - 1
                if k + 1 <= j_max:
                    event = min(event, tend[k + 1] - t0)
                if k < k0 or (j == num_stages - 1 and k != n_ends - 1):
                    return None, event, 0.0
                worst = max(worst, tend[k] - t0)
                cuts.append(k)
                k0 = k + 1
            return cuts, event, worst

        lo = max(self.max_block_time_s[0], self.total_time_s[0] / num_stages) * (1 - 1e-12)
        cuts, _, hi = greedy(self.total_time_s[0] * eps + 1e-30)
        if cuts is None:
            return None
        probe_lo = False
        while lo < hi * (1 - 1e-12):
            mid = lo if probe_lo else 0.5 * (lo + hi)
            got, event, worst = greedy(mid)
            if got is None:
                if event >= hi:
                    break
                lo = max(mid, event)
                probe_lo = not probe_lo
            else:
                if worst >= hi:
                    break
                cuts, hi, probe_lo = got, worst, False
        stages, times, first = [], [], 0
        name = self.modes[0].mode
        for k in cuts:
            last = self.ends[k]
            stages.append((first, last, name))
            times.append(tpre[last + 1] - tpre[first])
            first = last + 1
        return Partition(tuple(stages), tuple(times), (0.0,) * len(stages))

    def _bottleneck(self, cuts: Sequence[int], inflight: Sequence[float], budget: float) -> float:
        return self._assign(cuts, inflight, budget).bottleneck_s

    def _assign(self, cuts: Sequence[int], inflight: Sequence[float], budget: float) -> Partition:
        """Stages from end slots: each takes the fastest mode that fits its budget."""
        stages, times, mems = [], [], []
        first = 0
        for j, k in enumerate(cuts):
            last = self.ends[k]
            pick = None
            for mi in range(len(self.modes)):
                t, m = self.stage_cost(first, last, mi, inflight[j])
                if m <= budget * (1 + 1e-12) and (pick is None or t < pick[1]):
                    pick = (mi, t, m)
            if pick is None:  # cannot happen for cuts from _greedy; keep the leanest mode
                mi = len(self.modes) - 1
                t, m = self.stage_cost(first, last, mi, inflight[j])
                pick = (mi, t, m)
            stages.append((first, last, self.modes[pick[0]].mode))
            times.append(pick[1])
            mems.append(pick[2])
            first = last + 1
        return Partition(tuple(stages), tuple(times), tuple(mems))

    def evaluate(self, stages: Sequence[tuple[int, int, str]], inflight: Sequence[float]) -> Partition:
        """Times and memory of a given partition (modes by name)."""
        idx = {m.mode: i for i, m in enumerate(self.modes)}
        times, mems = [], []
        for j, (a, b, mode) in enumerate(stages):
            t, m = self.stage_cost(a, b, idx[mode], inflight[j])
            times.append(t)
            mems.append(m)
        return Partition(tuple(tuple(s) for s in stages), tuple(times), tuple(mems))

    def fits(self, stages: Sequence[tuple[int, int, str]], inflight: Sequence[float], budget: float) -> Partition | None:
        """The partition with each stage in its fastest mode that fits, or None if a stage cannot."""
        return self._assign_ranges([(a, b) for a, b, _ in stages], inflight, budget)

    def _assign_ranges(self, ranges, inflight, budget) -> Partition | None:
        stages, times, mems = [], [], []
        for j, (first, last) in enumerate(ranges):
            pick = None
            for mi in range(len(self.modes)):
                t, m = self.stage_cost(first, last, mi, inflight[j])
                if m <= budget * (1 + 1e-12) and (pick is None or t < pick[1]):
                    pick = (mi, t, m)
            if pick is None:
                return None
            stages.append((first, last, self.modes[pick[0]].mode))
            times.append(pick[1])
            mems.append(pick[2])
        return Partition(tuple(stages), tuple(times), tuple(mems))

    def min_bottleneck_s(self, num_stages: int) -> float:
        """Lower bound on the slowest stage of any partition into num_stages (no memory limit)."""
        return max(min(self.max_block_time_s), self.total_time_s[0] / num_stages)


def even_partition(num_blocks: int, num_stages: int, ends: Sequence[int]) -> list[tuple[int, int]]:
    """Block ranges with (nearly) equal block counts, cutting only at allowed ends."""
    if num_stages > len(ends):
        raise ValueError(f"{num_stages} stages need {num_stages - 1} cut points; the graph has {len(ends) - 1}")
    out = []
    first = 0
    k_prev = -1
    for j in range(num_stages):
        if j == num_stages - 1:
            k = len(ends) - 1
        else:
            target = round((j + 1) * num_blocks / num_stages) - 1
            # nearest allowed end at or after target, leaving slots for later stages
            k = max(k_prev + 1, min(bisect_right(ends, target) - 1, len(ends) - 1 - (num_stages - 1 - j)))
            if k <= k_prev:
                k = k_prev + 1
        out.append((first, ends[k]))
        first = ends[k] + 1
        k_prev = k
    return out
