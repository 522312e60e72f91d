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

Where each term is computed: cost_models.blocks (per block), cost_models.stages (per stage:
the StageTime the simulator plays and what the stage adds to its rank), cost_models.ranks (per
pp rank: memory, data-parallel sync, optimizer), cost_models.simulator (the schedule), this
module (the composition below); cost_models.model.CostModel owns their memos.

Memory per pp rank (cost_models.memory): model states by ZeRO stage, activations = sum over the
rank's virtual stages of (peak in-flight micro-batches x stored bytes per micro-batch), transient
buffers, margin; peak over the step = states + max(activations + backward transients,
optimizer-step temporaries). The worst rank is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from cost_models import sharedhost
from cost_models.compute import compute_dtype, peak_flops_per_s
from cost_models.memory import FRAGMENTATION_FRACTION
from cost_models.sharedsim import simulate_shared
from cost_models.simulator import pipeline_lower_bound
from cost_models.stages import layout
from specs import (
    AxisComm,
    HardwareSpec,
    Knobs,
    ModelGraph,
    Plan,
    Prediction,
    StageTimes,
    TrainSpec,
)

if TYPE_CHECKING:
    from cost_models.model import CostModel
    from cost_models.ranks import RankTerms
    from cost_models.stages import StageBounds

TIME_TERMS = ("compute_forward_s", "compute_backward_s", "recompute_s", "tp_comm_s", "cp_comm_s", "ep_comm_s",
              "dp_comm_s", "pp_comm_s", "bubble_s", "optimizer_s", "offload_s")
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
    comm: dict[str, AxisCommEstimate]  # "tp", "dp", "pp" (and "ep" at ep > 1)
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


# ---------------------------------------------------------------------------- module-level entry points
# (each makes a CostModel for the call; hold a cost_models.CostModel to keep its memos across calls)


def estimate_knobs(graph: ModelGraph, knobs: Knobs, stages: list[tuple[int, int, str]], hw: HardwareSpec,
                   train: TrainSpec) -> StepEstimate:
    """Estimate one step without building a Plan: `CostModel(graph, hw, train).estimate(knobs, stages)`.

    Args:
        graph: the traced model. knobs: the flat plan knobs (pp, dp, tp, sharding, micro-batches,
            schedule, ...). hw, train: machine and training setup.
        stages: (first_block, last_block, recompute) for each of pp * virtual_stages stages, in
            order; virtual stage j runs on pp rank j % pp (loop style).
    """
    from cost_models.model import CostModel

    return CostModel(graph, hw, train).estimate(knobs, stages)


def step_lower_bound_knobs(graph: ModelGraph, knobs: Knobs, stages: list[tuple[int, int, str]], hw: HardwareSpec,
                           train: TrainSpec) -> float:
    """`CostModel(graph, hw, train).lower_bound(knobs, stages)`."""
    from cost_models.model import CostModel

    return CostModel(graph, hw, train).lower_bound(knobs, stages)


def estimate_step(graph: ModelGraph, plan: Plan, hw: HardwareSpec | None = None,
                  train: TrainSpec | None = None) -> StepEstimate:
    """Estimate one training step of `plan` on `hw` (default: the plan's) for `graph`."""
    from cost_models.model import CostModel

    hw = hw if hw is not None else plan.hardware
    train = train if train is not None else plan.train
    return CostModel(graph, hw, train).estimate_plan(plan)


# ---------------------------------------------------------------------------- the composition


def lower_bound(model: CostModel, k: Knobs, stages: Sequence[StageBounds]) -> float:
    """A lower bound on `estimate(model, k, stages).step_time_s`, without simulating the schedule:
    the stage times and post-pipeline terms are the same, the pipeline time is replaced by
    `simulator.pipeline_lower_bound` (step = pipeline + the largest per-rank post term). On a
    shared host the step is at least the critical path at per-core speed."""
    if model.oversubscribed:
        model = model.unshared
    lay = layout(model, k, stages)
    return (pipeline_lower_bound(lay.schedule, k.pp, k.num_micro_batches, k.virtual_stages, lay.times)
            + lay.columns.post_max_s)


def estimate(model: CostModel, k: Knobs, stages: Sequence[StageBounds]) -> StepEstimate:
    """One step of knobs `k` with `stages` (see the module docstring for the composition)."""
    if model.oversubscribed:
        return _share_cores(model, k, stages)
    pp, v, m, dp, tp = k.pp, k.virtual_stages, k.num_micro_batches, k.dp, k.tp
    lay = layout(model, k, stages)
    sim = model.simulate(lay.schedule, pp, m, v, lay.times, lay.times_id)
    cols, ranks = lay.columns, lay.ranks

    # memory per rank: activations = sum over its virtual stages of peak in-flight x stored bytes;
    # peak = static + max(activations + transient, optimizer temporaries) + margin
    peaks = sim.peak_in_flight_per_stage
    acts = [peaks[r] * cols.activation_bytes[0][r] for r in range(pp)]
    for i in range(1, v):
        acts = [a + peaks[i * pp + r] * cols.activation_bytes[i][r] for r, a in enumerate(acts)]
    dyn = [max(a + t, o) for a, t, o in zip(acts, cols.transient_bytes, cols.optimizer_temp_bytes, strict=True)]
    tensors = [s + d for s, d in zip(cols.static_bytes, dyn, strict=True)]
    # the allocator margin (cost_models.memory.margin_bytes): a fraction of the tensors + a reserve
    margins = [FRAGMENTATION_FRACTION * x + model.reserve for x in tensors]
    totals = [x + g for x, g in zip(tensors, margins, strict=True)]
    worst = totals.index(max(totals))  # the first rank with the largest peak
    peak_mem = totals[worst]

    step = sim.step_time_s + cols.post_max_s
    # the breakdown: per-micro-batch terms of the busiest rank (it sets the pipeline), the
    # post-pipeline terms of the rank with the largest of them (it sets the tail)
    busiest = ranks[sim.busiest_rank]
    tail = ranks[cols.post_rank]
    idle = max(0.0, sim.step_time_s - sim.busy_s[sim.busiest_rank])
    # the p2p on the critical path that this rank waits for, at most its own p2p time (the per-axis
    # row is per device: exposed <= time; the rest of the wait is bubble)
    pp_exposed = min(idle, lay.critical_p2p_s, m * busiest.pp_time_s)
    sync = tail.sync(k.sharding, m)
    breakdown = {
        "compute_forward_s": m * busiest.forward_compute_s,
        "compute_backward_s": m * busiest.backward_compute_s + tail.step_copy_s,
        "recompute_s": m * busiest.recompute_s,
        "tp_comm_s": m * busiest.tp_comm_s,
        "cp_comm_s": m * busiest.cp_comm_s,
        "ep_comm_s": m * busiest.ep_comm_s,
        "dp_comm_s": m * busiest.fsdp_exposed_s + sync.exposed_s,
        "pp_comm_s": pp_exposed + tail.tied_comm_s,
        "bubble_s": idle - pp_exposed,
        "optimizer_s": tail.optimizer_s,
        "offload_s": tail.offload_s,
    }
    comm_axes = {
        "tp": AxisCommEstimate(m * busiest.tp_volume_bytes, m * busiest.tp_comm_s, m * busiest.tp_comm_s),
        "dp": AxisCommEstimate(sync.volume_bytes, sync.time_s, m * busiest.fsdp_exposed_s + sync.exposed_s),
        "pp": AxisCommEstimate(m * busiest.pp_volume_bytes, m * busiest.pp_time_s + tail.tied_comm_s,
                               pp_exposed + tail.tied_comm_s),
    }
    if k.cp > 1:
        comm_axes["cp"] = AxisCommEstimate(m * busiest.cp_volume_bytes, m * busiest.cp_comm_s, m * busiest.cp_comm_s)
    if k.ep > 1:
        comm_axes["ep"] = AxisCommEstimate(m * busiest.ep_volume_bytes, m * busiest.ep_comm_s, m * busiest.ep_comm_s)
    by_rank = tuple((rk.param_bytes, rk.grad_bytes, rk.optimizer_bytes, a, d - a, g)
                    for rk, a, d, g in zip(ranks, acts, dyn, margins, strict=True))
    samples = k.micro_batch_size * m * dp
    model_flops = model.model_flops_per_sample * samples
    hw_flops = lay.flops_per_micro_batch * tp * k.cp * m * dp
    peak = peak_flops_per_s(model.hw, model.dtype) * (pp * dp * k.cp * tp)
    inv = 1.0 / step if step > 0 else 0.0
    return StepEstimate(
        step_time_s=step, fits=peak_mem <= model.capacity, peak_memory_bytes=peak_mem,
        memory_capacity_bytes=model.capacity, memory_bytes=dict(zip(MEMORY_CATEGORIES, by_rank[worst], strict=True)),
        memory_per_rank_bytes=tuple(totals), memory_by_rank_raw=by_rank, worst_rank=worst,
        time_breakdown_s=breakdown, comm=comm_axes, bubble_fraction=(idle - pp_exposed) * inv,
        mfu=model_flops * inv / peak, hfu=hw_flops * inv / peak, samples_per_s=samples * inv,
        tokens_per_s=samples * model.graph.tokens_per_sample * inv, model_flops_per_step=model_flops,
        hardware_flops_per_step=hw_flops, stage_times_raw=tuple((f, b, w, c) for f, b, w, c in lay.times),
        peak_in_flight=sim.peak_in_flight, notes=lay.notes,
    )


def _share_cores(model: CostModel, k: Knobs, stages: Sequence[StageBounds]) -> StepEstimate:
    """More processes than cores (cost_models.sharedhost): the critical path at per-core speed,
    or the host's CPU work over its cores plus the lockstep communication, whichever is longer."""
    hw = model.hw
    unshared = model.unshared
    e = estimate(unshared, k, stages)
    lay = layout(unshared, k, stages)
    m = k.num_micro_batches

    def work(ranks: Sequence[RankTerms]) -> list[float]:
        return [m * (rk.forward_compute_s + rk.backward_compute_s + rk.recompute_s) + rk.step_copy_s
                + rk.optimizer_s + rk.offload_s for rk in ranks]

    if k.pp == 1:
        lockstep = max(0.0, e.step_time_s - work(lay.ranks)[0])
    else:
        lockstep = min(rk.sync(k.sharding, m).exposed_s + rk.tied_comm_s for rk in lay.ranks)
    # the CPU work, timed with every core busy (shared caches and memory system)
    lay_c = layout(model.contended, k, stages)
    if hw.shared_sync_penalty_s > 0:
        lockstep += sharedhost.sync_points(model.graph, k, stages) * hw.shared_sync_penalty_s
    assert hw.shared_cores is not None  # model.oversubscribed: the cores are shared
    cores = hw.shared_cores * hw.num_nodes
    if k.pp == 1:
        total = sum(work(lay_c.ranks)) * k.dp * k.tp
        step = sharedhost.shared_step_s(e.step_time_s, total, cores, lockstep)
    else:
        # the schedule played with the cores shared among runnable ranks (cost_models.sharedsim);
        # tensor-parallel collectives stay lockstep time, as with one stage
        tp_comm = m * max(rk.tp_comm_s for rk in lay_c.ranks)
        times = tuple((f - x.tp_forward_s, b - x.tp_backward_s, w, c)
                      for (f, b, w, c), x in zip(lay_c.times, lay_c.stage_sums, strict=True))
        tails = [rk.step_copy_s + rk.optimizer_s + rk.offload_s for rk in lay_c.ranks]
        shared = simulate_shared(lay_c.schedule, k.pp, m, k.virtual_stages, times, cores / (k.dp * k.tp), tails)
        step = max(e.step_time_s, shared + lockstep + tp_comm)
    wait = step - e.step_time_s
    if wait <= 0:
        breakdown = e.time_breakdown_s
    else:
        breakdown = {**e.time_breakdown_s, "core_sharing_s": wait}
    scale = e.step_time_s / step if step > 0 else 1.0
    # MFU/HFU against the host's real peak: per-core peak x the cores (= the spec's per-process
    # share x processes), as the estimate computes them with `hw`
    peak_ratio = peak_flops_per_s(unshared.hw, compute_dtype(model.train.precision)) / peak_flops_per_s(
        hw, compute_dtype(model.train.precision))
    notes = e.notes + (f"{hw.devices_per_node} processes share {hw.shared_cores} cores: step = max(critical "
                       f"path at per-core speed, CPU work / cores + lockstep comm)",)
    return replace(
        e, step_time_s=step, time_breakdown_s=breakdown, samples_per_s=e.samples_per_s * scale,
        tokens_per_s=e.tokens_per_s * scale, mfu=e.mfu * scale * peak_ratio, hfu=e.hfu * scale * peak_ratio,
        notes=tuple(dict.fromkeys(notes)),
    )
