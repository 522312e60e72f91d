"""Per-layout terms of estimate_knobs: stage times and per-rank terms, cached for the search.

A candidate's estimate (cost_models.estimate) splits into what depends on its stage list, mesh
and data-parallel setting (here, computed once and cached per cost-model context) and what
depends on the schedule's simulation and the micro-batch count (per call):

- stage list (`_stage_list`, per (stages, tp, sp, micro-batch)): the block sums of each stage
  (cost_models.blocks.BlockCosts.stage_sum, one StageSum per composition, memoised per (first,
  last, recompute) for all stage lists of a setting), deduplicated: the stage results below are
  computed once per distinct (composition, last stage), not once per stage, and which pp ranks
  are alike is found once per stage list.
- stage results (`_stage`): per micro-batch F, B, W, p2p of a stage, with the exposed FSDP
  gathers / reduce-scatters (see estimate's docstring for the overlap model), cached by the
  StageSum and the sharding/link setting, and as a list per (stage list, setting), numbered by a
  never-reused id that memoises the simulations of those stage times. Each carries a small rank
  id that is the same with and without split backward: everything a rank's terms read (the sums,
  FSDP terms, p2p and B + W, bit-identical either way) is.
- per-rank terms (cost_models.ranks: `_ranks`, `_Rank`, `_Cols`): per kind of pp rank, shared
  between 1F1B and ZB-H1, as columns for the per-call pass over ranks.

All of it is the same arithmetic, in the same order, as computing each candidate from scratch
(tests/test_cost_estimate_fast.py: estimates do not depend on scoring order or cache sharing).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import count
from operator import itemgetter

from cost_models import comm
from cost_models.blocks import Context, block_costs_ctx, composition
from cost_models.ranks import _RID, _SUMS, _TIMES, _Cols, _fsdp_copies, _Rank, _rank_stages, _ranks
from specs import HardwareSpec, Knobs, ModelGraph, SpecError


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


_STAGE_IDS = count()  # ids of cached stage results etc. (never reused, so keys holding them stay unambiguous)
_P2P = itemgetter(3)  # of (F, B, W, p2p)
_GET_TIMES = itemgetter(_TIMES)


def _stage(ctx: Context, ss, split: bool, fsdp_n: int, fsdp_stride: int, last_stage: bool, pp_stride: int,
           reshard: bool, pipelined: bool = False, rec: str = "none", new: bool = False):
    """((F, B, W, p2p), StageSum, rank id, what the stage adds to its rank's sums) per micro-batch of
    the stage whose block sums are `ss`, cached by composition (not position); F and B include the
    exposed FSDP collectives and the host work: FSDP2's copies (`_fsdp_copies`) and, for
    a `pipelined` stage on a CPU host, the pipelining engine's time per action
    (hw.pipeline_action_overhead_s, once per forward and once per backward).
    `reshard`: FSDP gathers again in backward and reduce-scatters every micro-batch (zero3/hsdp);
    otherwise (zero2) it gathers in forward only and reduce-scatters once per step (after the
    pipeline). `new`: the caller has just looked it up and not found it. The rank id is the same
    with and without `split`: everything a rank's terms read
    (the sums, FSDP terms, p2p and B + W) is (B + W is bit-identical: (b + e) + w == (b + e + w) + 0.0)."""
    # one StageSum object per composition and (tp, sp, mb, rec) setting, kept alive by the context's
    # BlockCosts: its id stands for all of them
    key = (id(ss), split, fsdp_n, fsdp_stride, last_stage, pp_stride, reshard, pipelined)
    if not new:
        got = ctx.stage_cache.get(key)
        if got is not None:
            return got
    # what does not depend on `split` is computed once for both (1F1B and ZB-H1 share it)
    rkey = ("rid", id(ss), fsdp_n, fsdp_stride, last_stage, pp_stride, reshard, pipelined)
    core = ctx.stage_cache.get(rkey)
    if core is None:
        core = ctx.stage_cache[rkey] = _stage_core(ctx, ss, fsdp_n, fsdp_stride, last_stage, pp_stride, reshard,
                                                   pipelined, rec)
    fwd_exp, bwd_exp, copy_f, copy_b, c, rid, contrib = core
    F = ss.forward_s + fwd_exp + copy_f
    B = ss.backward_s + bwd_exp + copy_b + (0.0 if split else ss.weight_compute_s)
    W = ss.weight_compute_s if split else 0.0
    # the (F, B, W, p2p) the simulator takes and a small id shared by split and unsplit (cheap rank keys)
    got = ((F, B, W, c), ss, rid, contrib)
    if len(ctx.stage_cache) > 200_000:
        ctx.stage_cache.clear()
    ctx.stage_cache[key] = got
    return got


def _stage_core(ctx: Context, ss, fsdp_n: int, fsdp_stride: int, last_stage: bool, pp_stride: int, reshard: bool,
                pipelined: bool, rec: str) -> tuple:
    """_stage's terms that do not depend on split backward: (fsdp fwd exposed, fsdp bwd exposed,
    host work in forward, in backward, p2p, rank id, what the stage adds to its rank's sums in
    _ranks)."""
    fwd_exp = bwd_exp = fsdp_time = copy_f = copy_b = 0.0
    if fsdp_n > 1:
        nb = ss.num_blocks
        # the collectives and copies depend on the parameter count only (not on recompute or sp)
        fkey = ("fsdp", ss.num_params, nb, fsdp_n, fsdp_stride, reshard)
        got = ctx.stage_cache.get(fkey)
        if got is None:
            link = ctx.link(fsdp_n, fsdp_stride)
            ag = comm.all_gather_s(ss.num_params * ctx.bpp.compute / nb, link)  # bf16 copies under mixed precision
            rs = comm.reduce_scatter_s(ss.num_params * ctx.bpp.grad / nb, link) if reshard else 0.0
            got = ctx.stage_cache[fkey] = (ag, rs, *_fsdp_copies(ctx, ss.num_params / nb, nb, fsdp_n, reshard))
        ag, rs, copy_f, copy_b = got
        overlap = ctx.hw.comm_overlaps_compute  # False: nothing hides the gathers (all exposed)
        f_c = ss.forward_s if overlap else 0.0
        fwd_exp = ag + max(0.0, (nb - 1) * ag - f_c * (nb - 1) / nb)
        fsdp_time = nb * ag
        if reshard:
            b_c = ss.backward_s + ss.weight_compute_s if overlap else 0.0
            bwd_exp = ag + rs + max(0.0, (nb - 1) * (ag + rs) - b_c * (nb - 1) / nb)
            fsdp_time += nb * (ag + rs)
        elif pipelined:
            # zero2 in a pipeline: one gather (and its copies) per step, spread over the `pipelined`
            # micro-batches (see _stage's caller); measured on the CPU fidelity GPT, pp2 x dp2 1f1b
            # 4 micro-batches: zero2 cost 1.05x sharding none, predicted 1.32x with a gather each
            fwd_exp /= pipelined
            fsdp_time /= pipelined
            copy_f /= pipelined
    if pipelined and ctx.hw.device_is_host_cpu:
        copy_f += ctx.hw.pipeline_action_overhead_s
        copy_b += ctx.hw.pipeline_action_overhead_s
    c = 0.0
    if not last_stage:
        pkey = ("p2p", ss.output_bytes, pp_stride)
        c = ctx.stage_cache.get(pkey)
        if c is None:
            key_l = ("p2p", pp_stride)
            link = ctx.links.get(key_l)
            if link is None:
                link = ctx.links[key_l] = comm.p2p_link(ctx.hw, pp_stride)
            c = ctx.stage_cache[pkey] = comm.p2p_s(ss.output_bytes, link)
    # the first addition of _ranks' sums (0.0 + value); B + W is split-independent (see _stage)
    contrib = (0.0 + ss.num_params, ss.max_block_params, ss.output_bytes, ss.activation_bytes,
               0.0 + (ss.forward_compute_s + copy_f), 0.0 + (ss.backward_compute_s + ss.weight_compute_s + copy_b),
               0.0 + ss.recompute_s, 0.0 + (ss.tp_forward_s + ss.tp_backward_s), 0.0 + ss.tp_volume_bytes,
               0.0 + (fwd_exp + bwd_exp), 0.0 + fsdp_time,
               0.0 + (ss.backward_s + bwd_exp + copy_b + ss.weight_compute_s),
               0.0 + (0.0 if last_stage else 2 * ss.output_bytes), 0.0 + (0.0 if last_stage else 2 * c),
               ss.max_working_bytes if rec != "none" else -1.0)
    return fwd_exp, bwd_exp, copy_f, copy_b, c, next(_STAGE_IDS), contrib


@dataclass(slots=True)  # not frozen (see _Rank)
class _Layout:
    times: tuple[tuple[float, float, float, float], ...]
    ranks: tuple[_Rank, ...]
    cols: _Cols
    flops_per_mb: float  # per tp rank, all stages: fwd + bwd + recompute
    notes: tuple[str, ...]
    sims: dict  # (schedule, micro-batches) -> ScheduleResult (saves hashing the stage times again)
    st: tuple  # the stage result (_stage) of each stage
    pp: int
    times_id: int  # stands for `times` (the same stage results in the same pattern) in simulate_cached's memo

    @property
    def rank_stages(self) -> tuple[tuple[int, ...], ...]:
        return _rank_stages(self.pp, len(self.times))

    @property
    def crit_p2p(self) -> float:
        """Up to 2 sends per stage boundary: the warm-up and drain chains' p2p."""
        return 2 * sum(map(_P2P, self.times))

    @property
    def stage_sums(self) -> tuple:
        """The StageSum of each stage (block sums behind `times`)."""
        return tuple([x[_SUMS] for x in self.st])


@dataclass(slots=True)  # not frozen (see _Rank)
class _StageList:
    """A stage partition's block sums for one (tp, sp, micro-batch) setting: the distinct
    (StageSum, is last stage) pairs and, per stage, which one it is."""

    uid: int  # never reused (cache keys below hold it, not id())
    uniq: tuple[tuple[object, bool, str], ...]  # (StageSum, is last stage, recompute)
    pattern: tuple[int, ...]  # the same for every setting of the partition (layout._stage_shape)
    flops_per_mb: float  # per tp rank, all stages: fwd + bwd + recompute
    pick: object = None  # per-uniq list -> per-stage tuple (one C call), as `pattern` says


def _stage_list(ctx: Context, stages, tp: int, sp: bool, mb: int, sub: dict) -> _StageList:
    """`sub`: the caches of this stage list (hashed once per call)."""
    key = ("stages", tp, sp, mb)
    got = sub.get(key)
    if got is not None:
        return got
    shape = sub.get("shape")  # which stages are alike: the same for every setting
    if shape is None:
        shape = sub["shape"] = _stage_shape(ctx, stages)
    keys, pattern, pick = shape
    uniq = []
    costs: dict = {}  # recompute -> BlockCosts (one lookup per setting, not per stage)
    for comp, r, last, a, b in keys:
        bc = costs.get(r)
        if bc is None:
            bc = costs[r] = block_costs_ctx(ctx, tp, sp, mb, r)
        ss = bc.sums.get(comp)
        uniq.append((ss if ss is not None else bc.stage_sum(a, b), last, r))
    # per-tp-rank FLOPs summed over the stages in order
    flops = sum(pick([ss.fwd_flops + ss.bwd_flops + ss.recompute_flops for ss, _, _ in uniq]))
    got = sub[key] = _StageList(next(_STAGE_IDS), tuple(uniq), pattern, flops, pick)
    return got


def _stage_shape(ctx: Context, stages) -> tuple:
    """The distinct stages of a partition, whatever the setting: ((composition, recompute, is the
    last stage, first, last) per distinct stage in order of first occurrence, each stage's index
    into them, the call that spreads a per-distinct list over the stages). Stages alike (the same
    blocks by layer type, the same recompute, not the last) have the same block sums in any
    setting (BlockCosts.sums is keyed by composition); the last stage is apart (it sends nothing)."""
    index: dict = {}
    keys, pattern = [], []
    last_j = len(stages) - 1
    for j, (a, b, r) in enumerate(stages):
        comp = composition(ctx, a, b)
        if j == last_j:
            i = len(keys)
            keys.append((comp, r, True, a, b))
        else:
            i = index.get((comp, r))
            if i is None:
                i = index[(comp, r)] = len(keys)
                keys.append((comp, r, False, a, b))
        pattern.append(i)
    pick = itemgetter(*pattern) if len(pattern) > 1 else (lambda xs, _i=pattern[0]: (xs[_i],))
    return tuple(keys), tuple(pattern), pick


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
    # 0: no pipeline; else 1, or for zero2 the micro-batch count: inside a pipeline torch's stages
    # keep FSDP2's blocks unsharded from the first forward to the last backward (stage.py
    # backward_maybe_with_nosync), so zero2 (no resharding after forward) gathers once per step;
    # _stage_core spreads that one gather over the micro-batches (one key for every cache below)
    pipelined = 0 if pp == 1 else (k.num_micro_batches if fsdp_n > 1 and not reshard else 1)
    # the stage results of this stage list for this setting (none and zero1 share them), and their ids
    skey = (sl.uid, split, fsdp_n, pp_stride, reshard, pipelined)
    got = sub.get(skey)
    if got is None:
        cache = ctx.stage_cache
        res = []
        for ss, last, rec in sl.uniq:
            x = cache.get((id(ss), split, fsdp_n, tp, last, pp_stride, reshard, pipelined))  # _stage's key
            res.append(x if x is not None else _stage(ctx, ss, split, fsdp_n, tp, last, pp_stride, reshard,
                                                       pipelined, rec, True))
        # a never-reused id for the stage times this gives (the simulations' memo key)
        got = sub[skey] = (res, tuple([x[_RID] for x in res]), next(_STAGE_IDS))
    res, rids, times_id = got
    st = sl.pick(res)
    times = tuple(map(_GET_TIMES, st))
    accum = k.num_micro_batches > 1
    rkey = ("ranks", sl.uid, rids, pp, dp, tp, v, sharding, shard_n, k.offload, accum)
    got = ctx.stage_cache.get(rkey)
    if got is None:
        got = ctx.stage_cache[rkey] = _ranks(ctx, k, stages, st, sl, shard_n, accum, sub)
    ranks, cols, notes = got
    nkey = (notes, split, ctx.train.optimizer == "sgd")
    all_notes = _NOTES.get(nkey)
    if all_notes is None:
        more = list(notes)
        if split:
            more.append("zero_bubble modelled as ZB-H1 (v=1); activations counted until W (conservative)")
        if nkey[2]:
            more.append("sgd assumed with momentum (4 bytes/param of state)")
        all_notes = _NOTES[nkey] = tuple(dict.fromkeys(more))
    return _Layout(times, ranks, cols, sl.flops_per_mb, all_notes, {}, st, pp, times_id)


_NOTES: dict = {}  # (a layout's rank notes, split backward, sgd) -> its notes


def _layout_for(ctx: Context, graph: ModelGraph, k: Knobs, stages, hw: HardwareSpec) -> tuple[_Layout, str]:
    pp, dp, tp, v = k.pp, k.dp, k.tp, k.virtual_stages
    world = pp * dp * tp
    if world != ctx.num_devices:
        raise SpecError(f"knobs: tp({tp}) * pp({pp}) * dp({dp}) = {world}, but the hardware has {hw.num_devices} devices")
    sched = k.schedule if pp > 1 else "1f1b"
    stages = tuple(stages)
    # the caches of one stage list live in one dict under it (the stage list is hashed once)
    sub = ctx.stage_cache.get(stages)
    if sub is None:
        sub = ctx.stage_cache[stages] = {}
    # a layout does not depend on the micro-batch count (but whether there are several), except for
    # zero2 in a pipeline, whose one gather per step is spread over them (_layout's `pipelined`)
    per_step = k.num_micro_batches if pp > 1 and dp > 1 and k.sharding == "zero2" else k.num_micro_batches > 1
    key = ("layout", pp, dp, tp, v, k.sharding, k.hsdp_shard_size, k.offload, k.micro_batch_size,
           k.sequence_parallel, sched == "zero_bubble", per_step)
    lay = sub.get(key)
    if lay is None:
        ckey = ("checked", pp * v)  # the partition is checked once per stage count
        if ckey not in sub:
            _check_stages(graph, stages, pp * v)
            sub[ckey] = True
        lay = sub[key] = _layout(ctx, k, stages, sched, sub)
    return lay, sched
