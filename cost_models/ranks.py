"""Rank terms: what one pp rank holds and does besides its stages' times.

Per pp rank r (its virtual stages r, r + pp, ...; cost_models.stages gives their StageTerms):

- memory (cost_models.memory): model states sharded by the ZeRO stage (`sharded_states`),
  activations per in-flight micro-batch of each stage (the simulation gives the counts), the
  transient buffers of the engine that runs (`transient_bytes`: DDP's bucket copies, FSDP2's
  unsharded blocks and gradients, autocast's weight copies, pipeline buffers, the loss head's
  logits, the recompute working set) and the optimizer step's temporaries;
- after the pipeline (`DataParallelTerms`, from the rank's parameter count and the data-parallel
  setting): the gradient sync that did not hide behind the last backward (DDP / ZeRO-1 bucketed
  all-reduce and ZeRO-1's parameter gather; ZeRO-2's one reduce-scatter; HSDP's replica
  all-reduce), the optimizer step, offload transfers, the engines' once-per-step copies, and
  tied parameters' gradient all-reduce across pp ranks;
- per micro-batch, the breakdown sums of its stages (compute, recompute, TP, EP, FSDP, p2p).

With expert parallelism the rank's parameters are two groups with two data parallelisms: the
experts' (1/ep of them held, copies on the dp / ep ranks of "expert_dp") and the rest (over all dp
ranks). Each gets its DataParallelTerms, on its own mesh (`MeshDims.experts()` for the experts),
and the rank's are their sum (`DataParallelTerms.plus`).

`RankTerms` holds all of it by name; ranks alike (the same stages by composition, the same tied
parameters; the last rank apart) share one object. `RankColumns` lays the terms out per rank for
the estimate's pass over ranks, with the largest post-pipeline term (it does not depend on the
micro-batch count). Memoised per (stage list, stage terms, data-parallel setting) in the
CostModel's stage memo.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from cost_models import comm
from cost_models.compute import copies_time_s, itemsize
from cost_models.efficiency import memory_efficiency
from cost_models.engines import ALL_REDUCE_ENGINES, FSDP2_ENGINES, data_parallel_engine
from cost_models.memory import (
    DDP_BUCKET_BYTES,
    StateBytes,
    optimizer_step_bytes_per_param,
    sharded_states,
)
from specs import Knobs, MeshDims

if TYPE_CHECKING:
    from cost_models.model import CostModel
    from cost_models.stages import StageBounds, StageList, StageTerms


class DataParallelSync(NamedTuple):
    """A rank's data-parallel traffic in one step."""

    exposed_s: float  # on the critical path (FSDP's exposed gathers are in the stage times)
    time_s: float  # all of it, hidden or not
    volume_bytes: float  # sent per device


@dataclass(frozen=True, slots=True)
class DataParallelTerms:
    """The terms of a rank that depend only on its parameter count and the data-parallel setting."""

    states: StateBytes  # parameters, gradients, optimizer states held
    optimizer_params: float  # parameters this rank's optimizer steps
    all_reduce_s: float  # bucketed gradient all-reduce, total (DDP, ZeRO-1, HSDP replicas)
    all_reduce_last_bucket_s: float  # ... its last bucket (cannot hide)
    param_gather_s: float  # ZeRO-1: the updated parameters' all-gather (exposed)
    reduce_scatter_s: float  # ZeRO-2: the one bucketed reduce-scatter, total
    reduce_scatter_last_bucket_s: float
    fsdp_volume_per_micro_batch: float  # bytes of FSDP gathers / reduce-scatters per micro-batch
    step_volume_bytes: float  # bytes of the once-per-step sync
    optimizer_s: float  # the optimizer step on the device (or the host CPU when it computes)
    offload_s: float  # cpu offload: gradients out, host step, parameters back (exposed)
    all_reduce_exposes: bool  # a bucketed all-reduce runs under the last backward
    step_copy_s: float  # the engines' gradient copies once per step (DDP buckets, ZeRO-2's input)

    def plus(self, other: DataParallelTerms) -> DataParallelTerms:
        """Two parameter groups synchronised one after the other (expert parallelism's experts and
        the rest): states, times and volumes add; the last bucket is the later group's."""
        s, o = self.states, other.states
        return DataParallelTerms(
            states=StateBytes(s.param + o.param, s.grad + o.grad, s.optimizer + o.optimizer),
            optimizer_params=self.optimizer_params + other.optimizer_params,
            all_reduce_s=self.all_reduce_s + other.all_reduce_s,
            all_reduce_last_bucket_s=other.all_reduce_last_bucket_s or self.all_reduce_last_bucket_s,
            param_gather_s=self.param_gather_s + other.param_gather_s,
            reduce_scatter_s=self.reduce_scatter_s + other.reduce_scatter_s,
            reduce_scatter_last_bucket_s=other.reduce_scatter_last_bucket_s or self.reduce_scatter_last_bucket_s,
            fsdp_volume_per_micro_batch=self.fsdp_volume_per_micro_batch + other.fsdp_volume_per_micro_batch,
            step_volume_bytes=self.step_volume_bytes + other.step_volume_bytes,
            optimizer_s=self.optimizer_s + other.optimizer_s,
            offload_s=self.offload_s + other.offload_s,
            all_reduce_exposes=self.all_reduce_exposes or other.all_reduce_exposes,
            step_copy_s=self.step_copy_s + other.step_copy_s,
        )


@dataclass(frozen=True, slots=True)
class RankTerms:
    """One pp rank: memory in bytes, times in seconds (per step unless "per micro-batch")."""

    activation_bytes: tuple[float, ...]  # stored per micro-batch, per virtual stage of this rank
    param_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    transient_bytes: float  # buffers besides activations while the pipeline runs
    optimizer_temp_bytes: float  # the optimizer step's temporaries
    data_parallel: DataParallelTerms
    backward_window_s: float  # backward of one micro-batch: what the gradient sync hides behind
    fsdp_time_per_micro_batch_s: float  # FSDP collective time (FSDP2 engine only)
    tied_comm_s: float  # tied parameters' gradient all-reduce across pp ranks (exposed)
    optimizer_s: float  # with DTensor's host time per parameter where it applies
    # per micro-batch, summed over the rank's stages (the breakdown's rows)
    forward_compute_s: float
    backward_compute_s: float
    recompute_s: float
    tp_comm_s: float
    tp_volume_bytes: float
    ep_comm_s: float
    ep_volume_bytes: float
    cp_comm_s: float
    cp_volume_bytes: float
    fsdp_exposed_s: float
    pp_volume_bytes: float
    pp_time_s: float

    @property
    def static_bytes(self) -> float:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def offload_s(self) -> float:
        return self.data_parallel.offload_s

    @property
    def step_copy_s(self) -> float:
        return self.data_parallel.step_copy_s

    def sync(self, sharding: str, m: int) -> DataParallelSync:
        """The rank's data-parallel traffic for m micro-batches (see the module docstring)."""
        d = self.data_parallel
        if sharding == "zero2":
            exposed = (max(d.reduce_scatter_last_bucket_s, d.reduce_scatter_s - self.backward_window_s)
                       if d.reduce_scatter_s else 0.0)
            return DataParallelSync(exposed, m * self.fsdp_time_per_micro_batch_s + d.reduce_scatter_s,
                                    m * d.fsdp_volume_per_micro_batch + d.step_volume_bytes)
        exposed, time = 0.0, 0.0
        if d.all_reduce_exposes:  # a bucketed all-reduce under the last backward (DDP, ZeRO-1, HSDP replicas)
            exposed = max(d.all_reduce_last_bucket_s, d.all_reduce_s - self.backward_window_s)
            time = d.all_reduce_s
            if sharding == "zero1":  # then the updated parameters are gathered (exposed)
                exposed, time = exposed + d.param_gather_s, time + d.param_gather_s
        if sharding in ("zero3", "hsdp"):
            return DataParallelSync(exposed, m * self.fsdp_time_per_micro_batch_s + time,
                                    m * d.fsdp_volume_per_micro_batch + d.step_volume_bytes)
        return DataParallelSync(exposed, time, d.step_volume_bytes)

    def post_pipeline_s(self, sharding: str) -> float:
        """What the rank does after its last action: exposed sync, tied all-reduce, copies,
        optimizer, offload (independent of the micro-batch count)."""
        return self.sync(sharding, 1).exposed_s + self.tied_comm_s + self.step_copy_s + self.optimizer_s + self.offload_s


@dataclass(frozen=True, slots=True)
class RankColumns:
    """The rank terms per pp rank, for the estimate's pass over ranks."""

    static_bytes: tuple[float, ...]  # parameters + gradients + optimizer states
    transient_bytes: tuple[float, ...]
    optimizer_temp_bytes: tuple[float, ...]
    activation_bytes: tuple[tuple[float, ...], ...]  # [i][r]: virtual stage i of rank r, per micro-batch
    post_max_s: float  # the largest post-pipeline term ...
    post_rank: int  # ... and the first rank that has it


def rank_terms(model: CostModel, k: Knobs, mesh: MeshDims, stages: tuple[StageBounds, ...],
               per_stage: tuple[StageTerms, ...], partition_sums: StageList,
               ) -> tuple[tuple[RankTerms, ...], RankColumns, tuple[str, ...]]:
    """(RankTerms per pp rank, as columns, notes) of a layout (cost_models.stages.layout) whose stage
    list is `partition_sums`."""
    accum = k.num_micro_batches > 1
    key = ("ranks", partition_sums.uid, tuple(s.uid for s in per_stage), mesh, k.sharding, k.offload, accum)
    got: tuple[tuple[RankTerms, ...], RankColumns, tuple[str, ...]] | None = model.stage_memo.get(key)
    if got is not None:
        return got
    kinds = _rank_kinds(model, stages, mesh, partition_sums.pattern)
    per_kind = [_rank(model, k, mesh, [per_stage[j] for j in kinds.stages[r]], kinds.tied_params[r],
                      kinds.tied_comm[r], kinds.holds_head[r], accum) for r in kinds.first_rank]
    posts = [rk.post_pipeline_s(k.sharding) for rk in per_kind]
    top = max(posts)
    ranks = tuple(per_kind[i] for i in kinds.kind_of_rank)
    columns = RankColumns(
        static_bytes=tuple(rk.static_bytes for rk in ranks),
        transient_bytes=tuple(rk.transient_bytes for rk in ranks),
        optimizer_temp_bytes=tuple(rk.optimizer_temp_bytes for rk in ranks),
        activation_bytes=tuple(tuple(rk.activation_bytes[i] for rk in ranks) for i in range(k.virtual_stages)),
        post_max_s=top, post_rank=kinds.first_rank[posts.index(top)],  # the first rank that has it
    )
    got = model.stage_memo[key] = (ranks, columns, kinds.notes)
    return got


@dataclass(frozen=True, slots=True)
class RankKinds:
    """Which pp ranks are alike in a stage partition (the same stages by composition, the same
    tied parameters and sends; the last rank apart): any rank of a kind gives its terms, in every
    setting of the partition."""

    stages: tuple[tuple[int, ...], ...]  # per rank: its virtual stages (loop style: stage j on rank j % pp)
    tied_params: tuple[float, ...]  # per rank: tied parameters it holds a copy of (counted once)
    tied_comm: tuple[float, ...]  # per rank: its tied gradients' all-reduce time
    holds_head: tuple[bool, ...]  # per rank: runs the last stage
    kind_of_rank: tuple[int, ...]  # per rank: its kind
    first_rank: tuple[int, ...]  # per kind: its first rank
    notes: tuple[str, ...]


def _rank_kinds(model: CostModel, stages: tuple[StageBounds, ...], mesh: MeshDims,
                pattern: tuple[int, ...]) -> RankKinds:
    key = ("rank kinds", stages, mesh.tp, mesh.stride("pp"), mesh.pp)
    got: RankKinds | None = model.stage_memo.get(key)
    if got is not None:
        return got
    pp, S = mesh.pp, len(stages)
    tied_params, tied_comm, notes = _tied(model, stages, mesh)
    rank_stages = tuple(tuple(range(r, S, pp)) for r in range(pp))
    # a kind: (its stages' pattern entries, tied parameters, tied gradients' time, is the last rank)
    kind_index: dict[tuple[tuple[int, ...], float, float, bool], int] = {}
    kind_of_rank: list[int] = []
    first_rank: list[int] = []
    for r in range(pp):
        kind = (tuple(pattern[j] for j in rank_stages[r]), tied_params[r], tied_comm[r], r == pp - 1)
        i = kind_index.get(kind)
        if i is None:
            i = kind_index[kind] = len(first_rank)
            first_rank.append(r)
        kind_of_rank.append(i)
    got = model.stage_memo[key] = RankKinds(rank_stages, tuple(tied_params), tuple(tied_comm),
                                            tuple(S - 1 in js for js in rank_stages), tuple(kind_of_rank),
                                            tuple(first_rank), notes)
    return got


def _rank(model: CostModel, k: Knobs, mesh: MeshDims, mine: list[StageTerms], tied_params: float,
          tied_comm: float, holds_head: bool, accum: bool) -> RankTerms:
    """The RankTerms of a rank running the stages `mine` (see the module docstring)."""
    hw = model.hw
    sharding = k.sharding
    # the rank's per-micro-batch sums over its stages, in stage order
    num_params = forward_c = backward_c = recompute = tp_s = tp_v = fsdp_s = fsdp_t = window = 0.0
    expert_params = ep_s = ep_v = cp_s = cp_v = 0.0
    pp_v = pp_t = 0.0
    biggest_block = output_max = recomputed = -1.0
    for st in mine:
        ss = st.sums
        num_params += ss.num_params
        biggest_block = max(biggest_block, ss.max_block_params)
        output_max = max(output_max, ss.output_bytes)
        forward_c += st.forward_compute_s
        backward_c += st.backward_compute_s
        recompute += ss.recompute_s
        tp_s += st.tp_comm_s
        tp_v += ss.tp_volume_bytes
        expert_params += ss.expert_params
        ep_s += st.ep_comm_s
        ep_v += ss.ep_volume_bytes
        cp_s += st.cp_comm_s
        cp_v += ss.cp_volume_bytes
        fsdp_s += st.fsdp_exposed_s
        fsdp_t += st.fsdp_time_s
        window += st.backward_window_s
        pp_v += st.pp_volume_bytes
        pp_t += st.pp_time_s
        recomputed = max(recomputed, st.recompute_working_bytes)
    num_params -= tied_params
    cp = k.cp
    if cp > 1:  # data parallelism sees the cp ranks of a replica as more data-parallel ranks
        mesh, k = mesh.fold_cp(), k.model_copy(update={"dp": k.dp * cp, "cp": 1})
    shard_n = mesh.dp_shard if sharding == "hsdp" else mesh.dp
    dkey = ("dp", num_params, expert_params, mesh, sharding, k.offload)
    dp_terms: DataParallelTerms | None = model.stage_memo.get(dkey)
    if dp_terms is None:
        if expert_params > 0 and mesh.ep > 1:  # two groups (module docstring)
            experts = mesh.experts()
            k_experts = k.model_copy(update={"dp": experts.dp, "tp": experts.tp, "ep": 1})
            dp_terms = data_parallel_terms(model, num_params - expert_params, k, mesh).plus(
                data_parallel_terms(model, expert_params, k_experts, experts))
        else:
            dp_terms = data_parallel_terms(model, num_params, k, mesh)
        model.stage_memo[dkey] = dp_terms
    engine = data_parallel_engine(k)  # what the runtime runs (cost_models.engines)
    optimizer_s = dp_terms.optimizer_s
    if hw.device_is_host_cpu and hw.dtensor_overhead is not None:
        # the optimizer's host time per DTensor parameter (specs.DTensorOverhead): the
        # tensor-parallel ops' parameters, or all of them where FSDP2 holds them (its shards
        # are DTensors: zero2 / zero3 / hsdp, and `replicate` for dp with tp or pp)
        fsdp2 = engine in FSDP2_ENGINES
        n_dtensor = sum(st.sums.param_ops if fsdp2 else st.sums.tp_param_ops for st in mine)
        optimizer_s += n_dtensor * hw.dtensor_overhead.optimizer_s
    transient = transient_bytes(model, k, engine, num_params, biggest_block, shard_n, accum)
    if mesh.pp > 1:
        transient += 4 * output_max  # pipeline send/receive buffers
    if holds_head:
        last_split = model.last_splittable and mesh.tp > 1
        transient += model.final_output_bytes * k.micro_batch_size * (1 + 2 * 4 / model.act_isz) / (
            (mesh.tp if last_split else 1) * cp)  # the logits, their fp32 upcast and softmax for the loss
    if recomputed >= 0:
        transient += recomputed
    offload = k.offload if engine == "fully_shard" else "none"  # the runtime offloads through FSDP2 only
    adam_temps = model.train.optimizer in ("adam", "adamw") and offload == "none"
    return RankTerms(
        activation_bytes=tuple(st.sums.activation_bytes for st in mine),
        param_bytes=dp_terms.states.param, grad_bytes=dp_terms.states.grad, optimizer_bytes=dp_terms.states.optimizer,
        transient_bytes=transient, optimizer_temp_bytes=4 * dp_terms.optimizer_params if adam_temps else 0.0,
        data_parallel=dp_terms,
        backward_window_s=window if hw.comm_overlaps_compute else 0.0,  # none where comm shares the cores
        fsdp_time_per_micro_batch_s=fsdp_t if engine == "fully_shard" else 0.0,
        tied_comm_s=tied_comm, optimizer_s=optimizer_s,
        forward_compute_s=forward_c, backward_compute_s=backward_c, recompute_s=recompute, tp_comm_s=tp_s,
        tp_volume_bytes=tp_v, ep_comm_s=ep_s, ep_volume_bytes=ep_v, cp_comm_s=cp_s, cp_volume_bytes=cp_v,
        fsdp_exposed_s=fsdp_s, pp_volume_bytes=pp_v,
        pp_time_s=pp_t,
    )


def transient_bytes(model: CostModel, k: Knobs, engine: str, num_params: float, biggest_block: float,
                    shard_n: int, accum: bool) -> float:
    """The data-parallel engine's buffers on a rank holding `num_params` parameters (its largest
    block `biggest_block`) while the pipeline runs."""
    bpp, sharding = model.bpp, k.sharding
    trans = 0.0
    if engine in ALL_REDUCE_ENGINES:
        # DDP's bucket copies of the gradients (FSDP2's replicate: its all-reduce input, alike)
        trans += num_params * bpp.grad
        trans += num_params * bpp.working  # autocast's bf16 weight copies, saved for backward
    elif engine == "none":  # dp = 1: no wrapper, no gradient sync, whatever the sharding
        trans += num_params * bpp.working
    elif sharding == "zero2" or k.pp > 1:
        # FSDP2 without resharding: every local block stays unsharded from forward to backward,
        # and gradients accumulate unsharded until the last micro-batch syncs. Inside a pipeline
        # zero3/hsdp too: torch's stages keep every block unsharded after each backward but the
        # last and turn gradient sync off until then (set_reshard_after_backward(False),
        # set_requires_gradient_sync(False): torch/distributed/pipelining/stage.py
        # backward_maybe_with_nosync); measured on gpt-tiny pp2 x dp2 zero3 (4 gloo processes):
        # 8-12 of 18 block forwards found their parameters still unsharded from a backward
        trans += num_params * bpp.compute + biggest_block * bpp.grad
        if accum:
            trans += num_params * bpp.grad
        if sharding == "hsdp":
            trans += num_params * bpp.grad / shard_n  # replica all-reduce buckets
    else:  # zero3 / hsdp: two blocks unsharded (current + prefetched), one block's gradients
        trans += biggest_block * (2 * bpp.compute + bpp.grad)
        if sharding == "hsdp":
            trans += num_params * bpp.grad / shard_n  # replica all-reduce buckets
    return trans


def _tied(model: CostModel, stages: tuple[StageBounds, ...], mesh: MeshDims,
          ) -> tuple[list[float], list[float], tuple[str, ...]]:
    """(tied parameters held per pp rank, their gradient all-reduce time per rank, notes) for the
    stage partition `stages`."""
    graph = model.graph
    pp, tp = mesh.pp, mesh.tp
    notes: list[str] = []
    tied_rank_params = [0.0] * pp
    tied_comm = [0.0] * pp
    if graph.tied_blocks and graph.tied_param_bytes > 0:
        firsts = [first for first, _last, _recompute in stages]
        tied_params = graph.tied_param_bytes / itemsize(graph.param_dtype)
        for a, b in graph.tied_blocks:
            ra, rb = (bisect_right(firsts, a) - 1) % pp, (bisect_right(firsts, b) - 1) % pp
            tsplit = model.split_fraction[graph.blocks[a].layer_type] if tp > 1 else 0.0
            local = tied_params * ((1 - tsplit) + tsplit / tp)
            if ra == rb:
                tied_rank_params[ra] += local
            else:
                t = 2 * comm.p2p_s(local * model.bpp.grad, model.p2p_link(mesh.stride("pp")))
                tied_comm[ra] = max(tied_comm[ra], t)
                tied_comm[rb] = max(tied_comm[rb], t)
                notes.append("tied parameters on different pp ranks: a copy on each, gradients all-reduced")
    return tied_rank_params, tied_comm, tuple(notes)


def data_parallel_terms(model: CostModel, n_params: float, k: Knobs, mesh: MeshDims) -> DataParallelTerms:
    """The DataParallelTerms of a rank holding `n_params` parameters (see the class)."""
    hw, bpp = model.hw, model.bpp
    dp, sharding = mesh.dp, k.sharding
    shard_n = mesh.dp_shard if sharding == "hsdp" else dp
    engine = data_parallel_engine(k)
    # the runtime offloads through FSDP2 only: at dp = 1 (no engine) nothing leaves the device
    offload = k.offload if engine == "fully_shard" else "none"
    states = sharded_states(n_params, bpp, sharding=sharding, dp=dp, hsdp_shard_size=shard_n, offload=offload)
    optimizer_shards = {"zero1": dp, "zero2": dp, "zero3": dp, "hsdp": shard_n}.get(sharding, 1)
    optimizer_params = n_params / optimizer_shards
    grad_bytes = n_params * bpp.grad
    all_reduce = last = gather = reduce_scatter_total = reduce_scatter_last = step_volume = fsdp_volume = 0.0
    exposes = False
    if dp > 1:
        dp_link = model.link(mesh, "dp")
        if sharding == "none":
            all_reduce, last = comm.bucketed_all_reduce_s(grad_bytes, dp_link, DDP_BUCKET_BYTES)
            step_volume = comm.all_reduce_volume_bytes(grad_bytes, dp)
            exposes = True
        elif sharding == "zero1":
            # ZeroRedundancyOptimizer over DDP: bucketed all-reduce under the last backward,
            # then each rank steps its shard and the updated parameters are gathered (exposed)
            all_reduce, last = comm.bucketed_all_reduce_s(grad_bytes, dp_link, DDP_BUCKET_BYTES)
            gather = comm.all_gather_s(n_params * bpp.param, dp_link)
            step_volume = comm.all_reduce_volume_bytes(grad_bytes, dp) + comm.all_gather_volume_bytes(
                n_params * bpp.param, dp)
            exposes = True
        elif sharding == "zero2":
            # FSDP2, no resharding: gathers in each forward (in the stage times), one
            # reduce-scatter of the accumulated gradients under the last backward
            reduce_scatter_total, reduce_scatter_last = comm.bucketed_reduce_scatter_s(grad_bytes, dp_link, DDP_BUCKET_BYTES)
            fsdp_volume = comm.all_gather_volume_bytes(n_params * bpp.compute, dp)
            step_volume = comm.all_gather_volume_bytes(grad_bytes, dp)
        else:
            fsdp_volume = (2 * comm.all_gather_volume_bytes(n_params * bpp.compute, shard_n)
                        + comm.all_gather_volume_bytes(grad_bytes, shard_n))
            if sharding == "hsdp" and mesh.dp_replicate > 1:
                rep_link = model.link(mesh, "dp_replicate")
                all_reduce, last = comm.bucketed_all_reduce_s(grad_bytes / shard_n, rep_link, DDP_BUCKET_BYTES)
                step_volume = comm.all_reduce_volume_bytes(grad_bytes / shard_n, mesh.dp_replicate)
                exposes = True
    optimizer_time_s = offload_time_s = 0.0
    if offload == "cpu":
        pcie = hw.host.pcie_bandwidth_bytes_per_s
        offload_time_s = optimizer_params * (bpp.grad + bpp.param) / pcie + optimizer_params / hw.host.cpu_adam_params_per_s
    elif hw.device_is_host_cpu:
        if optimizer_params > 0:
            step_bpp = optimizer_step_bytes_per_param(bpp, model.train.optimizer)
            # the measured AdamW rate, scaled to this optimizer by its bytes per parameter
            # (host.cpu_adam_params_per_s is a foreach AdamW step, fp32)
            host_rate = hw.host.cpu_adam_params_per_s * optimizer_step_bytes_per_param(bpp, "adamw") / step_bpp
            optimizer_time_s = max(hw.device.kernel_launch_s, optimizer_params / host_rate)
    else:
        nbytes = optimizer_params * optimizer_step_bytes_per_param(bpp, model.train.optimizer)
        if nbytes > 0:
            bw = hw.device.memory_bandwidth_bytes_per_s
            optimizer_time_s = max(hw.device.kernel_launch_s,
                                   nbytes / (bw * memory_efficiency(model.curves, nbytes, "elementwise")))
    step_copy = 0.0
    if engine in ALL_REDUCE_ENGINES:
        # DDP copies each gradient into its bucket and the reduced bucket back (read + write each
        # way; gradient_as_bucket_view off, PyTorch's default); FSDP2's replicate (tp or pp > 1)
        # copies them into one all-reduce input and out again alike
        step_copy = copy_s(model, 4 * grad_bytes, 2 * max(1, math.ceil(grad_bytes / DDP_BUCKET_BYTES)))
    elif dp > 1 and sharding == "zero2":
        # the one reduce-scatter's copy-in (torch._chunk_cat of the accumulated unsharded gradients)
        step_copy = copy_s(model, 2 * grad_bytes)
    return DataParallelTerms(
        states=states, optimizer_params=optimizer_params, all_reduce_s=all_reduce, all_reduce_last_bucket_s=last,
        param_gather_s=gather, reduce_scatter_s=reduce_scatter_total, reduce_scatter_last_bucket_s=reduce_scatter_last,
        fsdp_volume_per_micro_batch=fsdp_volume, step_volume_bytes=step_volume, optimizer_s=optimizer_time_s, offload_s=offload_time_s,
        all_reduce_exposes=exposes, step_copy_s=step_copy,
    )


def fsdp_copies_s(model: CostModel, block_params: float, nb: int, n: int, reshard: bool) -> tuple[float, float]:
    """(forward, backward) time of FSDP2's copies around its collectives, per micro-batch, for `nb`
    blocks of `block_params` parameters sharded `n` ways: each all-gather copies the local shard
    into the all-gather input (foreach copy-in, cast to the compute dtype) and the gathered buffer
    out into the unsharded parameters (split_with_sizes_copy); each reduce-scatter (with `reshard`:
    every micro-batch) copies the unsharded gradients into its input (torch._chunk_cat). Read +
    write of each, memory-bound kernels on the compute stream (the CPU's cores on a CPU host)."""
    bpp = model.bpp
    unsharded = block_params * bpp.compute
    gather = copy_s(model, 2 * unsharded / n) + copy_s(model, 2 * unsharded)
    fwd = nb * gather
    bwd = nb * (gather + copy_s(model, 2 * block_params * bpp.grad)) if reshard else 0.0
    return fwd, bwd


def copy_s(model: CostModel, n_bytes: float, kernels: int = 1) -> float:
    """cost_models.compute.copies_time_s on the model's machine."""
    return copies_time_s(n_bytes, kernels, model.hw, model.curves)
