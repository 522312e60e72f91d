"""Per-rank terms of a layout (cost_models.layout): what one pp rank holds and does besides its
stages' times, computed once per kind of rank and spread over the ranks as columns.

- `_ranks` / `_Rank`: model states, transient buffers, optimizer step, the post-pipeline
  data-parallel pieces and per-micro-batch breakdown sums of one pp rank, computed once per kind
  of rank (ranks with the same stages, tied parameters and position class share one object;
  `_kinds` finds them once per stage list) and shared between 1F1B and ZB-H1.
- `_dp_terms`: the parts that depend only on the rank's parameter count and the data-parallel
  setting (sharded states, bucketed collectives, optimizer step, engine copies), shared across
  recompute, sequence parallelism and schedule.
- `_Cols`: the per-rank terms as columns, so estimate_knobs' pass over ranks is a few C-level
  maps; with the largest post-pipeline term (`_post`; it does not depend on the micro-batch count).
- `_fsdp_copies` / `_copy_s`: the engines' memory-bound copies (also charged per stage by
  cost_models.layout).

The same arithmetic, in the same order, as computing each candidate from scratch
(tests/test_cost_estimate_fast.py).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from functools import lru_cache
from operator import ge, itemgetter
from typing import TYPE_CHECKING

from cost_models import comm
from cost_models.blocks import Context
from cost_models.compute import copies_time_s, itemsize
from cost_models.efficiency import curves_for, memory_efficiency
from cost_models.engines import ALL_REDUCE_ENGINES, FSDP2_ENGINES, data_parallel_engine
from cost_models.memory import DDP_BUCKET_BYTES, optimizer_step_bytes_per_param, sharded_states
from specs import Knobs

if TYPE_CHECKING:
    from cost_models.layout import _StageList

# the fields of a stage result (cost_models.layout._stage): (F, B, W, p2p), StageSum, rank id,
# contribution to its rank's sums
_TIMES, _SUMS, _RID, _CONTRIB = 0, 1, 2, 3


@dataclass(slots=True)  # not frozen: built by the thousand, a frozen init costs 9x (internal, never mutated)
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
    step_copy_s: float  # data-parallel gradient copies once per step (DDP buckets, ZeRO-2's reduce-scatter input)


@dataclass(slots=True)  # not frozen (see _Rank)
class _Cols:
    """The per-rank terms as columns (one entry per pp rank), for the per-call pass over ranks."""

    kind_of: itemgetter  # rank -> index into uniq, as one call: kind_of(per_kind_list) -> per rank
    uniq: tuple[_Rank, ...]  # distinct _Rank objects, in order of first rank
    static: tuple[float, ...]  # parameters + gradients + optimizer states
    trans: tuple[float, ...]
    opt_tmp: tuple[float, ...] | None  # None where trans_covers_opt (not read then)
    acts: tuple[tuple[float, ...], ...]  # per virtual stage i of a rank: its stored bytes per micro-batch
    # the post-pipeline term (_post's exposed part + tied + step copies + optimizer + offload): it
    # does not depend on the micro-batch count, so its largest value and first rank are known here
    post_max: float
    post_rank: int
    # transient >= optimizer temporaries on every rank: then max(acts + transient, temporaries) is
    # acts + transient for any acts >= 0 (max's first argument where equal, as max returns it)
    trans_covers_opt: bool

    def column(self, name: str) -> tuple:
        """A _Rank field per rank (the breakdowns' columns, read once per detailed estimate)."""
        return self.kind_of([getattr(rk, name) for rk in self.uniq])


def _cols(uniq: list[_Rank], get, first_ranks: tuple[int, ...], sharding: str) -> _Cols:
    """Columns from the distinct ranks `uniq` (kinds in order of first rank, `first_ranks`); `get`
    spreads a per-kind list over the ranks."""
    trans_k = [rk.trans_b for rk in uniq]
    opt_k = [rk.opt_tmp_b for rk in uniq]
    covers = all(map(ge, trans_k, opt_k))
    post_k = [_post(rk, sharding, 1)[0] + rk.tied + rk.step_copy_s + rk.opt_s + rk.offload_s for rk in uniq]
    top = max(post_k)
    # the first rank with the largest post term: the first rank of the first kind that has it
    post_rank = first_ranks[post_k.index(top)]
    acts = tuple(get([rk.activation[i] for rk in uniq]) for i in range(len(uniq[0].activation)))
    return _Cols(get, tuple(uniq), get([rk.param_b + rk.grad_b + rk.opt_b for rk in uniq]), get(trans_k),
                 None if covers else get(opt_k), acts, top, post_rank, covers)


def _tied(ctx: Context, stages, pp: int, tp: int, pp_stride: int) -> tuple:
    """(tied parameters held per pp rank, their gradient all-reduce time per rank, notes) for the
    stage partition `stages` (what _ranks needs of the graph's tied blocks)."""
    graph = ctx.graph
    notes: list[str] = []
    tied_rank_params = [0.0] * pp
    tied_comm = [0.0] * pp
    if graph.tied_blocks and graph.tied_param_bytes > 0:
        firsts = [s_[0] for s_ in stages]
        tied_params = graph.tied_param_bytes / itemsize(graph.param_dtype)
        for a, b in graph.tied_blocks:
            ra, rb = (bisect_right(firsts, a) - 1) % pp, (bisect_right(firsts, b) - 1) % pp
            tsplit = ctx.split_fraction[graph.blocks[a].layer_type] if tp > 1 else 0.0
            local = tied_params * ((1 - tsplit) + tsplit / tp)
            if ra == rb:
                tied_rank_params[ra] += local
            else:
                t = 2 * comm.p2p_s(local * ctx.bpp.grad, comm.p2p_link(ctx.hw, pp_stride))
                tied_comm[ra] = max(tied_comm[ra], t)
                tied_comm[rb] = max(tied_comm[rb], t)
                notes.append("tied parameters on different pp ranks: a copy on each, gradients all-reduced")
    return tied_rank_params, tied_comm, tuple(notes)


def _ranks(ctx: Context, k: Knobs, stages, st, sl: _StageList, shard_n: int, accum: bool, sub: dict):
    """Per-rank terms (_Rank per pp rank, and as columns) and the tied-parameter notes. `st`: the
    stage results of stage list `sl`; `sub`: the caches of this stage list."""
    hw, train = ctx.hw, ctx.train
    pp, dp, tp, v = k.pp, k.dp, k.tp, k.virtual_stages
    S = pp * v
    mb = k.micro_batch_size
    sharding, bpp = k.sharding, ctx.bpp
    pp_stride = tp * dp
    tkey = ("tied", pp, tp, pp_stride)
    tied = sub.get(tkey)
    if tied is None:
        tied = sub[tkey] = _tied(ctx, stages, pp, tp, pp_stride)
    tied_rank_params, tied_comm, notes = tied
    last_block_split = ctx.last_splittable and tp > 1

    rank_stages = _rank_stages(pp, S)
    # ranks alike (same stages, tied parameters and sends; the last rank apart) share one _Rank,
    # computed once per kind from one of its ranks (everything read below is the kind's). (A memo
    # of kinds across stage lists was tried: it hit for 0.1% of a 175B search's kinds, 6% of a 1T
    # one's, and cost more than it saved.)
    kkey = ("kinds", v, tkey)  # which ranks are alike: the same for every setting of this stage list
    shape = sub.get(kkey)
    if shape is None:
        shape = sub[kkey] = _kinds(sl.pattern, pp, v, tied_rank_params, tied_comm)
    kind_rank, get, first_ranks = shape
    uniq = []
    # what every kind below reads of the setting
    dt_ov = hw.dtensor_overhead if hw.device_is_host_cpu else None
    engine = data_parallel_engine(k)  # what the runtime runs (cost_models.engines)
    offload = k.offload if engine == "fully_shard" else "none"  # the runtime offloads through FSDP2 only
    adam_tmp = train.optimizer in ("adam", "adamw") and offload == "none"
    overlap = hw.comm_overlaps_compute
    fsdp_dp = engine == "fully_shard"
    head_trans = ctx.final_output_bytes * mb * (1 + 2 * 4 / ctx.act_isz) / (tp if last_block_split else 1)
    for _kind, r in kind_rank:  # r: one rank of the kind
        js = rank_stages[r]
        # the stage sums this rank needs (the same additions, in the same order, as sum() over the
        # stages: each stage's contribution is its first addition, 0.0 + value, see _stage_core)
        if len(js) == 1:
            # (max(-1.0, x) of the loop below is x itself: these are >= 0, or -1.0 for "not recomputed")
            (n_params, big, out_max, act, f_c, b_c, rec_s, tp_s, tp_v, fsdp_s, fsdp_mb, window, pp_v, pp_t,
             recomputed) = st[js[0]][_CONTRIB]
            acts = (act,)
        else:
            n_params = f_c = b_c = rec_s = tp_s = tp_v = fsdp_s = pp_v = pp_t = window = fsdp_mb = 0.0
            big = out_max = recomputed = -1.0
            acts = []
            for j in js:
                (a_n, a_big, a_out, a_act, a_f, a_b, a_rec, a_tp, a_tpv, a_fs, a_fmb, a_win, a_ppv, a_ppt,
                 a_rc) = st[j][_CONTRIB]
                n_params += a_n
                big = max(big, a_big)
                out_max = max(out_max, a_out)
                acts.append(a_act)
                f_c += a_f
                b_c += a_b
                rec_s += a_rec
                tp_s += a_tp
                tp_v += a_tpv
                fsdp_s += a_fs
                fsdp_mb += a_fmb
                window += a_win
                pp_v += a_ppv
                pp_t += a_ppt
                recomputed = max(recomputed, a_rc)
        n_params -= tied_rank_params[r]
        dkey = ("dp", n_params, sharding, dp, shard_n, tp, k.offload)
        dterms = ctx.stage_cache.get(dkey)
        if dterms is None:
            dterms = ctx.stage_cache[dkey] = _dp_terms(ctx, n_params, k, shard_n)
        (states, opt_params, tot, last, ag, rs_tot, rs_last, grad_vol, fixed_vol, opt_s, off_s, exposes,
         step_copy) = dterms
        if dt_ov is not None:
            # the optimizer's host time per DTensor parameter (specs.DTensorOverhead): the
            # tensor-parallel ops' parameters, or all of them where FSDP2 holds them (its shards
            # are DTensors: zero2 / zero3 / hsdp, and `replicate` for dp with tp or pp)
            fsdp2 = engine in FSDP2_ENGINES
            n_dt = sum(st[j][_SUMS].param_ops if fsdp2 else st[j][_SUMS].tp_param_ops for j in js)
            opt_s += n_dt * dt_ov.optimizer_s
        trans = 0.0
        if engine in ALL_REDUCE_ENGINES:
            # DDP's bucket copies of the gradients (FSDP2's replicate: its all-reduce input, alike)
            trans += n_params * bpp.grad
            trans += n_params * bpp.working  # autocast's bf16 weight copies, saved for backward
        elif engine == "none":  # dp = 1: no wrapper, no gradient sync, whatever the sharding
            trans += n_params * bpp.working
        elif sharding == "zero2" or pp > 1:
            # FSDP2 without resharding: every local block stays unsharded from forward to backward,
            # and gradients accumulate unsharded until the last micro-batch syncs. Inside a pipeline
            # zero3/hsdp too: torch's stages keep every block unsharded after each backward but the
            # last and turn gradient sync off until then (set_reshard_after_backward(False),
            # set_requires_gradient_sync(False): torch/distributed/pipelining/stage.py
            # backward_maybe_with_nosync); measured on gpt-tiny pp2 x dp2 zero3 (4 gloo processes):
            # 8-12 of 18 block forwards found their parameters still unsharded from a backward
            trans += n_params * bpp.compute + big * bpp.grad
            if accum:
                trans += n_params * bpp.grad
            if sharding == "hsdp":
                trans += n_params * bpp.grad / shard_n  # replica all-reduce buckets
        else:  # zero3 / hsdp: two blocks unsharded (current + prefetched), one block's gradients
            trans += big * (2 * bpp.compute + bpp.grad)
            if sharding == "hsdp":
                trans += n_params * bpp.grad / shard_n  # replica all-reduce buckets
        if pp > 1:
            trans += 4 * out_max
        if S - 1 in js:
            trans += head_trans
        if recomputed >= 0:
            trans += recomputed
        opt_tmp = 4 * opt_params if adam_tmp else 0.0

        # the backward that hides the gradient sync; none where comm shares the compute cores
        if not overlap:
            window = 0.0
        fsdp_mb = fsdp_mb if fsdp_dp else 0.0
        ag_after = fixed_exp = fixed_time = 0.0
        if exposes:  # a bucketed all-reduce under the last backward (DDP, ZeRO-1, HSDP replicas)
            fixed_exp, fixed_time = max(last, tot - window), tot
            if sharding == "zero1":  # then the updated parameters are gathered (exposed)
                fixed_exp, fixed_time = fixed_exp + ag, tot + ag
        got = _Rank(
            tuple(acts), states.param, states.grad, states.optimizer, trans, opt_tmp,
            rs_tot, rs_last, window, ag_after, fixed_exp, fixed_time, fixed_vol, grad_vol, fsdp_mb, tied_comm[r],
            opt_s, off_s,
            f_c, b_c, rec_s, tp_s, tp_v, fsdp_s, pp_v, pp_t, step_copy,
        )
        uniq.append(got)
    cols = _cols(uniq, get, first_ranks, sharding)
    return get(uniq), cols, notes


def _kinds(pattern: tuple[int, ...], pp: int, v: int, tied_rank_params, tied_comm) -> tuple:
    """Ranks alike (the same stages, by index into the stage list's distinct stages, tied parameters
    and sends; the last rank apart): ((kind, one rank of it) per kind in order of first rank, the
    call that spreads a per-kind list over the ranks, each kind's first rank). Any rank of a kind
    gives its terms."""
    per_rank = pattern if v == 1 else list(zip(*[pattern[i * pp:(i + 1) * pp] for i in range(v)], strict=True))
    kinds = list(zip(per_rank, tied_rank_params, tied_comm, strict=True))
    kinds[-1] = (*kinds[-1], "last")
    rank_of = dict(zip(kinds, range(pp), strict=True))  # in order of first rank, each with its last rank
    pos = dict(zip(rank_of, range(len(rank_of)), strict=True))
    kind_of = list(map(pos.__getitem__, kinds))
    get = itemgetter(*kind_of) if len(kind_of) > 1 else (lambda xs, _i=kind_of[0]: (xs[_i],))
    first = dict(zip(reversed(kinds), range(pp - 1, -1, -1), strict=True))  # kind -> its first rank
    return tuple(rank_of.items()), get, tuple(map(first.__getitem__, rank_of))


def _dp_terms(ctx: Context, n_params: float, k: Knobs, shard_n: int) -> tuple:
    """The terms of a rank holding `n_params` parameters that depend only on that count and the
    data-parallel setting (cached per context; shared across recompute, sp and schedule):
    (states, optimizer parameters, bucketed all-reduce total and last bucket, ZeRO-1 parameter
    gather, ZeRO-2 reduce-scatter total and last bucket, per-micro-batch FSDP volume, fixed volume,
    optimizer step, offload, whether the all-reduce total/last apply)."""
    hw, bpp = ctx.hw, ctx.bpp
    dp, tp, sharding = k.dp, k.tp, k.sharding
    engine = data_parallel_engine(k)
    # the runtime offloads through FSDP2 only: at dp = 1 (no engine) nothing leaves the device
    offload = k.offload if engine == "fully_shard" else "none"
    states = sharded_states(n_params, bpp, sharding=sharding, dp=dp, hsdp_shard_size=shard_n, offload=offload)
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
    if offload == "cpu":
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
    step_copy = 0.0
    if engine in ALL_REDUCE_ENGINES:
        # DDP copies each gradient into its bucket and the reduced bucket back (read + write each
        # way; gradient_as_bucket_view off, PyTorch's default); FSDP2's replicate (tp or pp > 1)
        # copies them into one all-reduce input and out again alike
        step_copy = _copy_s(ctx, 4 * grad_bytes, 2 * max(1, math.ceil(grad_bytes / DDP_BUCKET_BYTES)))
    elif dp > 1 and sharding == "zero2":
        # the one reduce-scatter's copy-in (torch._chunk_cat of the accumulated unsharded gradients)
        step_copy = _copy_s(ctx, 2 * grad_bytes)
    return (states, opt_params, tot, last, ag, rs_tot, rs_last, grad_vol, fixed_vol, opt_s, off_s, exposes,
            step_copy)


def _fsdp_copies(ctx: Context, blk_params: float, nb: int, n: int, reshard: bool) -> tuple[float, float]:
    """(forward, backward) time of FSDP2's copies around its collectives, per micro-batch, for `nb`
    blocks of `blk_params` parameters sharded `n` ways: each all-gather copies the local shard into
    the all-gather input (foreach copy-in, cast to the compute dtype) and the gathered buffer out
    into the unsharded parameters (split_with_sizes_copy); each reduce-scatter (with `reshard`:
    every micro-batch) copies the unsharded gradients into its input (torch._chunk_cat). Read +
    write of each, memory-bound kernels on the compute stream (the CPU's cores on a CPU host)."""
    key = ("fsdp copies", blk_params, nb, n, reshard)
    got = ctx.stage_cache.get(key)
    if got is not None:
        return got
    bpp = ctx.bpp
    unsharded = blk_params * bpp.compute
    gather = _copy_s(ctx, 2 * unsharded / n) + _copy_s(ctx, 2 * unsharded)
    fwd = nb * gather
    bwd = nb * (gather + _copy_s(ctx, 2 * blk_params * bpp.grad)) if reshard else 0.0
    got = ctx.stage_cache[key] = (fwd, bwd)
    return got


def _copy_s(ctx: Context, n_bytes: float, kernels: int = 1) -> float:
    """compute.copies_time_s on the context's machine, memoised per (bytes, kernels)."""
    key = ("copy", n_bytes, kernels)
    got = ctx.stage_cache.get(key)
    if got is None:
        got = ctx.stage_cache[key] = copies_time_s(n_bytes, kernels, ctx.hw, curves_for(ctx.hw))
    return got


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
