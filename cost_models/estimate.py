"""estimate_step / estimate_knobs: one training step of a plan, term by term.

Composition (all per step, for the worst pp rank where ranks differ):

1. Stage times per micro-batch (cost_models.blocks sums): F = forward compute + TP comm
   (+ exposed FSDP all-gathers), B = recompute + input-grad compute + TP comm (+ exposed FSDP
   all-gather/reduce-scatter) (+ weight grads unless the schedule splits them into W), p2p =
   send of the stage's boundary activation over the pp link (cost_models.comm.p2p_link).
2. The pipeline schedule is played by cost_models.simulator with those times: pipeline time,
   per-rank busy time, in-flight micro-batches per stage (-> activation memory).
3. After the last backward, per rank: the data-parallel gradient sync that did not hide behind
   backward, the optimizer step (memory-bound: bytes read+written per parameter, pass by pass as
   torch's foreach optimizer runs it (cost_models.memory.optimizer_step_bytes_per_param), over
   the elementwise memory curve; where the devices are the host CPU (hw.device_is_host_cpu):
   parameters / the measured host.cpu_adam_params_per_s), offload transfers and the host optimizer step. step = pipeline + max over ranks.

What overlaps and what is exposed:
- TP collectives: exposed (on the critical path of every layer).
- pipeline p2p: asynchronous; it delays the receiver. The breakdown charges the idle time of
  the busiest rank first to p2p (up to 2 sends per stage boundary, the warm-up/drain chains)
  and the rest to the bubble.
- DDP (`none`): bucketed (25 MiB) gradient all-reduce overlapping the backward of the LAST
  micro-batch (earlier ones run under no_sync): exposed = max(last bucket, total - that backward).
- ZeRO-1 (the runtime's ZeroRedundancyOptimizer over DDP): the same all-reduce, then each rank
  steps its shard and the updated parameters are all-gathered (exposed).
- ZeRO-2 (the runtime's FSDP2 `fully_shard(reshard_after_forward=False)`): per block and
  micro-batch an all-gather in forward only (prefetched as below), gradients accumulate unsharded
  and are reduce-scattered once, under the last backward (exposed as DDP's).
- ZeRO-3/FSDP: per block and micro-batch an all-gather in forward, again in backward (FSDP2
  reshards after forward) and a reduce-scatter of its gradients; the next block's gather is
  prefetched under the current block's compute: exposed = first gather (+ last reduce-scatter)
  + max(0, comm - compute) of the rest, added to the stage times.
- HSDP: ZeRO-3 within the shard group (inner dp ranks), plus an all-reduce of the sharded
  gradients across replicas overlapping the last backward (as DDP).
- Byte sizes follow cost_models.memory's convention ("torch"): gathers move the bf16 compute
  copies, gradient reductions fp32 gradients, ZeRO-1's parameter gather fp32 parameters.
- offload (cpu): gradients device->host, host optimizer step, parameters host->device over
  PCIe: all exposed (conservative; ZeRO-Offload overlaps part of it).
- `hw.comm_overlaps_compute` false (gloo on CPU: collectives run on the compute cores, from the
  training thread): nothing above hides behind compute; DDP/ZeRO gradient syncs and every FSDP
  gather/reduce-scatter are exposed in full. Pipeline p2p stays asynchronous (a delay of the
  receiver; its bytes are one boundary activation).
- Tied parameters (embedding/head) on different pp ranks: a copy on each, gradients
  all-reduced between them after backward (exposed, pp axis).

The engines' own copies (memory-bound kernels on the compute stream, charged as compute, so on a
shared host they count as CPU work; cost_models.ranks): FSDP2 copies each block's local shard
into the all-gather input and the gathered buffer out into the unsharded parameters at every
gather (forward, and backward under zero3/hsdp) and the unsharded gradients into every
reduce-scatter's input (zero3/hsdp per micro-batch, in backward; zero2 once per step); DDP (and
FSDP2's `replicate`) copies the gradients into its buckets and back once per step. Read + write
of each at the copy curve; in `compute_backward_s` for the once-per-step ones.

DTensor's host time (hw.dtensor_overhead, measured by `autoplan calibrate` on CPU hosts only;
None on GPUs, whose host dispatch runs ahead of the kernels): per tensor-parallel op and
micro-batch in forward and backward (+ a part per output byte), in the block's compute; and per
DTensor op's parameters in the optimizer step (tensor-parallel ops, or every op with parameters
where FSDP2 holds them as DTensor shards).

Shared hosts (hw.shared_cores < processes per node, e.g. gloo on a 2-core CPU): the step is
composed by cost_models.sharedhost from the estimate at per-core speed (the critical path) and
the host's total CPU work over its cores; any excess is the breakdown term `core_sharing_s`.

Speed: the stage times and per-rank terms of a candidate's layout (stage list, mesh, sharding,
micro-batch size) are computed once and shared where candidates agree on them (cost_models.layout
says how); a call adds the simulation (cost_models.simulator, memoised per stage times) and one
pass over the ranks as C-level maps over columns. It returns with the fields a search ranks by
(SCORE_FIELDS: step time, memory peak, fits) set; the breakdowns, throughput and the other fields
are computed from what the call kept, by the same arithmetic, when one of them is first read
(StepEstimate.__getattr__), so candidates that are only compared never pay for them.

Memory per pp rank (cost_models.memory): model states by ZeRO stage, activations = sum over the
rank's virtual stages of (peak in-flight micro-batches x stored bytes per micro-batch), transient
buffers, margin; peak over the step = states + max(activations + backward transients,
optimizer-step temporaries). The worst rank is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from operator import add, mul, sub

from cost_models import sharedhost
from cost_models.blocks import context
from cost_models.compute import compute_dtype, peak_flops_per_s
from cost_models.fastinit import fast_init
from cost_models.layout import _layout_for
from cost_models.memory import (
    FRAGMENTATION_FRACTION,
)
from cost_models.ranks import _post
from cost_models.sharedsim import simulate_shared
from cost_models.simulator import pipeline_lower_bound, simulate_cached
from specs import (
    AxisComm,
    HardwareSpec,
    Knobs,
    ModelGraph,
    Plan,
    Prediction,
    SpecError,
    StageTimes,
    TrainSpec,
)

TIME_TERMS = ("compute_forward_s", "compute_backward_s", "recompute_s", "tp_comm_s", "dp_comm_s", "pp_comm_s",
              "bubble_s", "optimizer_s", "offload_s")
MEMORY_CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "transient", "margin")


@dataclass(frozen=True, slots=True)
class AxisCommEstimate:
    volume_bytes: float  # sent per device per step on this axis
    time_s: float
    exposed_s: float  # part not hidden behind compute


@dataclass(frozen=True, slots=True)
class StepEstimate:
    """One step's prediction. Times in seconds, memory in bytes (worst pp rank unless per rank)."""

    step_time_s: float
    fits: bool
    peak_memory_bytes: float
    memory_capacity_bytes: float
    memory_bytes: dict[str, float]  # worst rank, by category (MEMORY_CATEGORIES)
    memory_per_rank_bytes: tuple[float, ...]  # peak per pp rank
    memory_by_rank_raw: tuple[tuple[float, ...], ...]  # per pp rank, values in MEMORY_CATEGORIES order
    worst_rank: int
    time_breakdown_s: dict[str, float]  # TIME_TERMS; sums to step_time_s
    comm: dict[str, AxisCommEstimate]  # "tp", "dp", "pp"
    bubble_fraction: float
    mfu: float
    hfu: float
    samples_per_s: float
    tokens_per_s: float
    model_flops_per_step: float
    hardware_flops_per_step: float
    stage_times_raw: tuple[tuple[float, float, float, float], ...]  # (F, B, W, p2p) per virtual stage
    peak_in_flight: tuple[int, ...]  # per pp rank
    notes: tuple[str, ...] = ()
    # estimate_knobs sets the fields a search ranks by (SCORE_FIELDS) and keeps here what the
    # others are computed from, on first access to any of them (by the same arithmetic, so the
    # values do not depend on when they are read); None once they are set
    _pending: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __getattr__(self, name: str):
        # reached only for an attribute not found: a field whose slot is still empty
        if name not in _DETAIL_FIELDS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        pending = object.__getattribute__(self, "_pending")
        for n, value in zip(_DETAIL_FIELDS, _details(*pending), strict=True):
            object.__setattr__(self, n, value)
        object.__setattr__(self, "_pending", None)
        return object.__getattribute__(self, name)

    @property
    def memory_by_rank(self) -> list[dict[str, float]]:
        """Peak memory by category for every pp rank."""
        return [dict(zip(MEMORY_CATEGORIES, row, strict=True)) for row in self.memory_by_rank_raw]

    @property
    def stage_times(self) -> list[StageTimes]:
        return [StageTimes.model_construct(forward_s=f, backward_s=b, weight_s=w, p2p_s=c)
                for f, b, w, c in self.stage_times_raw]

    def to_prediction(self) -> Prediction:
        return Prediction(
            step_time_s=self.step_time_s, samples_per_s=self.samples_per_s, tokens_per_s=self.tokens_per_s,
            mfu=self.mfu, hfu=self.hfu, model_flops_per_step=self.model_flops_per_step,
            time_breakdown_s=dict(self.time_breakdown_s), memory_bytes=dict(self.memory_bytes),
            peak_memory_bytes=self.peak_memory_bytes, memory_capacity_bytes=self.memory_capacity_bytes,
            worst_rank_stage=self.worst_rank, memory_per_stage_bytes=list(self.memory_per_rank_bytes),
            comm={k: AxisComm(volume_bytes=c.volume_bytes, time_s=c.time_s, exposed_s=c.exposed_s)
                  for k, c in self.comm.items()},
            bubble_fraction=min(1.0, max(0.0, self.bubble_fraction)),
            stage_times=[StageTimes(forward_s=f, backward_s=b, weight_s=w, p2p_s=c)
                         for f, b, w, c in self.stage_times_raw],
            fits=self.fits, notes=list(self.notes),
        )


# what a search ranks candidates by: set when estimate_knobs returns; the other fields (_DETAIL_FIELDS)
# on first access (StepEstimate.__getattr__)
SCORE_FIELDS = ("step_time_s", "fits", "peak_memory_bytes", "memory_capacity_bytes", "worst_rank")
_DETAIL_FIELDS = ("memory_bytes", "memory_per_rank_bytes", "memory_by_rank_raw", "time_breakdown_s", "comm",
                  "bubble_fraction", "mfu", "hfu", "samples_per_s", "tokens_per_s", "model_flops_per_step",
                  "hardware_flops_per_step", "stage_times_raw", "peak_in_flight", "notes")
# StepEstimate(...) with only the score's fields / AxisCommEstimate(...) (cost_models.fastinit)
_new_scored = fast_init(StepEstimate, only=(*SCORE_FIELDS, "_pending"))
_new_axis = fast_init(AxisCommEstimate)


def step_lower_bound_knobs(graph: ModelGraph, knobs: Knobs, stages: list[tuple[int, int, str]], hw: HardwareSpec,
                           train: TrainSpec) -> float:
    """A lower bound on `estimate_knobs(...).step_time_s`, without simulating the schedule: the
    stage times and post-pipeline terms are the same, the pipeline time is replaced by
    `simulator.pipeline_lower_bound` (step = pipeline + the largest per-rank post term)."""
    if sharedhost.oversubscribed(hw):
        hw = sharedhost.unshared(hw)  # the step is at least the critical path at per-core speed
    ctx = context(graph, hw, train)
    lay, sched = _layout_for(ctx, graph, knobs, stages, hw)
    m = knobs.num_micro_batches
    return pipeline_lower_bound(sched, knobs.pp, m, knobs.virtual_stages, lay.times) + lay.cols.post_max


def estimate_knobs(graph: ModelGraph, knobs: Knobs, stages: list[tuple[int, int, str]], hw: HardwareSpec,
                   train: TrainSpec) -> StepEstimate:
    """Estimate one step without building a Plan (the search's fast path).

    Args:
        graph: the traced model. knobs: the flat plan knobs (pp, dp, tp, sharding, micro-batches,
            schedule, ...). hw, train: machine and training setup; pass the same objects across
            calls to reuse the caches (they are keyed by identity).
        stages: (first_block, last_block, recompute) for each of pp * virtual_stages stages, in
            order; virtual stage j runs on pp rank j % pp (loop style).
    Returns:
        StepEstimate (see the module docstring for the model).
    """
    ctx = context(graph, hw, train)
    if ctx.oversubscribed:
        return _share_cores(graph, knobs, stages, hw, train)
    k = knobs
    pp, v, m = k.pp, k.virtual_stages, k.num_micro_batches
    lay, sched = _layout_for(ctx, graph, k, stages, hw)
    sim = lay.sims.get((sched, m))
    if sim is None:
        sim = lay.sims[(sched, m)] = simulate_cached(sched, pp, m, v, lay.times, lay.times_id)
    capacity = ctx.capacity

    # per rank, as columns (C-level maps; the same operations, in the same order, as
    # acts = sum of peak x stored bytes over the rank's stages, static + max(acts + transient,
    # optimizer temporaries) + margin), chained without lists (the details make them again)
    cols = lay.cols
    peaks = sim.peak_in_flight_per_stage
    dyn = _dynamic(cols, _activations(cols, peaks, pp, v))
    # tensors x = static + dyn, plus margin_bytes(x, capacity) = FRAGMENTATION_FRACTION * x +
    # reserve(capacity), unrolled (tests/test_cost_estimate_fast.py checks it against margin_bytes)
    ff, reserve = FRAGMENTATION_FRACTION, ctx.reserve
    totals = [x + (ff * x + reserve) for x in map(add, cols.static, dyn)]
    # the post-pipeline term does not depend on m: its largest value and rank come with the layout
    step = sim.step_time_s + cols.post_max

    worst = totals.index(max(totals))  # the first rank with the largest peak
    peak_mem = totals[worst]
    return _new_scored(step, peak_mem <= capacity, peak_mem, capacity, worst,
                       (graph, ctx, hw, k, lay, sim, totals, step, worst))


def _activations(cols, peaks, pp: int, v: int):
    """Per rank: the sum over its virtual stages of peak in-flight x stored bytes (an iterator)."""
    acts = map(mul, peaks if v == 1 else peaks[:pp], cols.acts[0])
    for i in range(1, v):
        acts = map(add, acts, map(mul, peaks[i * pp:(i + 1) * pp], cols.acts[i]))
    return acts


def _dynamic(cols, acts):
    """Per rank: max(activations + transient buffers, optimizer temporaries) (an iterator)."""
    if cols.trans_covers_opt:
        return map(add, acts, cols.trans)
    return map(max, map(add, acts, cols.trans), cols.opt_tmp)  # max(x, o): x where equal


def _details(graph: ModelGraph, ctx, hw: HardwareSpec, k: Knobs, lay, sim, totals, step: float, worst: int) -> tuple:
    """estimate_knobs' fields besides the score (_DETAIL_FIELDS order), from its intermediate values."""
    pp, dp, tp = k.pp, k.dp, k.tp
    world = pp * dp * tp
    mb, m = k.micro_batch_size, k.num_micro_batches
    cols = lay.cols
    # the per-rank memory columns, as estimate_knobs computed its totals
    acts = list(_activations(cols, sim.peak_in_flight_per_stage, pp, k.virtual_stages))
    dyn = list(_dynamic(cols, acts))
    margins = [FRAGMENTATION_FRACTION * x + ctx.reserve for x in map(add, cols.static, dyn)]
    T_pipe = sim.step_time_s
    rp = cols.post_rank
    posts_u = [_post(rk, k.sharding, m) for rk in cols.uniq]
    rb = sim.busiest_rank
    R, P = lay.ranks[rb], lay.ranks[rp]
    idle = max(0.0, T_pipe - sim.busy_s[rb])
    # the p2p on the critical path that this rank waits for, at most its own p2p time (the per-axis
    # row is per device: exposed <= time; the rest of the wait is bubble)
    pp_exp = min(idle, lay.crit_p2p, m * R.pp_t)
    dpe, dpt, dpv = cols.kind_of(posts_u)[rp]
    breakdown = {
        "compute_forward_s": m * R.f_c, "compute_backward_s": m * R.b_c + P.step_copy_s, "recompute_s": m * R.rec,
        "tp_comm_s": m * R.tp_s, "dp_comm_s": m * R.fsdp_s + dpe, "pp_comm_s": pp_exp + P.tied,
        "bubble_s": idle - pp_exp, "optimizer_s": P.opt_s, "offload_s": P.offload_s,
    }
    comm_axes = {
        "tp": _new_axis(m * R.tp_vol, m * R.tp_s, m * R.tp_s),
        "dp": _new_axis(dpv, dpt, m * R.fsdp_s + dpe),
        "pp": _new_axis(m * R.pp_vol, m * R.pp_t + P.tied, pp_exp + P.tied),
    }
    W = lay.ranks[worst]
    memory = {"parameters": W.param_b, "gradients": W.grad_b, "optimizer": W.opt_b, "activations": acts[worst],
              "transient": dyn[worst] - acts[worst], "margin": margins[worst]}
    samples = mb * m * dp
    model_flops = ctx.model_flops_per_sample * samples
    hw_flops = lay.flops_per_mb * tp * m * dp
    peak = peak_flops_per_s(hw, ctx.dtype) * world
    inv = 1.0 / step if step > 0 else 0.0
    return (memory, tuple(totals),
            tuple(zip(cols.column("param_b"), cols.column("grad_b"), cols.column("opt_b"), acts, map(sub, dyn, acts),
                      margins, strict=True)),
            breakdown, comm_axes, (idle - pp_exp) * inv, model_flops * inv / peak, hw_flops * inv / peak,
            samples * inv, samples * graph.tokens_per_sample * inv, model_flops, hw_flops, lay.times,
            sim.peak_in_flight, lay.notes)


def _share_cores(graph: ModelGraph, k: Knobs, stages, hw: HardwareSpec, train: TrainSpec) -> StepEstimate:
    """More processes than cores (cost_models.sharedhost): the critical path at per-core speed,
    or the host's CPU work over its cores plus the lockstep communication, whichever is longer."""
    hw_u = sharedhost.unshared(hw)
    e = estimate_knobs(graph, k, stages, hw_u, train)
    lay, _ = _layout_for(context(graph, hw_u, train), graph, k, stages, hw_u)
    m = k.num_micro_batches

    def work(ranks) -> list[float]:
        return [m * (rk.f_c + rk.b_c + rk.rec) + rk.step_copy_s + rk.opt_s + rk.offload_s for rk in ranks]

    if k.pp == 1:
        lockstep = max(0.0, e.step_time_s - work(lay.ranks)[0])
    else:
        lockstep = min(_post(rk, k.sharding, m)[0] + rk.tied for rk in lay.ranks)
    # the CPU work, timed with every core busy (shared caches and memory system)
    hw_c = sharedhost.contended(hw)
    lay_c, sched = _layout_for(context(graph, hw_c, train), graph, k, stages, hw_c)
    if hw.shared_sync_penalty_s > 0:
        lockstep += sharedhost.sync_points(graph, k, stages) * hw.shared_sync_penalty_s
    cores = hw.shared_cores * hw.num_nodes
    if k.pp == 1:
        total = sum(work(lay_c.ranks)) * k.dp * k.tp
        step = sharedhost.shared_step_s(e.step_time_s, total, cores, lockstep)
    else:
        # the schedule played with the cores shared among runnable ranks (cost_models.sharedsim);
        # tensor-parallel collectives stay lockstep time, as with one stage
        tp_comm = m * max(rk.tp_s for rk in lay_c.ranks)
        times = tuple((f - x.tp_forward_s, b - x.tp_backward_s, w, c)
                      for (f, b, w, c), x in zip(lay_c.times, lay_c.stage_sums, strict=True))
        tails = [rk.step_copy_s + rk.opt_s + rk.offload_s for rk in lay_c.ranks]
        shared = simulate_shared(sched, k.pp, m, k.virtual_stages, times, cores / (k.dp * k.tp), tails)
        step = max(e.step_time_s, shared + lockstep + tp_comm)
    wait = step - e.step_time_s
    if wait <= 0:
        breakdown = e.time_breakdown_s
    else:
        breakdown = {**e.time_breakdown_s, "core_sharing_s": wait}
    scale = e.step_time_s / step if step > 0 else 1.0
    # MFU/HFU against the host's real peak: per-core peak x the cores (= the spec's per-process
    # share x processes), as estimate_knobs computes them with `hw`
    peak_ratio = peak_flops_per_s(hw_u, compute_dtype(train.precision)) / peak_flops_per_s(
        hw, compute_dtype(train.precision))
    notes = e.notes + (f"{hw.devices_per_node} processes share {hw.shared_cores} cores: step = max(critical "
                       f"path at per-core speed, CPU work / cores + lockstep comm)",)
    return replace(
        e, step_time_s=step, time_breakdown_s=breakdown, samples_per_s=e.samples_per_s * scale,
        tokens_per_s=e.tokens_per_s * scale, mfu=e.mfu * scale * peak_ratio, hfu=e.hfu * scale * peak_ratio,
        notes=tuple(dict.fromkeys(notes)),
    )


def estimate_step(graph: ModelGraph, plan: Plan, hw: HardwareSpec | None = None,
                  train: TrainSpec | None = None) -> StepEstimate:
    """Estimate one training step of `plan` on `hw` (default: the plan's) for `graph`."""
    hw = hw if hw is not None else plan.hardware
    train = train if train is not None else plan.train
    if plan.model.fingerprint != graph.fingerprint:
        raise SpecError(
            f"plan.model.fingerprint: the plan was made for model {plan.model.name!r} "
            f"({plan.model.fingerprint}), but this graph is {graph.name!r} ({graph.fingerprint}); re-plan"
        )
    stages = [(s.first, s.last, s.recompute) for s in plan.pipeline.stages]
    return estimate_knobs(graph, plan.knobs(), stages, hw, train)
