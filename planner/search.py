"""The search: enumerate the hybrid-parallel space, prune by cheap bounds, score the rest.

Space (one point = specs.Knobs plus a stage partition):
- mesh pp x dp x tp = number of devices; tp inside a node (devices_per_node % tp == 0) unless
  constraints.tp_across_nodes; tp divides every TPCandidate.divisor of the graph; pp * v stages
  fit the graph's cut points; dp divides the global batch;
- sharding none | zero1 | zero2 | zero3 | hsdp(shard size s: 1 < s < dp, s | dp), only none when
  dp = 1 (the runtime runs no FSDP2 on one replica; planner.space); offload none | cpu (cpu only
  if train.allow_offload);
- micro-batch size mb | global_batch / dp, num_micro_batches = global_batch / (dp * mb)
  (> 1 needs train.allow_grad_accumulation or pp > 1);
- sequence parallelism (tp > 1);
- schedule (pp > 1 only): gpipe, 1f1b (num_micro_batches >= pp, as torch's Schedule1F1B
  requires), interleaved_1f1b with v = 2..8 virtual stages where num_micro_batches is a multiple
  of pp (Megatron-LM's rule, which the cost model's schedule builder enforces; it also satisfies
  torch's "multiple of max(1, m // pp)"), and zero_bubble as ZB-H1 (v = 1, torch's rule on m);
- points the runtime refuses (planner.capabilities: zero1 with tp/pp, offload without FSDP, fp16
  with pp, tp over conv candidates) are recorded as rejected with the runtime's reason;
- checkpointing per stage: chosen inside the partition DP (planner.partition), the fastest mode
  whose stage fits memory; a pinned recompute fixes it for all stages.

Bounds (best-first). Every (region = mesh, mb, sp; schedule, v) item gets a step-time bound
from the memory-free min-max partition's stage times in the fastest mode (`schedule_bound`):
    num_micro_batches * (busiest rank's time per micro-batch), and where the backend simulates
    the schedule, max_r (F+B of the stages before rank r) + m x rank r's time (the warm-up and
    drain chains; cost_models.simulator.pipeline_lower_bound),
and items are visited in order of that bound, so the incumbent is good early. Inside an item,
each sharding first gets the backend's exact bound for its partition (stage times with FSDP
and p2p, warm-up/drain, data-parallel sync and optimizer terms; no simulation), and is scored
only if that bound can still beat the k-th best. A point is pruned when its bound is no better
than the k-th best distinct configuration found so far (k = constraints.top_k, so the
alternatives are exact within ALTERNATIVES_WINDOW of the best), or when its model states alone
exceed memory (max(total / pp, largest block) of parameters, gradients and optimizer states
after sharding, by the estimate's own term: cost_models.memory.sharded_states). The item bound is that of the partition the search scores first (the
memory-free one); a point that needs a memory-aware partition is bounded again on that
partition before it is scored. Every pruned region is recorded with its reason.

Scoring calls the cost model (`Backend.score` = cost_models.estimate_knobs). When the cost model
says a partition does not fit, the partition is redone with the budget lowered by the overshoot
(twice at most). The best few are then refined by moving single cuts and checkpointing modes
(hill climbing on the cost model's own step time).
"""

from __future__ import annotations

import gc
import heapq
import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from cost_models import memory
from planner.capabilities import knob_problem
from planner.partition import ModeCosts, Partition, Partitioner
from planner.scoring import Backend
from planner.space import SHARDINGS, SearchSpace
from specs import Constraints, HardwareSpec, Knobs, ModelGraph, Rejection, SpecError, TrainSpec

GiB = 2**30


@dataclass(frozen=True, slots=True)
class Scored:
    knobs: Knobs
    stages: tuple[tuple[int, int, str], ...]
    estimate: Any
    step_time_s: float
    peak_memory_bytes: float
    fits: bool

    @property
    def group(self) -> tuple:
        return group_key(self.knobs)


def group_key(k: Knobs) -> tuple:
    """Alternatives are distinct in mesh, sharding, offload and schedule (best mb/sp/ckpt of each)."""
    return (k.pp, k.dp, k.tp, k.ep, k.cp, k.sharding, k.hsdp_shard_size or 0, k.offload, k.schedule, k.virtual_stages)


def _order(k: Knobs) -> tuple:
    """Deterministic tie-break between equal step times: simpler plans first."""
    return (
        k.pp, k.tp, k.cp, k.ep, SHARDINGS.index(k.sharding), k.hsdp_shard_size or 0, k.offload != "none",
        k.schedule, k.virtual_stages, -k.micro_batch_size, k.sequence_parallel, str(k.recompute),
    )


@dataclass
class SearchResult:
    best: Scored
    ranked: list[Scored]  # best per group, best first (includes best)
    rejected: list[Rejection]
    scored: int
    pruned: int
    time_s: float
    extra: list[Rejection] = field(default_factory=list)


class Search(SearchSpace):
    """One planning problem: the space, the bounds, the records. `run()` returns a SearchResult."""

    def __init__(
        self, graph: ModelGraph, hw: HardwareSpec, train: TrainSpec, constraints: Constraints | None,
        backend: Backend,
    ):
        self.graph, self.hw, self.train = graph, hw, train
        self.c = constraints or Constraints()
        self.backend = backend
        self.num_devices = hw.num_devices
        self.capacity_bytes = float(hw.device.memory_bytes)
        self.budget_bytes = self.capacity_bytes * (1.0 - self.c.memory_headroom_fraction)
        cuts = sorted({cp.after_block for cp in graph.cut_points if cp.after_block < graph.num_blocks - 1})
        if not graph.cut_points:
            cuts = list(range(graph.num_blocks - 1))
        self.ends = [*cuts, graph.num_blocks - 1]
        self.pins = self.c.pins()
        # the MoE layers' expert counts (specs.ExpertsInfo): expert parallelism's degrees divide them
        self.num_experts = tuple(sorted({op.experts.num_experts for lt in graph.layer_types.values()
                                         for op in lt.ops if op.experts is not None}))
        self.modes = self._modes()
        # the cost model's bytes per parameter (cost_models.blocks.Context.bpp): its convention
        # decides what each ZeRO stage divides (cost_models.memory.sharded_states)
        self._bpp = memory.bytes_per_param(train.precision, train.optimizer)
        self._rejected: dict[str, Rejection] = {}
        self._partitioners: dict[tuple, Partitioner] = {}
        self._partitions: dict[tuple, Partition | None] = {}
        self._unconstrained: dict[tuple, Partition | None] = {}
        self._state_lb: dict[tuple, float] = {}
        self.scored = 0
        self.pruned = 0
        self.best_by_group: dict[tuple, Scored] = {}
        self._all: list[Scored] = []
        self.closest: Scored | None = None  # least memory among scored, for the no-fit error
        self.least_state: tuple[float, str] | None = None

    # ------------------------------------------------------------------ records
    def reject(self, region: str, reason: str, count: int = 1) -> None:
        self.pruned += count
        old = self._rejected.get(region)
        if old is None:
            self._rejected[region] = Rejection(region=region, reason=reason, count=count)
        else:
            self._rejected[region] = old.model_copy(update={"count": old.count + count})

    # ------------------------------------------------------------------ memory
    def state_bytes(self, prof, sharding: str, hsdp: int | None, offload: str, dp: int) -> list[float]:
        """Per-block parameter + gradient + optimizer bytes on one device after sharding.

        The estimate's own term, cost_models.memory.sharded_states, applied block by block to the
        profile's bytes (so a bound built on it is one: zero2 keeps FSDP2's parameters sharded in the
        torch convention, as the estimate does)."""
        bpp = self._bpp
        out = []
        for p, g, o in zip(prof.param_bytes, prof.grad_bytes, prof.optimizer_bytes, strict=True):
            # one "parameter" whose bytes are the block's: sharded_states is linear in the count
            st = memory.sharded_states(1.0, replace(bpp, param=p, grad=g, optimizer=o), sharding=sharding,
                                       dp=dp, hsdp_shard_size=hsdp, offload=offload)
            out.append(st.param + st.grad + st.optimizer)
        return out

    def state_lower_bound(self, pp: int, dp: int, tp: int, sharding: str, hsdp: int | None, offload: str,
                          ep: int = 1, cp: int = 1) -> float:
        key = (pp, dp, tp, sharding, hsdp, offload, ep, cp)
        got = self._state_lb.get(key)
        if got is None:
            # at ep > 1 the profile holds 1/ep of the experts and sharded_states divides them by dp
            # again (the estimate: by dp / ep): smaller than the estimate's, so still a bound; at
            # cp > 1 states are sharded over dp x cp (MeshDims.fold_cp)
            prof = self.backend.profile(tp, False, 1, self.modes[-1], ep)
            st = self.state_bytes(prof, sharding, hsdp and hsdp * cp, offload, dp * cp)
            # tied blocks on one rank hold their shared parameters once (cost_models.ranks._tied):
            # the smaller block of a pair bounds the copy the estimate does not count
            tied = sum(min(st[a], st[b]) for a, b in self.graph.tied_blocks)
            got = max((sum(st) - tied) / pp, max(st))
            self._state_lb[key] = got
        return got

    # ------------------------------------------------------------------ partitions
    def partitioner(self, tp: int, sp: bool, mb: int, sharding: str, hsdp: int | None, offload: str, dp: int,
                    ep: int = 1, cp: int = 1) -> Partitioner:
        key = (tp, sp, mb, sharding, hsdp, offload, dp, ep, cp)
        got = self._partitioners.get(key)
        if got is None:
            profs = [self.backend.profile(tp, sp, mb, m, ep, cp) for m in self.modes]
            modes = [ModeCosts(m, pr.time_s, pr.act_bytes) for m, pr in zip(self.modes, profs, strict=True)]
            st = self.state_bytes(profs[0], sharding, hsdp and hsdp * cp, offload, dp * cp)
            got = Partitioner(modes, st, self.ends)
            self._partitioners[key] = got
        return got

    def partition(self, k: Knobs, budget: float) -> Partition | None:
        """Min-max stage partition for the knobs under a per-device budget (cached).

        Fast path: the partition that ignores memory (shared by every sharding and schedule of
        the same tp/sp/mb/stage count) is optimal whenever it fits in its fastest modes."""
        part = self.partitioner(k.tp, k.sequence_parallel, k.micro_batch_size, k.sharding,
                                k.hsdp_shard_size, k.offload, k.dp, k.ep, k.cp)
        inflight = self.backend.inflight(k.schedule, k.pp, k.num_micro_batches, k.virtual_stages)
        per_stage = budget / k.virtual_stages
        key = (k.tp, k.sequence_parallel, k.micro_batch_size, k.sharding, k.hsdp_shard_size,
               k.offload, k.dp, k.ep, k.cp, inflight, per_stage)
        if key in self._partitions:
            return self._partitions[key]
        free = self.free_partition(k)
        got = part.fits(free.stages, inflight, per_stage) if free is not None else None
        if got is None or got.bottleneck_s > free.bottleneck_s * (1 + 1e-12):
            got = part.solve(inflight, per_stage)
        self._partitions[key] = got
        return got

    @staticmethod
    def rank_bottleneck_s(stage_times: tuple[float, ...], pp: int) -> float:
        ranks = [0.0] * pp
        for j, t in enumerate(stage_times):
            ranks[j % pp] += t
        return max(ranks)

    # ------------------------------------------------------------------ scoring
    def score(self, k: Knobs, stages: tuple[tuple[int, int, str], ...]) -> Scored:
        est = self.backend.score(k, [tuple(s) for s in stages])
        peak = float(est.peak_memory_bytes)
        fits = bool(est.fits) and peak <= self.budget_bytes
        return Scored(k, tuple(stages), est, float(est.step_time_s), peak, fits)

    @staticmethod
    def with_recompute(k: Knobs, stages) -> Knobs:
        modes = {s[2] for s in stages}
        recompute = modes.pop() if len(modes) == 1 else "mixed"
        return k if k.recompute == recompute else k.model_copy(update={"recompute": recompute})

    def evaluate(self, k: Knobs, prune: bool = False) -> Scored | str | None:
        """Partition + score one knob point; retries the partition when the model says it overflows.

        Returns the Scored point, or a reason string when no partition fits; with `prune`, None
        when a partition's step-time bound shows the point cannot matter (not scored)."""
        budget = self._first_budget()
        last: Scored | None = None
        for _ in range(3):
            part = self.partition(k, budget)
            if part is None:
                break
            partitioned_knobs = self.with_recompute(k, part.stages)
            if prune and self._beaten(k, self.point_bound(partitioned_knobs, part.stages)):
                return None
            if last is None:
                self.scored += 1  # one configuration, however many partitions it takes
            s = self.score(partitioned_knobs, part.stages)
            self._note_closest(s)
            if s.fits:
                return s
            last = s
            over = s.peak_memory_bytes - self.budget_bytes
            budget -= max(over, 0.02 * self.budget_bytes)
            if budget <= 0:
                break
        if last is not None:
            return (f"{last.peak_memory_bytes / GiB:.1f} GiB > {self.budget_bytes / GiB:.1f} GiB per device "
                    f"(best partition, {last.knobs.recompute} recompute)")
        return f"no stage partition fits {self.budget_bytes / GiB:.1f} GiB per device"

    def _first_budget(self) -> float:
        shrink = getattr(self.backend, "partition_budget_bytes", None)
        return shrink(self.budget_bytes) if shrink else self.budget_bytes

    def _note_closest(self, s: Scored) -> None:
        if self.closest is None or s.peak_memory_bytes < self.closest.peak_memory_bytes:
            self.closest = s

    # ------------------------------------------------------------------ top-k bookkeeping
    def _record(self, s: Scored) -> None:
        self._all.append(s)
        g = s.group
        old = self.best_by_group.get(g)
        if old is None or (s.step_time_s, _order(s.knobs)) < (old.step_time_s, _order(old.knobs)):
            self.best_by_group[g] = s
            self._heap_dirty = True

    def threshold_s(self) -> float:
        """Step time a candidate must beat to matter: the k-th best group's time (inf until k)."""
        if not getattr(self, "_heap_dirty", True):
            return self._threshold
        times = [s.step_time_s for s in self.best_by_group.values() if s.fits]
        k = self.c.top_k + 1  # the winner plus top_k alternatives
        kth = heapq.nsmallest(k, times)[-1] if len(times) >= k else float("inf")
        best = min(times) if times else float("inf")
        self._threshold = min(kth, best * (1 + self.ALTERNATIVES_WINDOW))
        self._heap_dirty = False
        return self._threshold

    # ------------------------------------------------------------------ main loop
    def items(self, meshes) -> list[tuple[float, tuple, str, int]]:
        """(bound, region, schedule, virtual stages) for every region and schedule, best bound first."""
        out = []
        for pp, dp, tp, cp in meshes:
            for ep in self.ep_options(pp, dp, tp) if cp == 1 else [1]:
                for mb, n_mb in self.micro_batches(pp, dp):
                    for sp in self.sp_options(tp):
                        prof = self.backend.profile(tp, sp, mb, self.modes[0], ep, cp)
                        lb0 = self.region_bound(prof, pp, n_mb)
                        region = (pp, dp, tp, mb, n_mb, sp, ep, cp)
                        for sched, v in self.schedules(pp, n_mb):
                            lb = max(lb0, self.schedule_bound(prof, region, sched, v))
                            out.append((lb, region, sched, v))
        out.sort(key=lambda r: (r[0], r[1], r[2], r[3]))
        return out

    @staticmethod
    def region_bound(prof, pp: int, n_mb: int) -> float:
        """Step-time bound of every point of a (mesh, mb, sp) region, whatever its partition,
        schedule, sharding or recompute: num_micro_batches x the busiest rank's time per
        micro-batch, which is at least the average rank's and that of the rank holding the slowest
        block (`prof` in the fastest mode)."""
        return n_mb * max(sum(prof.time_s) / pp, max(prof.time_s))

    def schedule_bound(self, prof, region: tuple, sched: str, v: int) -> float:
        """Step-time bound of a region's schedule from the memory-free min-max partition's stage
        times (fastest mode, no data-parallel or p2p terms): the busiest rank's work for every
        micro-batch and, where the backend simulates the schedule, the warm-up and drain chains
        (cost_models.simulator.pipeline_lower_bound). It bounds that partition, the one the search
        scores first; 0 when there is no such partition."""
        pp, _dp, tp, mb, n_mb, sp, ep, cp = region
        free = self._free(tp, sp, mb, pp * v, ep, cp)
        if free is None:
            return 0.0
        t = free.stage_time_s
        lb = n_mb * self.rank_bottleneck_s(t, pp)
        if pp == 1 or not getattr(self.backend, "simulated_pipeline", False):
            return lb
        split = sched == "zero_bubble"
        if split:
            fwd = prof.forward_s
            if fwd is None:
                return lb
            f = [sum(fwd[a : b + 1]) for a, b, _ in free.stages]
        busy = [0.0] * pp
        for j, x in enumerate(t):
            busy[j % pp] += n_mb * x
        pre = 0.0
        for r in range(pp):
            lb = max(lb, pre + busy[r])
            pre += f[r] if split else t[r]  # F (+ B on the way back) of the stages before rank r
        return lb * (1 - 1e-9)  # prefix sums vs the simulator's order of additions

    def candidates(self, region: tuple, sched: str, v: int) -> Iterator[Knobs]:
        pp, dp, tp, mb, n_mb, sp, ep, cp = region
        for sharding, hsdp, off in self.shardings(dp, pp, tp, ep, cp):
            if knob_problem(sharding=sharding, offload=off, pp=pp, dp=dp, tp=tp,
                            precision=self.train.precision, schedule=sched):
                continue  # e.g. zero_bubble with a resharding FSDP2 (planner.capabilities)
            yield Knobs(
                pp=pp, dp=dp, tp=tp, sharding=sharding, hsdp_shard_size=hsdp, offload=off,
                micro_batch_size=mb, num_micro_batches=n_mb, schedule=sched, virtual_stages=v,
                recompute=self.modes[0] if len(self.modes) == 1 else "none", sequence_parallel=sp, ep=ep, cp=cp,
            )

    def run(self) -> SearchResult:
        # everything alive before the search (the traced graph, imported modules) is moved out of
        # the cyclic collector's reach for its duration: full collections otherwise walk it again
        # and again as the caches grow. And the collector is paused while it runs: scoring makes no
        # reference cycles (what it drops is freed by reference counting; tests/test_planner_search.py
        # checks that a search leaves no cyclic garbage), but every object it caches would be walked
        # by one or two young-generation collections (~10% of the scoring time;
        # benchmarks/cost_bench.py measures both)
        freeze = gc.get_freeze_count() == 0  # a caller's own freeze is left as it is
        enabled = gc.isenabled()
        if freeze:
            gc.freeze()
        gc.disable()
        try:
            return self._run()
        finally:
            if enabled:
                gc.enable()
            if freeze:
                gc.unfreeze()

    def _run(self) -> SearchResult:
        t0 = time.perf_counter()
        meshes = self.meshes()
        items = self.items(meshes)
        for idx, (lb, region, sched, v) in enumerate(items):
            if lb >= self.threshold_s():
                self._prune_rest(items[idx:])
                break
            self._visit(region, sched, v, lb)
        self._refine()
        ranked = sorted(self.best_by_group.values(), key=lambda s: (s.step_time_s, _order(s.knobs)))
        ranked = [s for s in ranked if s.fits]
        if not ranked:
            raise SpecError(self._no_fit_message())
        rejected = list(self._rejected.values())
        return SearchResult(ranked[0], ranked, rejected, self.scored, self.pruned, time.perf_counter() - t0)

    def point_bound(self, k: Knobs, stages) -> float:
        """The backend's bound on one point's step time (no simulation), or 0 when it has none."""
        fn = getattr(self.backend, "lower_bound", None)
        return fn(k, [tuple(s) for s in stages]) * (1 - 1e-9) if fn is not None else 0.0

    def _visit(self, region: tuple, sched: str, v: int, item_lb: float) -> None:
        pp, dp, tp, mb, n_mb, sp, ep, cp = region
        mesh_name = f"pp={pp} dp={dp} tp={tp}" + (f" ep={ep}" if ep > 1 else "") + (f" cp={cp}" if cp > 1 else "")
        for k in self.candidates(region, sched, v):
            lb_state = self.state_lower_bound(pp, dp, tp, k.sharding, k.hsdp_shard_size, k.offload, ep, cp)
            self._note_state(lb_state, k)
            if lb_state > self.budget_bytes:
                zname = k.sharding if k.sharding != "hsdp" else f"hsdp({k.hsdp_shard_size})"
                off = " offload=cpu" if k.offload == "cpu" else ""
                self.reject(
                    f"{mesh_name} {zname}{off}",
                    f"{zname} with pp={pp}, tp={tp}: model states alone need >= {lb_state / GiB:.1f} GiB "
                    f"> {self.budget_bytes / GiB:.1f} GiB per device",
                )
                continue
            # 1) the schedule's bound on the memory-free min-max partition (see schedule_bound)
            free = self.free_partition(k)
            if free is None:
                self.reject(f"pp={pp} v={k.virtual_stages}", f"{pp * k.virtual_stages} stages do not fit "
                            f"the graph's {len(self.ends)} places to end a stage")
                continue
            if self._beaten(k, item_lb):
                self.reject(f"{mesh_name} bound", f"step-time lower bound (busiest rank's compute x "
                            f"micro-batches, pipeline warm-up and drain) is no better than the "
                            f"{self.c.top_k + 1} best found")
                continue
            # 2) score the memory-free partition: if it fits, it is this point's answer; if not,
            #    its step time bounds (heuristically) what recompute or rebalancing can reach.
            #    The backend's exact bound for the point (no simulation) may rule it out first.
            partitioned_knobs = self.with_recompute(k, free.stages)
            if self._beaten(k, self.point_bound(partitioned_knobs, free.stages)):
                self.reject(f"{mesh_name} bound", f"step-time lower bound of its partition (stage times, "
                            f"pipeline warm-up and drain, data-parallel sync) is no better than the "
                            f"{self.c.top_k + 1} best found")
                continue
            s_free = self.score(partitioned_knobs, free.stages)
            self._note_closest(s_free)
            if s_free.fits:
                self.scored += 1
                self._record(s_free)
                continue
            if self._beaten(k, s_free.step_time_s):
                self.reject(f"{mesh_name} bound", f"does not fit without recompute/rebalancing, and "
                            f"even then it is no better than the {self.c.top_k + 1} best found")
                continue
            # 3) memory-aware partition (checkpointing per stage), scored
            got = self.evaluate(k, prune=True)
            if got is None:
                self.reject(f"{mesh_name} bound", f"step-time lower bound of its memory-aware partition "
                            f"is no better than the {self.c.top_k + 1} best found")
            elif isinstance(got, str):
                self.reject(f"{mesh_name} {k.sharding} mb={mb}", got)
            else:
                self._record(got)

    def _beaten(self, k: Knobs, bound_s: float) -> bool:
        """A point whose step time is >= bound_s cannot enter the top-k nor improve its group."""
        if bound_s >= self.threshold_s():
            return True
        old = self.best_by_group.get(group_key(k))
        return old is not None and bound_s >= old.step_time_s

    def free_partition(self, k: Knobs) -> Partition | None:
        """Min-max partition ignoring memory, fastest mode (shared by shardings and schedules)."""
        return self._free(k.tp, k.sequence_parallel, k.micro_batch_size, k.pp * k.virtual_stages, k.ep, k.cp)

    def _free(self, tp: int, sp: bool, mb: int, num: int, ep: int = 1, cp: int = 1) -> Partition | None:
        ukey = (tp, sp, mb, num, ep, cp)
        if ukey not in self._unconstrained:
            # only the mode times matter here; the "none" partitioner has the same ones
            part = self.partitioner(tp, sp, mb, "none", None, "none", 1, ep, cp)
            self._unconstrained[ukey] = part.solve_free(num)
        return self._unconstrained[ukey]

    def _note_state(self, lb: float, k: Knobs) -> None:
        if self.least_state is None or lb < self.least_state[0]:
            self.least_state = (lb, str(k))

    def _prune_rest(self, items) -> None:
        count = 0
        for _, (pp, dp, tp, _mb, _n_mb, _sp, ep, cp), _sched, _v in items:
            count += len(self.shardings(dp, pp, tp, ep, cp))
        if count:
            self.reject(
                "lower bound", f"{count} candidates whose lower bound (busiest rank's compute, pipeline "
                f"warm-up and drain; >= {items[0][0]:.4g} s) is no better than the {self.c.top_k + 1} "
                f"best found ({self.threshold_s():.4g} s)", count,
            )

    # ------------------------------------------------------------------ refinement
    # Alternatives are exact (the true k best groups) within this fraction of the best step time;
    # slower ones are the best found before their bound ruled them out.
    ALTERNATIVES_WINDOW = 0.05
    REFINE_CALLS = 300
    EXHAUSTIVE_PARTITIONS = 64  # refinement scores every partition of a point when there are this few  # cost-model calls the refinement may spend in all

    def _refine(self) -> None:
        """Hill-climb the pipelined groups, best first: move one cut by one slot or one stage's mode
        by one notch (at most REFINE_CALLS scorings in all, so large pipelines stay fast). The
        min-max partition is what the cost model's simulator mostly rewards, not all of it."""
        top = sorted((s for s in self.best_by_group.values() if s.fits and s.knobs.pp > 1),
                     key=lambda s: (s.step_time_s, _order(s.knobs)))
        calls = 0
        for s in top:
            cur = s
            num = len(s.stages)
            n_parts = math.comb(len(self.ends) - 1, num - 1)
            if n_parts <= self.EXHAUSTIVE_PARTITIONS and calls + n_parts <= self.REFINE_CALLS:
                # few partitions: score them all (keeping the stage modes where they still apply)
                for cut in itertools.combinations(range(len(self.ends) - 1), num - 1):
                    bounds = [self.ends[i] for i in cut] + [self.ends[-1]]
                    stages, first = [], 0
                    for j, b in enumerate(bounds):
                        stages.append((first, b, s.stages[j][2]))
                        first = b + 1
                    stages = tuple(stages)
                    cand = self.score(self.with_recompute(s.knobs, stages), stages)
                    calls += 1
                    if cand.fits and cand.step_time_s < cur.step_time_s * (1 - 1e-12):
                        cur = cand
            while calls < self.REFINE_CALLS:
                nxt = None
                for stages in self._neighbours(cur.stages):
                    calls += 1
                    if calls > self.REFINE_CALLS:
                        break
                    k = self.with_recompute(cur.knobs, stages)
                    cand = self.score(k, stages)
                    if cand.fits and cand.step_time_s < cur.step_time_s * (1 - 1e-12) and (
                        nxt is None or cand.step_time_s < nxt.step_time_s
                    ):
                        nxt = cand
                if nxt is None:
                    break
                cur = nxt
            if cur is not s:
                self._record(cur)

    def _neighbours(self, stages):
        slot = {e: i for i, e in enumerate(self.ends)}
        modes = self.modes
        st = list(stages)
        for j in range(len(st) - 1):
            a0, b0, m0 = st[j]
            a1, b1, m1 = st[j + 1]
            i = slot[b0]
            for d in (-1, 1):
                ni = i + d
                if 0 <= ni < len(self.ends):
                    nb = self.ends[ni]
                    if a0 <= nb < b1:
                        new = st.copy()
                        new[j] = (a0, nb, m0)
                        new[j + 1] = (nb + 1, b1, m1)
                        yield tuple(new)
        if len(modes) > 1:
            for j, (a, b, m) in enumerate(st):
                mi = modes.index(m)
                for d in (-1, 1):
                    if 0 <= mi + d < len(modes):
                        new = st.copy()
                        new[j] = (a, b, modes[mi + d])
                        yield tuple(new)

    # ------------------------------------------------------------------ no fit
    def _no_fit_message(self) -> str:
        cap = self.budget_bytes / GiB
        if self.closest is None and self.least_state is None:  # not a memory problem: say so
            reasons = "; ".join(f"{r.region}: {r.reason}" for r in list(self._rejected.values())[:5])
            return (f"no valid configuration on {self.hw}: {reasons or 'the constraints leave no point'}; "
                    f"relax the constraints (pins, max_tp/max_pp) or use other hardware")
        parts = [f"no configuration fits {cap:.1f} GiB per device on {self.hw}"]
        if self.closest is not None:
            c = self.closest
            parts.append(
                f"closest: {c.knobs} needs {c.peak_memory_bytes / GiB:.1f} GiB per device "
                f"(smallest per-device memory any scored plan needs)"
            )
        elif self.least_state is not None:
            parts.append(
                f"smallest per-device memory any plan needs: >= {self.least_state[0] / GiB:.1f} GiB "
                f"for model states alone (closest: {self.least_state[1]})"
            )
        else:
            reasons = "; ".join(f"{r.region}: {r.reason}" for r in list(self._rejected.values())[:5])
            parts.append(f"nothing in the space is valid: {reasons or 'the constraints leave no point'}")
        parts.append("use more devices, allow checkpointing/offload, or relax the constraints")
        return "; ".join(parts)
