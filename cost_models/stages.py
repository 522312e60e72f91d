"""Stage terms: what one virtual stage costs per micro-batch, and the layout of a candidate.

A stage's `StageTime` (what the pipeline simulator takes, per micro-batch):

    F   = forward compute + TP collectives                (StageSum.forward_s, cost_models.blocks)
          + exposed FSDP all-gathers                       (fsdp_forward_exposed_s, below)
          + the engines' host work in forward              (FSDP2 copies; the pipelining engine's
                                                            per-action time on a CPU host)
    B   = recompute + input-grad compute + TP collectives  (StageSum.backward_s)
          + exposed FSDP all-gathers / reduce-scatters     (zero3 / hsdp: fsdp_backward_exposed_s)
          + the engines' host work in backward
          (+ the weight-grad compute W unless the schedule splits it off, ZB-H1)
    W   = weight-grad compute (split schedules only)
    p2p = the send of the stage's boundary activation over the pp link (none from the last stage)

FSDP's overlap (Zhao et al. 2023, FSDP2's prefetch of the next unit): per block and micro-batch
one all-gather of the block's compute-dtype parameters (and, resharding, again in backward plus
a reduce-scatter of its gradients); the first is exposed, the rest hide behind the previous
block's compute where the hardware overlaps communication with compute:

    exposed = first + max(0, (n_blocks - 1) x collective - compute x (n_blocks - 1) / n_blocks)

With expert parallelism the experts' parameters (`StageSum.expert_params`, 1/ep of them per
rank) are sharded over the "expert_dp" group (dp / ep copies, specs.MeshDims) and the rest over
the whole data-parallel shard group: each block gathers both, one after the other.

`StageTerms` also carries what the stage adds to its pp rank's per-micro-batch sums (named
fields; cost_models.ranks adds them over a rank's stages). It does not depend on whether the
schedule splits backward; `time(split)` gives the StageTime either way.

A candidate's `Layout` (its stage list, mesh, sharding and micro-batch size, any micro-batch
count): the StageTerms of each stage (computed once per distinct composition: stages with the
same blocks by layer type and recompute share them), the RankTerms of each pp rank
(cost_models.ranks) and the notes. Memoised in the CostModel's stage memo (seam 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from cost_models import comm
from cost_models.blocks import Composition, StageSum, composition
from specs import Knobs, MeshDims, SpecError

if TYPE_CHECKING:
    from cost_models.model import CostModel
    from cost_models.ranks import RankColumns, RankTerms

StageBounds = tuple[int, int, str]  # one virtual stage: (first block, last block, recompute)
SumsKey = tuple[int, bool, int, str, Composition, int, int]  # a StageSum's (tp, sp, micro-batch, recompute, composition, ep, cp)
# per distinct stage (composition, recompute, is the last stage, first block, last block), and per
# stage its index into them
StageShape = tuple[tuple[tuple[Composition, str, bool, int, int], ...], tuple[int, ...]]
_T = TypeVar("_T")


class StageTime(NamedTuple):
    """Per micro-batch, seconds: what the pipeline simulator plays (cost_models.simulator)."""

    forward_s: float
    backward_s: float
    weight_s: float
    p2p_s: float


@dataclass(frozen=True, slots=True)
class StageTerms:
    """One virtual stage for one setting, per micro-batch (module docstring). Times in seconds,
    sizes in bytes, per device."""

    joint: StageTime  # backward and weight grads in one pass (every schedule but zero_bubble)
    split: StageTime  # weight grads as a separate W pass (zero_bubble)
    sums: StageSum  # the block sums behind it
    uid: int  # a number that stands for this object in memo keys (CostModel.new_id)
    fsdp_forward_exposed_s: float  # FSDP all-gathers not hidden behind forward compute
    fsdp_backward_exposed_s: float  # FSDP all-gathers + reduce-scatters not hidden behind backward
    fsdp_time_s: float  # all FSDP collective time of the stage, hidden or not
    host_forward_s: float  # the engines' copies / per-action host time in forward
    host_backward_s: float  # ... in backward
    p2p_s: float  # the send of the boundary activation (0 from the last stage)
    # --- what the stage adds to its pp rank's per-micro-batch sums (cost_models.ranks)
    forward_compute_s: float  # forward compute + host work in forward (breakdown: compute_forward_s)
    backward_compute_s: float  # input- and weight-grad compute + host work in backward (compute_backward_s)
    tp_comm_s: float  # TP collectives, forward + backward
    ep_comm_s: float  # expert parallelism's all-to-alls, forward + backward
    cp_comm_s: float  # context parallelism's key/value gathers and gradient reduce-scatters
    fsdp_exposed_s: float  # FSDP collectives not hidden, forward + backward
    backward_window_s: float  # the whole backward of one micro-batch (a gradient sync can hide behind it)
    pp_volume_bytes: float  # activation sent + its gradient received (0 for the last stage)
    pp_time_s: float  # their p2p time
    recompute_working_bytes: float  # the recompute working set held in backward; -1.0: not recomputed

    def time(self, split: bool) -> StageTime:
        return self.split if split else self.joint


def stage_terms(model: CostModel, sums: StageSum, sums_key: SumsKey, mesh: MeshDims, sharding: str,
                last_stage: bool, pipelined: int, recompute: str) -> StageTerms:
    """The StageTerms of the stage whose block sums are `sums` (`sums_key` identifies them: the
    setting and composition), memoised per (sums, data-parallel setting, position).

    `pipelined`: 0 without a pipeline; else 1, or for zero2 the micro-batch count: inside a
    pipeline torch's stages keep FSDP2's blocks unsharded from the first forward to the last
    backward (torch/distributed/pipelining/stage.py backward_maybe_with_nosync), so zero2 (no
    resharding after forward) gathers once per step, spread here over the micro-batches; measured
    on the CPU fidelity GPT, pp2 x dp2 1f1b, 4 micro-batches: zero2 cost 1.05x sharding none,
    predicted 1.32x with a gather each."""
    fsdp = sharding in ("zero2", "zero3", "hsdp")
    reshard = sharding != "zero2"  # FSDP gathers again in backward and reduce-scatters each micro-batch
    fsdp_group = mesh.group("dp_shard") if fsdp else (1, mesh.tp)
    pp_stride = mesh.stride("pp")
    key = ("stage", sums_key, fsdp_group, mesh.group("expert_dp"), last_stage, pp_stride, reshard, pipelined)
    got: StageTerms | None = model.stage_memo.get(key)
    if got is not None:
        return got
    fsdp_n, fsdp_stride = fsdp_group
    ss = sums
    fwd_exp = bwd_exp = fsdp_time = copy_f = copy_b = 0.0
    expert_group = mesh.group("expert_dp") if fsdp and ss.expert_params > 0 else None
    if fsdp_n > 1:
        nb = ss.num_blocks
        dense = ss.num_params - ss.expert_params if expert_group is not None else ss.num_params
        ag, rs, copy_f, copy_b = _fsdp_collectives(model, dense, nb, fsdp_n, fsdp_stride, reshard)
        if expert_group is not None and expert_group[0] > 1:
            eag, ers, ecf, ecb = _fsdp_collectives(model, ss.expert_params, nb, *expert_group, reshard)
            ag, rs, copy_f, copy_b = ag + eag, rs + ers, copy_f + ecf, copy_b + ecb
        overlap = model.hw.comm_overlaps_compute  # False: nothing hides the gathers (all exposed)
        forward_compute = ss.forward_s if overlap else 0.0
        fwd_exp = ag + max(0.0, (nb - 1) * ag - forward_compute * (nb - 1) / nb)
        fsdp_time = nb * ag
        if reshard:
            backward_compute = ss.backward_s + ss.weight_compute_s if overlap else 0.0
            bwd_exp = ag + rs + max(0.0, (nb - 1) * (ag + rs) - backward_compute * (nb - 1) / nb)
            fsdp_time += nb * (ag + rs)
        elif pipelined:
            fwd_exp /= pipelined
            fsdp_time /= pipelined
            copy_f /= pipelined
    if pipelined and model.hw.device_is_host_cpu:
        copy_f += model.hw.pipeline_action_overhead_s
        copy_b += model.hw.pipeline_action_overhead_s
    p2p = 0.0 if last_stage else _p2p_s(model, ss.output_bytes, pp_stride)
    forward = ss.forward_s + fwd_exp + copy_f
    backward = ss.backward_s + bwd_exp + copy_b
    got = model.stage_memo[key] = StageTerms(
        joint=StageTime(forward, backward + ss.weight_compute_s, 0.0, p2p),
        split=StageTime(forward, backward + 0.0, ss.weight_compute_s, p2p),
        sums=ss, uid=model.new_id(),
        fsdp_forward_exposed_s=fwd_exp, fsdp_backward_exposed_s=bwd_exp, fsdp_time_s=fsdp_time,
        host_forward_s=copy_f, host_backward_s=copy_b, p2p_s=p2p,
        forward_compute_s=ss.forward_compute_s + copy_f,
        backward_compute_s=ss.backward_compute_s + ss.weight_compute_s + copy_b,
        tp_comm_s=ss.tp_forward_s + ss.tp_backward_s,
        ep_comm_s=ss.ep_forward_s + ss.ep_backward_s,
        cp_comm_s=ss.cp_forward_s + ss.cp_backward_s,
        fsdp_exposed_s=fwd_exp + bwd_exp,
        backward_window_s=ss.backward_s + bwd_exp + copy_b + ss.weight_compute_s,
        pp_volume_bytes=0.0 if last_stage else 2 * ss.output_bytes,
        pp_time_s=0.0 if last_stage else 2 * p2p,
        recompute_working_bytes=ss.max_working_bytes if recompute != "none" else -1.0,
    )
    return got


def _fsdp_collectives(model: CostModel, num_params: float, nb: int, n: int, stride: int,
                      reshard: bool) -> tuple[float, float, float, float]:
    """(all-gather per block, reduce-scatter per block, host copies in forward, in backward) of
    `nb` blocks holding `num_params` parameters sharded `n` ways: the gathers move the compute-dtype
    copies (bf16 under mixed precision), the reduce-scatters fp32 gradients (resharding only).
    They depend on the parameter count alone (not on recompute or sp)."""
    key = ("fsdp", num_params, nb, n, stride, reshard)
    got: tuple[float, float, float, float] | None = model.stage_memo.get(key)
    if got is None:
        link = model.group_link(n, stride)
        ag = comm.all_gather_s(num_params * model.bpp.compute / nb, link)
        rs = comm.reduce_scatter_s(num_params * model.bpp.grad / nb, link) if reshard else 0.0
        from cost_models.ranks import fsdp_copies_s

        got = model.stage_memo[key] = (ag, rs, *fsdp_copies_s(model, num_params / nb, nb, n, reshard))
    return got


def _p2p_s(model: CostModel, n_bytes: float, stride: int) -> float:
    key = ("p2p", n_bytes, stride)
    got: float | None = model.stage_memo.get(key)
    if got is None:
        got = model.stage_memo[key] = comm.p2p_s(n_bytes, model.p2p_link(stride))
    return got


# ---------------------------------------------------------------------------- stage lists


@dataclass(frozen=True, slots=True)
class StageList:
    """A stage partition's block sums for one (tp, sp, micro-batch) setting: the distinct stages
    (same blocks by layer type and recompute; the last stage apart, it sends nothing) and, per
    stage, which one it is."""

    uid: int
    distinct: tuple[tuple[StageSum, SumsKey, bool, str], ...]  # (sums, their key, is last stage, recompute)
    pattern: tuple[int, ...]  # per stage: its index into `distinct`
    flops_per_micro_batch: float  # per tp rank, all stages: forward + backward + recompute

    def spread(self, per_distinct: Sequence[_T]) -> tuple[_T, ...]:
        """A per-distinct-stage list -> one entry per stage."""
        return tuple(per_distinct[i] for i in self.pattern)


def stage_list(model: CostModel, stages: tuple[StageBounds, ...], tp: int, sp: bool, mb: int,
               ep: int = 1, cp: int = 1) -> StageList:
    key = ("stage list", stages, tp, sp, mb, ep, cp)
    got: StageList | None = model.stage_memo.get(key)
    if got is not None:
        return got
    skey = ("stage shape", stages)
    shape: StageShape | None = model.stage_memo.get(skey)
    if shape is None:
        shape = model.stage_memo[skey] = _stage_shape(model, stages)
    keys, pattern = shape
    distinct: list[tuple[StageSum, SumsKey, bool, str]] = []
    for comp, rec, last, first_block, last_block in keys:
        bc = model.block_costs(tp, sp, mb, rec, ep, cp)
        distinct.append((bc.stage_sum(first_block, last_block),
                         (tp, bc.sequence_parallel, mb, rec, comp, bc.ep, bc.cp), last, rec))
    flops = sum([ss.fwd_flops + ss.bwd_flops + ss.recompute_flops for ss, *_ in (distinct[i] for i in pattern)])
    got = model.stage_memo[key] = StageList(model.new_id(), tuple(distinct), pattern, flops)
    return got


def _stage_shape(model: CostModel, stages: tuple[StageBounds, ...]) -> StageShape:
    """((composition, recompute, is the last stage, first, last) per distinct stage in order of
    first occurrence, each stage's index into them): the same for every setting."""
    index: dict[tuple[Composition, str], int] = {}
    keys: list[tuple[Composition, str, bool, int, int]] = []
    pattern: list[int] = []
    last_j = len(stages) - 1
    for j, (first, last, recompute) in enumerate(stages):
        comp = composition(model, first, last)
        if j == last_j:
            i = len(keys)
            keys.append((comp, recompute, True, first, last))
        else:
            known = index.get((comp, recompute))
            if known is None:
                known = index[(comp, recompute)] = len(keys)
                keys.append((comp, recompute, False, first, last))
            i = known
        pattern.append(i)
    return tuple(keys), tuple(pattern)


# ---------------------------------------------------------------------------- layouts


@dataclass(frozen=True, slots=True)
class Layout:
    """What a candidate's estimate needs besides the simulation and the micro-batch count."""

    mesh: MeshDims
    schedule: str  # as simulated (1f1b when pp = 1)
    stages: tuple[StageTerms, ...]  # per virtual stage
    times: tuple[StageTime, ...]  # per virtual stage, as the schedule plays them
    times_id: int  # stands for `times` in the simulation memo
    ranks: tuple[RankTerms, ...]  # per pp rank
    columns: RankColumns
    flops_per_micro_batch: float  # per tp rank, all stages: forward + backward + recompute
    notes: tuple[str, ...]

    @property
    def critical_p2p_s(self) -> float:
        """Up to 2 sends per stage boundary: the warm-up and drain chains' p2p."""
        return 2 * sum(t.p2p_s for t in self.times)

    @property
    def stage_sums(self) -> tuple[StageSum, ...]:
        return tuple(s.sums for s in self.stages)


def check_stages(model: CostModel, stages: Sequence[StageBounds], want: int) -> None:
    graph = model.graph
    if len(stages) != want:
        raise SpecError(f"stages: pp * virtual_stages = {want} stages expected, got {len(stages)}")
    nxt = 0
    for i, (first, last, _rec) in enumerate(stages):
        if first != nxt or last < first:
            raise SpecError(
                f"stages.{i}: ({first}, {last}) but block {nxt} is next; stages must cover blocks "
                f"0..{graph.num_blocks - 1} once, in order"
            )
        nxt = last + 1
    if nxt != graph.num_blocks:
        raise SpecError(f"stages: cover blocks 0..{nxt - 1}, but the model has {graph.num_blocks} blocks")


def layout(model: CostModel, k: Knobs, stages: Sequence[StageBounds]) -> Layout:
    """The Layout of knobs `k` with `stages` = (first, last, recompute) per virtual stage."""
    from cost_models.ranks import rank_terms

    mesh = MeshDims.from_knobs(k)
    if mesh.world != model.num_devices:
        raise SpecError(f"knobs: tp({k.tp}) * pp({k.pp}) * dp({k.dp}) = {mesh.world}, but the hardware has "
                        f"{model.hw.num_devices} devices")
    stages = tuple(stages)  # hashable: a memo key
    schedule = k.schedule if k.pp > 1 else "1f1b"
    split = schedule == "zero_bubble"
    fsdp = k.dp > 1 and k.sharding in ("zero2", "zero3", "hsdp")
    # a layout does not depend on the micro-batch count (only on whether there are several),
    # except for zero2 in a pipeline, whose one gather per step is spread over them (stage_terms)
    pipelined = 0 if k.pp == 1 else (k.num_micro_batches if fsdp and k.sharding == "zero2" else 1)
    key = ("layout", stages, mesh, k.sharding, k.offload, k.micro_batch_size, k.sequence_parallel, schedule,
           pipelined, k.num_micro_batches > 1, k.virtual_stages)
    got: Layout | None = model.stage_memo.get(key)
    if got is not None:
        return got
    ckey = ("checked", stages, k.pp * k.virtual_stages)
    if ckey not in model.stage_memo:
        check_stages(model, stages, k.pp * k.virtual_stages)
        model.stage_memo[ckey] = True
    sp = bool(k.sequence_parallel and k.tp > 1)
    partition_sums = stage_list(model, stages, k.tp, sp, k.micro_batch_size, k.ep, k.cp)
    # data parallelism sees the cp ranks of a replica as more data-parallel ranks (MeshDims.fold_cp)
    dp_mesh = mesh.fold_cp()
    # the stage terms of this stage list for this data-parallel setting (none and zero1 share them)
    skey = ("stage terms", partition_sums.uid, dp_mesh.group("dp_shard") if fsdp else None,
            dp_mesh.group("expert_dp"), dp_mesh.stride("pp"),
            k.sharding if fsdp else "none", pipelined)
    got_terms: tuple[list[StageTerms], int] | None = model.stage_memo.get(skey)
    if got_terms is None:
        distinct = [stage_terms(model, ss, ss_key, dp_mesh, k.sharding if fsdp else "none", last, pipelined, rec)
                    for ss, ss_key, last, rec in partition_sums.distinct]
        # a number for the stage times this gives (joint and split alike: the simulation memo
        # keys on the schedule too)
        got_terms = model.stage_memo[skey] = (distinct, model.new_id())
    distinct, times_id = got_terms
    per_stage = partition_sums.spread(distinct)
    times = tuple(s.time(split) for s in per_stage)
    ranks, columns, rank_notes = rank_terms(model, k, mesh, stages, per_stage, partition_sums)
    notes = list(rank_notes)
    if split:
        notes.append("zero_bubble modelled as ZB-H1 (v=1); activations counted until W (conservative)")
    if k.cp > 1:
        notes.append(f"context parallelism (cp={k.cp}): for export (torchtitan context_parallel_degree, Megatron "
                     f"--context-parallel-size); autoplan's runtime does not run it yet")
    if model.train.optimizer == "sgd":
        notes.append("sgd assumed with momentum (4 bytes/param of state)")
    got = model.stage_memo[key] = Layout(mesh, schedule, per_stage, times, times_id, ranks, columns,
                                         partition_sums.flops_per_micro_batch, tuple(dict.fromkeys(notes)))
    return got

