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

Shared hosts (hw.shared_cores < processes per node, e.g. gloo on a 2-core CPU): the step is
composed by cost_models.sharedhost from the estimate at per-core speed (the critical path) and
the host's total CPU work over its cores; any excess is the breakdown term `core_sharing_s`.

Memory per pp rank (cost_models.memory): model states by ZeRO stage, activations = sum over the
rank's virtual stages of (peak in-flight micro-batches x stored bytes per micro-batch), transient
buffers, margin; peak over the step = states + max(activations + backward transients,
optimizer-step temporaries). The worst rank is reported.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import count
from operator import add, itemgetter, mul, sub

from cost_models import comm, sharedhost
from cost_models.blocks import Context, block_costs_ctx, context
from cost_models.compute import compute_dtype, itemsize, peak_flops_per_s
from cost_models.efficiency import curves_for, memory_efficiency
from cost_models.memory import (
    DDP_BUCKET_BYTES,
    FRAGMENTATION_FRACTION,
    margin_bytes,
    optimizer_step_bytes_per_param,
    sharded_states,
)
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


def _check_stages(graph: ModelGraph, stages, want: int) -> None:
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


_STAGE_IDS = count()  # ids of cached stage results (never reused, so rank keys stay unambiguous)


def _stage(ctx: Context, ss, split: bool, fsdp_n: int, fsdp_stride: int, last_stage: bool, pp_stride: int,
           reshard: bool):
    """(F, B, W, p2p, StageSum, fsdp fwd exposed, fsdp bwd exposed, fsdp comm time, rank id, (F, B, W, p2p))
    per micro-batch of the stage whose block sums are `ss`, cached by composition (not position).
    `reshard`: FSDP gathers again in backward and reduce-scatters every micro-batch (zero3/hsdp);
    otherwise (zero2) it gathers in forward only and reduce-scatters once per step (after the
    pipeline). The rank id is the same with and without `split`: everything a rank's terms read
    (the sums, FSDP terms, p2p and B + W) is (B + W is bit-identical: (b + e) + w == (b + e + w) + 0.0)."""
    # one StageSum object per composition and (tp, sp, mb, rec) setting, kept alive by the context's
    # BlockCosts: its id stands for all of them
    key = (id(ss), split, fsdp_n, fsdp_stride, last_stage, pp_stride, reshard)
    got = ctx.stage_cache.get(key)
    if got is not None:
        return got
    fwd_exp = bwd_exp = fsdp_time = 0.0
    if fsdp_n > 1:
        link = ctx.link(fsdp_n, fsdp_stride)
        nb = ss.num_blocks
        ag = comm.all_gather_s(ss.num_params * ctx.bpp.compute / nb, link)  # bf16 copies under mixed precision
        overlap = ctx.hw.comm_overlaps_compute  # False: nothing hides the gathers (all exposed)
        f_c = ss.forward_s if overlap else 0.0
        fwd_exp = ag + max(0.0, (nb - 1) * ag - f_c * (nb - 1) / nb)
        fsdp_time = nb * ag
        if reshard:
            rs = comm.reduce_scatter_s(ss.num_params * ctx.bpp.grad / nb, link)
            b_c = ss.backward_s + ss.weight_compute_s if overlap else 0.0
            bwd_exp = ag + rs + max(0.0, (nb - 1) * (ag + rs) - b_c * (nb - 1) / nb)
            fsdp_time += nb * (ag + rs)
    F = ss.forward_s + fwd_exp
    B = ss.backward_s + bwd_exp + (0.0 if split else ss.weight_compute_s)
    W = ss.weight_compute_s if split else 0.0
    c = 0.0
    if not last_stage:
        key_l = ("p2p", pp_stride)
        link = ctx.links.get(key_l)
        if link is None:
            link = ctx.links[key_l] = comm.p2p_link(ctx.hw, pp_stride)
        c = comm.p2p_s(ss.output_bytes, link)
    # a small id shared by split and unsplit (cheap rank keys) and the (F, B, W, p2p) the simulator takes
    rkey = ("rid", id(ss), fsdp_n, fsdp_stride, last_stage, pp_stride, reshard)
    rid = ctx.stage_cache.get(rkey)
    if rid is None:
        rid = ctx.stage_cache[rkey] = next(_STAGE_IDS)
    got = (F, B, W, c, ss, fwd_exp, bwd_exp, fsdp_time, rid, (F, B, W, c))
    if len(ctx.stage_cache) > 200_000:
        ctx.stage_cache.clear()
    ctx.stage_cache[key] = got
    return got


@dataclass(frozen=True, slots=True)
class _Rank:
    """What one pp rank needs that does not depend on the micro-batch count or the schedule."""

    activation: tuple[float, ...]  # stored bytes per micro-batch, per stage of this rank
    param_b: float
    grad_b: float
    opt_b: float
    trans_b: float  # transient buffers besides activations
    opt_tmp_b: float  # optimizer-step temporaries
    # post-pipeline communication pieces (see _post)
    rs_tot: float
    rs_last: float
    window: float  # backward of one micro-batch on this rank
    ag_after: float
    fixed_exposed: float  # DDP / HSDP replica all-reduce exposed, independent of m
    fixed_time: float
    fixed_vol: float
    grad_vol: float
    fsdp_per_mb: float
    tied: float
    opt_s: float
    offload_s: float
    # per-micro-batch sums for the breakdown
    f_c: float
    b_c: float
    rec: float
    tp_s: float
    tp_vol: float
    fsdp_s: float
    pp_vol: float
    pp_t: float


@dataclass(frozen=True, slots=True)
class _Cols:
    """The per-rank terms as columns (one entry per pp rank), for the per-call pass over ranks."""

    kind_of: itemgetter  # rank -> index into uniq, as one call: kind_of(per_kind_list) -> per rank
    uniq: tuple[_Rank, ...]  # distinct _Rank objects, in order of first rank
    static: tuple[float, ...]  # parameters + gradients + optimizer states
    trans: tuple[float, ...]
    opt_tmp: tuple[float, ...]
    acts: tuple[tuple[float, ...], ...]  # per virtual stage i of a rank: its stored bytes per micro-batch
    param: tuple[float, ...]
    grad: tuple[float, ...]
    opt: tuple[float, ...]


def _cols(uniq: list[_Rank], kind_of: list[int], v: int) -> _Cols:
    """Columns from the distinct ranks `uniq` and each rank's index into it."""
    get = itemgetter(*kind_of) if len(kind_of) > 1 else (lambda xs, _i=kind_of[0]: (xs[_i],))
    # per distinct rank, then spread over the ranks by one C call each
    return _Cols(get, tuple(uniq), get([rk.param_b + rk.grad_b + rk.opt_b for rk in uniq]),
                 get([rk.trans_b for rk in uniq]), get([rk.opt_tmp_b for rk in uniq]),
                 tuple(get([rk.activation[i] for rk in uniq]) for i in range(v)),
                 get([rk.param_b for rk in uniq]), get([rk.grad_b for rk in uniq]), get([rk.opt_b for rk in uniq]))


@dataclass(frozen=True, slots=True)
class _Layout:
    times: tuple[tuple[float, float, float, float], ...]
    ranks: tuple[_Rank, ...]
    cols: _Cols
    rank_stages: tuple[tuple[int, ...], ...]
    flops_per_mb: float  # per tp rank, all stages: fwd + bwd + recompute
    crit_p2p: float
    notes: tuple[str, ...]
    sims: dict  # (schedule, micro-batches) -> ScheduleResult (saves hashing the stage times again)


@dataclass(frozen=True, slots=True)
class _StageList:
    """A stage partition's block sums for one (tp, sp, micro-batch) setting: the distinct
    (StageSum, is last stage) pairs and, per stage, which one it is."""

    uid: int  # never reused (cache keys below hold it, not id())
    uniq: tuple[tuple[object, bool], ...]
    pattern: tuple[int, ...]
    flops_per_mb: float  # per tp rank, all stages: fwd + bwd + recompute


def _stage_list(ctx: Context, stages, tp: int, sp: bool, mb: int, sub: dict) -> _StageList:
    """`sub`: the caches of this stage list (hashed once per call)."""
    key = ("stages", tp, sp, mb)
    got = sub.get(key)
    if got is not None:
        return got
    S = len(stages)
    index: dict = {}
    uniq, pattern, fl = [], [], []
    for j, (a, b, r) in enumerate(stages):
        ss = block_costs_ctx(ctx, tp, sp, mb, r).stage(a, b)
        u = (id(ss), j == S - 1)
        i = index.get(u)
        if i is None:
            i = index[u] = len(uniq)
            uniq.append((ss, j == S - 1))
        pattern.append(i)
        fl.append(ss.fwd_flops + ss.bwd_flops + ss.recompute_flops)
    got = sub[key] = _StageList(next(_STAGE_IDS), tuple(uniq), tuple(pattern), sum(fl))
    return got


def _layout(ctx: Context, k: Knobs, stages, sched: str, sub: dict) -> _Layout:
    """Stage times and per-rank terms. Stage results are computed once per distinct (composition,
    last stage) and the per-rank terms once per (stage list, stage rank ids, dp setting): they do
    not depend on the schedule (1F1B and ZB-H1 share them)."""
    pp, dp, tp, v = k.pp, k.dp, k.tp, k.virtual_stages
    mb = k.micro_batch_size
    sp = bool(k.sequence_parallel and tp > 1)
    split = sched == "zero_bubble"
    sharding = k.sharding
    if sharding == "hsdp":
        shard_n = k.hsdp_shard_size or dp
        if dp % shard_n:
            raise SpecError(f"hsdp_shard_size: {shard_n} must divide dp ({dp})")
    else:
        shard_n = dp
    fsdp_n = shard_n if sharding in ("zero2", "zero3", "hsdp") else 1
    reshard = sharding != "zero2"
    pp_stride = tp * dp
    sl = _stage_list(ctx, stages, tp, sp, mb, sub)
    res = [_stage(ctx, ss, split, fsdp_n, tp, last, pp_stride, reshard) for ss, last in sl.uniq]
    st = [res[i] for i in sl.pattern]
    times = tuple([x[9] for x in st])
    accum = k.num_micro_batches > 1
    rkey = ("ranks", sl.uid, tuple([x[8] for x in res]), pp, dp, tp, v, sharding, shard_n, k.offload, accum)
    got = ctx.stage_cache.get(rkey)
    if got is None:
        got = ctx.stage_cache[rkey] = _ranks(ctx, k, stages, st, shard_n, accum)
    ranks, cols, notes = got
    notes = list(notes)
    if split:
        notes.append("zero_bubble modelled as ZB-H1 (v=1); activations counted until W (conservative)")
    if ctx.train.optimizer == "sgd":
        notes.append("sgd assumed with momentum (4 bytes/param of state)")
    return _Layout(times, ranks, cols, _rank_stages(pp, pp * v), sl.flops_per_mb, 2 * sum(t[3] for t in times),
                   tuple(dict.fromkeys(notes)), {})


def _ranks(ctx: Context, k: Knobs, stages, st, shard_n: int, accum: bool):
    """Per-rank terms (_Rank per pp rank, and as columns) and the tied-parameter notes."""
    graph, hw, train = ctx.graph, ctx.hw, ctx.train
    pp, dp, tp, v = k.pp, k.dp, k.tp, k.virtual_stages
    S = pp * v
    mb = k.micro_batch_size
    sharding, bpp = k.sharding, ctx.bpp
    pp_stride = tp * dp
    notes: list[str] = []
    firsts = [s_[0] for s_ in stages]
    tied_rank_params = [0.0] * pp
    tied_comm = [0.0] * pp
    if graph.tied_blocks and graph.tied_param_bytes > 0:
        tied_params = graph.tied_param_bytes / itemsize(graph.param_dtype)
        for a, b in graph.tied_blocks:
            ra, rb = (bisect_right(firsts, a) - 1) % pp, (bisect_right(firsts, b) - 1) % pp
            tsplit = ctx.split_fraction[graph.blocks[a].layer_type] if tp > 1 else 0.0
            local = tied_params * ((1 - tsplit) + tsplit / tp)
            if ra == rb:
                tied_rank_params[ra] += local
            else:
                t = 2 * comm.p2p_s(local * bpp.grad, comm.p2p_link(hw, pp_stride))
                tied_comm[ra] = max(tied_comm[ra], t)
                tied_comm[rb] = max(tied_comm[rb], t)
                notes.append("tied parameters on different pp ranks: a copy on each, gradients all-reduced")
    act_isz = itemsize(ctx.dtype)
    last_block_split = bool(graph.layer(graph.num_blocks - 1).tp_candidates) and tp > 1

    rank_stages = _rank_stages(pp, S)
    # ranks alike (same stage results, tied parameters and sends; the last rank apart) share one
    # _Rank: computed or looked up once per kind, keyed by the stages' small ids
    ids = [x[8] for x in st]
    per_rank = ids if v == 1 else list(zip(*[ids[i * pp:(i + 1) * pp] for i in range(v)], strict=True))
    kinds = list(zip(per_rank, tied_rank_params, tied_comm, strict=True))
    kinds[-1] = (*kinds[-1], "last")
    by_kind: dict = {}
    first_rank: dict = {}
    for r, kk in enumerate(kinds):
        if kk not in first_rank:
            first_rank[kk] = r
    for kind, r in first_rank.items():
        js = rank_stages[r]
        rkey = ("rank", kind, pp, dp, tp, sharding, shard_n, k.offload, accum)
        got = ctx.stage_cache.get(rkey)
        if got is not None:
            by_kind[kind] = got
            continue
        # the stage sums this rank needs, in one pass (the same additions, in the same order, as
        # sum() over the stages)
        n_params = f_c = b_c = rec_s = tp_s = tp_v = fsdp_s = pp_v = pp_t = window = fsdp_mb = 0.0
        big = out_max = -1.0
        recomputed = -1.0
        acts = []
        for j in js:
            F_, B_, W_, c_, x, fe, be, ft, _id, _t = st[j]
            n_params += x.num_params
            big = max(big, x.max_block_params)
            out_max = max(out_max, x.output_bytes)
            acts.append(x.activation_bytes)
            f_c += x.forward_compute_s
            b_c += x.backward_compute_s + x.weight_compute_s
            rec_s += x.recompute_s
            tp_s += x.tp_forward_s + x.tp_backward_s
            tp_v += x.tp_volume_bytes
            fsdp_s += fe + be
            fsdp_mb += ft
            window += B_ + W_
            if j < S - 1:
                pp_v += 2 * x.output_bytes
                pp_t += 2 * c_
            if stages[j][2] != "none":
                recomputed = max(recomputed, x.max_working_bytes)
        n_params -= tied_rank_params[r]
        dkey = ("dp", n_params, sharding, dp, shard_n, tp, k.offload)
        dterms = ctx.stage_cache.get(dkey)
        if dterms is None:
            dterms = ctx.stage_cache[dkey] = _dp_terms(ctx, n_params, k, shard_n)
        states, opt_params, tot, last, ag, rs_tot, rs_last, grad_vol, fixed_vol, opt_s, off_s, exposes = dterms
        trans = 0.0
        if sharding in ("none", "zero1"):
            trans += n_params * bpp.grad  # DDP bucket copies of the gradients
            trans += n_params * bpp.working  # autocast's bf16 weight copies, saved for backward
        elif sharding == "zero2":
            # FSDP2 without resharding: every local block stays unsharded from forward to backward,
            # and gradients accumulate unsharded until the last micro-batch syncs
            trans += n_params * bpp.compute + big * bpp.grad
            if accum:
                trans += n_params * bpp.grad
        else:  # zero3 / hsdp: two blocks unsharded (current + prefetched), one block's gradients
            trans += big * (2 * bpp.compute + bpp.grad)
            if sharding == "hsdp":
                trans += n_params * bpp.grad / shard_n  # replica all-reduce buckets
        if pp > 1:
            trans += 4 * out_max
        if S - 1 in js:
            trans += ctx.final_output_bytes * mb * (1 + 2 * 4 / act_isz) / (tp if last_block_split else 1)
        if recomputed >= 0:
            trans += recomputed
        opt_tmp = 4 * opt_params if (train.optimizer in ("adam", "adamw") and k.offload == "none") else 0.0

        # the backward that hides the gradient sync; none where comm shares the compute cores
        if not hw.comm_overlaps_compute:
            window = 0.0
        fsdp_per_mb = fsdp_mb
        fsdp_mb = fsdp_per_mb if dp > 1 and sharding in ("zero2", "zero3", "hsdp") else 0.0
        ag_after = fixed_exp = fixed_time = 0.0
        if exposes:  # a bucketed all-reduce under the last backward (DDP, ZeRO-1, HSDP replicas)
            fixed_exp, fixed_time = max(last, tot - window), tot
            if sharding == "zero1":  # then the updated parameters are gathered (exposed)
                fixed_exp, fixed_time = fixed_exp + ag, tot + ag
        got = ctx.stage_cache[rkey] = _Rank(
            tuple(acts), states.param, states.grad, states.optimizer, trans, opt_tmp,
            rs_tot, rs_last, window, ag_after, fixed_exp, fixed_time, fixed_vol, grad_vol, fsdp_mb, tied_comm[r],
            opt_s, off_s,
            f_c, b_c, rec_s, tp_s, tp_v, fsdp_s, pp_v, pp_t,
        )
        by_kind[kind] = got
    pos = {kk: i for i, kk in enumerate(first_rank)}
    kind_of = [pos[kk] for kk in kinds]
    uniq = [by_kind[kk] for kk in first_rank]
    return tuple([uniq[i] for i in kind_of]), _cols(uniq, kind_of, v), tuple(notes)


def _dp_terms(ctx: Context, n_params: float, k: Knobs, shard_n: int) -> tuple:
    """The terms of a rank holding `n_params` parameters that depend only on that count and the
    data-parallel setting (cached per context; shared across recompute, sp and schedule):
    (states, optimizer parameters, bucketed all-reduce total and last bucket, ZeRO-1 parameter
    gather, ZeRO-2 reduce-scatter total and last bucket, per-micro-batch FSDP volume, fixed volume,
    optimizer step, offload, whether the all-reduce total/last apply)."""
    hw, bpp = ctx.hw, ctx.bpp
    dp, tp, sharding = k.dp, k.tp, k.sharding
    states = sharded_states(n_params, bpp, sharding=sharding, dp=dp, hsdp_shard_size=shard_n, offload=k.offload)
    opt_div = {"zero1": dp, "zero2": dp, "zero3": dp, "hsdp": shard_n}.get(sharding, 1)
    opt_params = n_params / opt_div
    grad_bytes = n_params * bpp.grad
    tot = last = ag = rs_tot = rs_last = fixed_vol = grad_vol = 0.0
    exposes = False
    if dp > 1:
        dp_link = ctx.link(dp, tp)
        if sharding == "none":
            tot, last = comm.bucketed_all_reduce_s(grad_bytes, dp_link, DDP_BUCKET_BYTES)
            fixed_vol = comm.all_reduce_volume_bytes(grad_bytes, dp)
            exposes = True
        elif sharding == "zero1":
            # ZeroRedundancyOptimizer over DDP: bucketed all-reduce under the last backward,
            # then each rank steps its shard and the updated parameters are gathered (exposed)
            tot, last = comm.bucketed_all_reduce_s(grad_bytes, dp_link, DDP_BUCKET_BYTES)
            ag = comm.all_gather_s(n_params * bpp.param, dp_link)
            fixed_vol = comm.all_reduce_volume_bytes(grad_bytes, dp) + comm.all_gather_volume_bytes(
                n_params * bpp.param, dp)
            exposes = True
        elif sharding == "zero2":
            # FSDP2, no resharding: gathers in each forward (in the stage times), one
            # reduce-scatter of the accumulated gradients under the last backward
            rs_tot, rs_last = comm.bucketed_reduce_scatter_s(grad_bytes, dp_link, DDP_BUCKET_BYTES)
            grad_vol = comm.all_gather_volume_bytes(n_params * bpp.compute, dp)
            fixed_vol = comm.all_gather_volume_bytes(grad_bytes, dp)
        else:
            grad_vol = (2 * comm.all_gather_volume_bytes(n_params * bpp.compute, shard_n)
                        + comm.all_gather_volume_bytes(grad_bytes, shard_n))
            rep_link = ctx.link(dp // shard_n, tp * shard_n) if sharding == "hsdp" else None
            if sharding == "hsdp" and rep_link is not None and rep_link.size > 1:
                tot, last = comm.bucketed_all_reduce_s(grad_bytes / shard_n, rep_link, DDP_BUCKET_BYTES)
                fixed_vol = comm.all_reduce_volume_bytes(grad_bytes / shard_n, dp // shard_n)
                exposes = True
    opt_s = off_s = 0.0
    if k.offload == "cpu":
        pcie = hw.host.pcie_bandwidth_bytes_per_s
        off_s = opt_params * (bpp.grad + bpp.param) / pcie + opt_params / hw.host.cpu_adam_params_per_s
    elif hw.device_is_host_cpu:
        if opt_params > 0:
            step_bpp = optimizer_step_bytes_per_param(bpp, ctx.train.optimizer)
            # the measured AdamW rate, scaled to this optimizer by its bytes per parameter
            # (host.cpu_adam_params_per_s is a foreach AdamW step, fp32)
            host_rate = hw.host.cpu_adam_params_per_s * optimizer_step_bytes_per_param(bpp, "adamw") / step_bpp
            opt_s = max(hw.device.kernel_launch_s, opt_params / host_rate)
    else:
        nbytes = opt_params * optimizer_step_bytes_per_param(bpp, ctx.train.optimizer)
        if nbytes > 0:
            bw = hw.device.memory_bandwidth_bytes_per_s
            opt_s = max(hw.device.kernel_launch_s,
                        nbytes / (bw * memory_efficiency(curves_for(hw), nbytes, "elementwise")))
    return states, opt_params, tot, last, ag, rs_tot, rs_last, grad_vol, fixed_vol, opt_s, off_s, exposes


@lru_cache(maxsize=64)
def _rank_stages(pp: int, S: int) -> tuple[tuple[int, ...], ...]:
    """Virtual stages of each pp rank (loop style: stage j on rank j % pp)."""
    return tuple(tuple(range(r, S, pp)) for r in range(pp))


def _post(rk: _Rank, sharding: str, m: int) -> tuple[float, float, float]:
    """(exposed, time, volume) of the rank's data-parallel traffic for m micro-batches
    (exposed: only the part after the pipeline; FSDP gathers are in the stage times)."""
    if sharding == "zero2":
        exposed = max(rk.rs_last, rk.rs_tot - rk.window) if rk.rs_tot else 0.0
        return exposed, m * rk.fsdp_per_mb + rk.rs_tot, m * rk.grad_vol + rk.fixed_vol
    if sharding in ("zero3", "hsdp"):
        return rk.fixed_exposed, m * rk.fsdp_per_mb + rk.fixed_time, m * rk.grad_vol + rk.fixed_vol
    return rk.fixed_exposed, rk.fixed_time, rk.fixed_vol


def _layout_for(ctx: Context, graph: ModelGraph, k: Knobs, stages, hw: HardwareSpec) -> tuple[_Layout, str]:
    pp, dp, tp, v = k.pp, k.dp, k.tp, k.virtual_stages
    world = pp * dp * tp
    if world != hw.num_devices:
        raise SpecError(f"knobs: tp({tp}) * pp({pp}) * dp({dp}) = {world}, but the hardware has {hw.num_devices} devices")
    sched = k.schedule if pp > 1 else "1f1b"
    stages = tuple(stages)
    # the caches of one stage list live in one dict under it (the stage list is hashed once)
    sub = ctx.stage_cache.get(stages)
    if sub is None:
        sub = ctx.stage_cache[stages] = {}
    key = ("layout", pp, dp, tp, v, k.sharding, k.hsdp_shard_size, k.offload, k.micro_batch_size,
           k.sequence_parallel, sched == "zero_bubble", k.num_micro_batches > 1)
    lay = sub.get(key)
    if lay is None:
        _check_stages(graph, stages, pp * v)
        lay = sub[key] = _layout(ctx, k, stages, sched, sub)
    return lay, sched


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
    post = max(_post(rk, knobs.sharding, m)[0] + rk.tied + rk.opt_s + rk.offload_s for rk in lay.ranks)
    return pipeline_lower_bound(sched, knobs.pp, m, knobs.virtual_stages, lay.times) + post


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
    if sharedhost.oversubscribed(hw):
        return _share_cores(graph, knobs, stages, hw, train)
    ctx = context(graph, hw, train)
    k = knobs
    pp, dp, tp, v = k.pp, k.dp, k.tp, k.virtual_stages
    world = pp * dp * tp
    mb, m = k.micro_batch_size, k.num_micro_batches
    lay, sched = _layout_for(ctx, graph, k, stages, hw)
    sim = lay.sims.get((sched, m))
    if sim is None:
        sim = lay.sims[(sched, m)] = simulate_cached(sched, pp, m, v, lay.times)
    T_pipe = sim.step_time_s
    capacity = float(hw.device.memory_bytes)
    sharding = k.sharding

    # per rank, as columns (C-level maps; the same operations, in the same order, as
    # acts = sum of peak x stored bytes over the rank's stages, static + max(acts + transient,
    # optimizer temporaries) + margin)
    cols = lay.cols
    peaks = sim.peak_in_flight_per_stage
    acts = list(map(mul, peaks[:pp], cols.acts[0]))
    for i in range(1, v):
        acts = list(map(add, acts, map(mul, peaks[i * pp:(i + 1) * pp], cols.acts[i])))
    dyn = [o if o > x else x for x, o in zip(map(add, acts, cols.trans), cols.opt_tmp, strict=True)]  # max(x, o)
    tens = list(map(add, cols.static, dyn))
    # margin_bytes(x, capacity) = FRAGMENTATION_FRACTION * x + reserve(capacity), unrolled
    # (tests/test_cost_estimate_fast.py checks it against margin_bytes)
    reserve = margin_bytes(0.0, capacity)
    margins = [FRAGMENTATION_FRACTION * x + reserve for x in tens]
    totals = list(map(add, tens, margins))
    posts_u = [_post(rk, sharding, m) for rk in cols.uniq]
    tot_u = [p[0] + rk.tied + rk.opt_s + rk.offload_s for p, rk in zip(posts_u, cols.uniq, strict=True)]
    post_tot = cols.kind_of(tot_u)
    rp = post_tot.index(max(post_tot))  # the first rank with the largest post term
    step = T_pipe + post_tot[rp]

    rb = sim.busiest_rank
    R, P = lay.ranks[rb], lay.ranks[rp]
    idle = max(0.0, T_pipe - sim.busy_s[rb])
    pp_exp = min(idle, lay.crit_p2p)
    dpe, dpt, dpv = cols.kind_of(posts_u)[rp]
    breakdown = {
        "compute_forward_s": m * R.f_c, "compute_backward_s": m * R.b_c, "recompute_s": m * R.rec,
        "tp_comm_s": m * R.tp_s, "dp_comm_s": m * R.fsdp_s + dpe, "pp_comm_s": pp_exp + P.tied,
        "bubble_s": idle - pp_exp, "optimizer_s": P.opt_s, "offload_s": P.offload_s,
    }
    comm_axes = {
        "tp": AxisCommEstimate(m * R.tp_vol, m * R.tp_s, m * R.tp_s),
        "dp": AxisCommEstimate(dpv, dpt, m * R.fsdp_s + dpe),
        "pp": AxisCommEstimate(m * R.pp_vol, m * R.pp_t + P.tied, pp_exp + P.tied),
    }
    worst = totals.index(max(totals))  # the first rank with the largest peak
    W = lay.ranks[worst]
    memory = {"parameters": W.param_b, "gradients": W.grad_b, "optimizer": W.opt_b, "activations": acts[worst],
              "transient": dyn[worst] - acts[worst], "margin": margins[worst]}
    peak_mem = totals[worst]
    samples = mb * m * dp
    model_flops = ctx.model_flops_per_sample * samples
    hw_flops = lay.flops_per_mb * tp * m * dp
    peak = peak_flops_per_s(hw, ctx.dtype) * world
    inv = 1.0 / step if step > 0 else 0.0
    return StepEstimate(
        step_time_s=step, fits=peak_mem <= capacity, peak_memory_bytes=peak_mem, memory_capacity_bytes=capacity,
        memory_bytes=memory, memory_per_rank_bytes=tuple(totals),
        memory_by_rank_raw=tuple(zip(cols.param, cols.grad, cols.opt, acts, map(sub, dyn, acts), margins,
                                     strict=True)),
        worst_rank=worst, time_breakdown_s=breakdown,
        comm=comm_axes, bubble_fraction=(idle - pp_exp) * inv, mfu=model_flops * inv / peak,
        hfu=hw_flops * inv / peak, samples_per_s=samples * inv, tokens_per_s=samples * graph.tokens_per_sample * inv,
        model_flops_per_step=model_flops, hardware_flops_per_step=hw_flops, stage_times_raw=lay.times,
        peak_in_flight=sim.peak_in_flight, notes=lay.notes,
    )


def _share_cores(graph: ModelGraph, k: Knobs, stages, hw: HardwareSpec, train: TrainSpec) -> StepEstimate:
    """More processes than cores (cost_models.sharedhost): the critical path at per-core speed,
    or the host's CPU work over its cores plus the lockstep communication, whichever is longer."""
    hw_u = sharedhost.unshared(hw)
    e = estimate_knobs(graph, k, stages, hw_u, train)
    lay, _ = _layout_for(context(graph, hw_u, train), graph, k, stages, hw_u)
    m = k.num_micro_batches

    def work(ranks) -> list[float]:
        return [m * (rk.f_c + rk.b_c + rk.rec) + rk.opt_s + rk.offload_s for rk in ranks]

    if k.pp == 1:
        lockstep = max(0.0, e.step_time_s - work(lay.ranks)[0])
    else:
        lockstep = min(_post(rk, k.sharding, m)[0] + rk.tied for rk in lay.ranks)
    # the CPU work, timed with every core busy (shared caches and memory system)
    hw_c = sharedhost.contended(hw)
    lay_c, _ = _layout_for(context(graph, hw_c, train), graph, k, stages, hw_c)
    total = sum(work(lay_c.ranks)) * k.dp * k.tp
    step = sharedhost.shared_step_s(e.step_time_s, total, hw.shared_cores * hw.num_nodes, lockstep)
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
