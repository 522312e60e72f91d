"""Per-block costs for one (tp, sequence parallel, micro-batch size, recompute) setting.

`block_costs(graph, hw, train, *, tp, sequence_parallel, micro_batch_size, recompute)` is what
the planner's stage-partition DP and `estimate_knobs` consume. Everything is for ONE
micro-batch on ONE tensor-parallel rank, cached per layer type (repeated blocks share one
`BlockCost` object) and memoised by the CostModel (cost_models.model, seam 1):

- times: forward / backward (input grads + recompute + TP comm) / weight grads, from
  cost_models.compute; TP collectives from cost_models.comm.
- TP traffic (Megatron-LM, Shoeybi et al. 2019; Korthikanti et al. 2022 §4.2.2): each
  row-parallel op all-reduces its output in forward, each column group all-reduces its input
  grad in backward (one per row op), a vocab-parallel embedding all-reduces its output, a
  vocab-parallel output head its input grad. Sizes are the block's hidden state (b s h). With
  sequence parallelism each all-reduce becomes reduce-scatter + all-gather (ring time equal).
  All of it sits on the critical path (exposed). Full recompute repeats the forward ones.
- expert parallelism (ep > 1, cost_models.compute.expert_op_scaling for the experts' compute): per
  MoE layer one all-to-all sends the routed rows to their experts' ranks and one brings them back,
  in forward and again (their gradients) in backward; each rank sends N*k rows of the hidden size
  (N tokens per micro-batch, top-k, x `TrainSpec.expert_load_imbalance` on the busiest rank), of
  which 1/ep stays local (comm.all_to_all_s on the "ep" group's link). Exposed, like TP's: the
  experts wait for their rows, the next layer for their outputs. Full recompute repeats the
  forward pair. A rank holds 1/ep of the experts' parameters (`expert_params`).
- context parallelism (cp > 1): a rank holds 1/cp of every sample's tokens (load-balanced causal
  chunks), so every per-token term (compute, activations, TP and EP traffic, the boundary
  activation) is the micro-batch's / cp, and attention's GEMMs are 1/cp the size. Each fused
  attention layer all-gathers its keys and values over the cp group in forward (torch's
  context_parallel, rotate method "allgather", torchtitan's default), gathers them again and
  reduce-scatters their gradients in backward, exposed; the gathered keys and values stay saved
  for backward (stored activations + (1 - 1/cp) of them).
- memory: parameters per tp rank (split ops / tp, the rest replicated), activation bytes per
  in-flight micro-batch and the recompute working set (cost_models.memory; fused attention as
  the target's kernels keep it, `layer_saved_bytes`), boundary bytes.
- FLOPs per tp rank: forward, backward, recompute.

`BlockCosts` sums a stage (first..last) in O(number of layer types) with `stage(first, last)`:
from per-type prefix counts it gets the stage's composition (how many blocks of each layer
type) and sums count x cost per type, so equal compositions give bit-identical sums (and share
caches downstream).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from operator import attrgetter, sub
from typing import TYPE_CHECKING

from cost_models import comm
from cost_models.compute import TP_SPLIT, LayerCompute, layer_compute
from cost_models.memory import layer_activation_bytes
from specs import HardwareSpec, LayerType, ModelGraph, SpecError, TrainSpec

if TYPE_CHECKING:
    from cost_models.model import CostModel

Composition = tuple[tuple[int, ...], int]  # (blocks of each layer type, layer type of the last block)
# (layer-type index of each block, per type its prefix counts of blocks, those counts per position)
BlockTypes = tuple[tuple[int, ...], tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]


@dataclass(frozen=True, slots=True)
class BlockCost:
    """One block, one micro-batch, one tp rank. Times in seconds, sizes in bytes."""

    forward_compute_s: float
    backward_compute_s: float  # input-grad part (all of backward for ops without parameters)
    weight_compute_s: float  # weight-grad part
    recompute_s: float  # forward re-run before backward (full: whole block; selective: attention core)
    tp_forward_s: float  # exposed TP collectives in forward
    tp_backward_s: float  # ... in backward (and the re-run forward ones under full recompute)
    tp_volume_bytes: float  # bytes sent per rank on the tp axis, forward + backward
    num_params: float  # parameters held per tp rank (before data-parallel sharding)
    activation_bytes: float  # kept per in-flight micro-batch
    working_bytes: float  # transient while this block's backward runs (recompute)
    output_bytes: float  # boundary activation per micro-batch (pipeline p2p)
    fwd_flops: float
    bwd_flops: float
    recompute_flops: float
    tp_param_ops: float = 0.0  # ops whose parameters are DTensors under tp (optimizer overhead)
    param_ops: float = 0.0  # ops with parameters (all DTensors under FSDP2)
    ep_forward_s: float = 0.0  # expert parallelism's all-to-alls in forward (exposed)
    ep_backward_s: float = 0.0  # ... in backward (and the re-run forward ones under full recompute)
    ep_volume_bytes: float = 0.0  # bytes sent per rank on the ep group, forward + backward
    expert_params: float = 0.0  # of num_params: the experts' (1/ep of them), synced over expert_dp
    cp_forward_s: float = 0.0  # context parallelism's key/value all-gathers in forward (exposed)
    cp_backward_s: float = 0.0  # ... in backward: gather again + gradient reduce-scatter (+ re-run forward)
    cp_volume_bytes: float = 0.0  # bytes sent per rank on the cp group, forward + backward

    @property
    def forward_s(self) -> float:
        return self.forward_compute_s + self.tp_forward_s + self.ep_forward_s + self.cp_forward_s

    @property
    def backward_s(self) -> float:
        """Backward including recompute and TP/EP/CP comm, without the weight-grad part."""
        return (self.recompute_s + self.backward_compute_s + self.tp_backward_s + self.ep_backward_s
                + self.cp_backward_s)

    @property
    def weight_s(self) -> float:
        return self.weight_compute_s

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s + self.weight_s


_FIELDS = ("forward_compute_s", "backward_compute_s", "weight_compute_s", "recompute_s", "tp_forward_s",
           "tp_backward_s", "tp_volume_bytes", "num_params", "activation_bytes", "fwd_flops", "bwd_flops",
           "recompute_flops", "tp_param_ops", "param_ops", "ep_forward_s", "ep_backward_s", "ep_volume_bytes",
           "expert_params", "cp_forward_s", "cp_backward_s", "cp_volume_bytes")


@dataclass(frozen=True, slots=True)
class StageSum:
    """Sums of BlockCost fields over a range of blocks (same field names)."""

    forward_compute_s: float
    backward_compute_s: float
    weight_compute_s: float
    recompute_s: float
    tp_forward_s: float
    tp_backward_s: float
    tp_volume_bytes: float
    num_params: float
    activation_bytes: float
    fwd_flops: float
    bwd_flops: float
    recompute_flops: float
    tp_param_ops: float
    param_ops: float
    ep_forward_s: float
    ep_backward_s: float
    ep_volume_bytes: float
    expert_params: float
    cp_forward_s: float
    cp_backward_s: float
    cp_volume_bytes: float
    num_blocks: int
    output_bytes: float  # of the last block (what the stage sends)
    max_working_bytes: float
    max_block_params: float

    @property
    def forward_s(self) -> float:
        return self.forward_compute_s + self.tp_forward_s + self.ep_forward_s + self.cp_forward_s

    @property
    def backward_s(self) -> float:
        return (self.recompute_s + self.backward_compute_s + self.tp_backward_s + self.ep_backward_s
                + self.cp_backward_s)


@dataclass(frozen=True, slots=True)
class BlockCosts:
    """Per-block costs for one setting, with O(1) range sums for the stage-partition DP."""

    tp: int
    sequence_parallel: bool
    micro_batch_size: int
    recompute: str
    ep: int
    cp: int
    blocks: tuple[BlockCost, ...]
    by_layer_type: dict[str, BlockCost]
    type_costs: tuple[BlockCost, ...]  # per layer type, in type_counts order
    type_counts: tuple[tuple[int, ...], ...]  # per layer type: prefix counts of its blocks
    block_type: tuple[int, ...]  # layer-type index of each block
    max_working_bytes: float
    max_block_params: float
    sums: dict[Composition, StageSum]  # (composition, last type) -> StageSum
    by_range: dict[tuple[int, int], StageSum]  # (first, last) -> StageSum (the same object as by composition)
    position_counts: tuple[tuple[int, ...], ...] = ()  # type_counts transposed: per position, per type

    def composition(self, first: int, last: int) -> Composition:
        """(blocks of each layer type in first..last, layer type of the last block)."""
        counts = self.position_counts
        return tuple(map(sub, counts[last + 1], counts[first])), self.block_type[last]

    def stage(self, first: int, last: int) -> StageSum:
        """Sums over blocks first..last (inclusive); one object per composition."""
        got = self.by_range.get((first, last))
        if got is None:
            got = self.by_range[(first, last)] = self.stage_sum(first, last)
        return got

    def stage_sum(self, first: int, last: int) -> StageSum:
        """`stage` without the per-range memo (for a caller that keeps its own)."""
        key = self.composition(first, last)
        got = self.sums.get(key)
        if got is None:
            comp, last_type = key
            # per field, sum over the layer types present of (blocks x the type's value): the
            # additions sum() would do, in its order (0 + x is x for these non-negative values)
            vals: list[float] | None = None
            for n, cost in zip(comp, self.type_costs, strict=True):
                if n:
                    row = _FIELD_GETTER(cost)
                    vals = [n * x for x in row] if vals is None else [a + n * x for a, x in zip(vals, row, strict=True)]
            if vals is None:
                vals = [0] * len(_FIELDS)
            got = self.sums[key] = StageSum(**dict(zip(_FIELDS, vals, strict=True)), num_blocks=sum(comp),
                                            output_bytes=self.type_costs[last_type].output_bytes,
                                            max_working_bytes=self.max_working_bytes,
                                            max_block_params=self.max_block_params)
        return got

    def stage_time_s(self, first: int, last: int) -> float:
        """Forward + backward (+ weight) time of one micro-batch through blocks first..last."""
        s = self.stage(first, last)
        return s.forward_s + s.backward_s + s.weight_compute_s


_FIELD_GETTER = attrgetter(*_FIELDS)


def _check_tp(graph: ModelGraph, tp: int) -> None:
    for lt in graph.layer_types.values():
        for cand in lt.tp_candidates:
            if cand.divisor % tp:
                raise SpecError(
                    f"mesh.tp: tp={tp} does not divide {cand.kind} of layer type {lt.name!r} "
                    f"({cand.divisor}); pick a tp that divides it"
                )


def _check_ep(graph: ModelGraph, ep: int) -> None:
    for lt in graph.layer_types.values():
        for op in lt.ops:
            if op.experts is not None and op.experts.num_experts % ep:
                raise SpecError(
                    f"mesh.ep: ep={ep} does not divide the {op.experts.num_experts} experts of layer type "
                    f"{lt.name!r}; pick an ep that divides it"
                )


def _layer_cost(model: CostModel, lt: LayerType, tp: int, sp: bool, micro_batch: int, recompute: str, ep: int,
                cp: int = 1) -> BlockCost:
    g, hw = model.graph, model.hw
    sp = sp and tp > 1
    # per-token terms scale with the tokens a rank holds: 1/cp of the micro-batch's (module docstring)
    mb = micro_batch / cp if cp > 1 else micro_batch
    experts = [op.experts for op in lt.ops if op.experts is not None]
    ep = ep if experts else 1  # a dense layer is the same at any ep
    imbalance = model.train.expert_load_imbalance
    compute_key = ("layer compute", lt.name, tp, sp, mb, ep, cp)  # the same for every recompute setting
    layer_time: LayerCompute | None = model.block_memo.get(compute_key)
    if layer_time is None:
        layer_time = model.block_memo[compute_key] = layer_compute(lt, hw, precision=model.train.precision,
                                                                   traced_activation_dtype=g.activation_dtype,
                                                                   traced_param_dtype=g.param_dtype, tp=tp,
                                                                   sequence_parallel=sp, micro_batch_size=mb,
                                                                   curves=model.curves, ep=ep,
                                                                   expert_load_imbalance=imbalance, cp=cp)
    splittable = bool(lt.tp_candidates) and tp > 1
    # TP collectives (see module docstring)
    tp_f = tp_b = tp_vol = 0.0
    counts_key = ("op counts", lt.name)  # the layer type's, the same for every setting
    counts: tuple[int, int, int, float, float] | None = model.block_memo.get(counts_key)
    if counts is None:
        counts = model.block_memo[counts_key] = (
            sum(1 for op in lt.ops if op.tp_split == "row"),
            sum(1 for op in lt.ops if op.tp_split == "vocab" and op.kind == "embedding"),
            sum(1 for op in lt.ops if op.tp_split == "vocab" and op.kind != "embedding"),
            float(sum(1 for op in lt.ops if op.tp_split in TP_SPLIT and op.param_bytes > 0)),
            float(sum(1 for op in lt.ops if op.param_bytes > 0)),
        )
    n_row, n_vemb, n_vhead, n_tp_param_ops, n_param_ops = counts
    if splittable:
        link = model.group_link(tp, 1)
        hidden = lt.output_bytes_per_sample * mb * model.act_scale
        head_in = lt.input_bytes_per_sample * mb * model.act_scale
        if sp:
            coll = comm.all_gather_s(hidden, link) + comm.reduce_scatter_s(hidden, link)
            coll_in = comm.all_gather_s(head_in, link) + comm.reduce_scatter_s(head_in, link)
        else:
            coll = comm.all_reduce_s(hidden, link)
            coll_in = comm.all_reduce_s(head_in, link)
        tp_f = (n_row + n_vemb) * coll
        tp_b = n_row * coll + n_vhead * coll_in
        tp_vol = (2 * n_row + n_vemb) * comm.all_reduce_volume_bytes(hidden, tp) + n_vhead * comm.all_reduce_volume_bytes(head_in, tp)
    forward_compute, backward_compute = layer_time.forward_s, layer_time.input_grad_s
    n_tp_ops = 0.0
    overhead = hw.dtensor_overhead
    if splittable and overhead is not None and hw.device_is_host_cpu:
        # DTensor's host time per tensor-parallel op (specs.DTensorOverhead), on the CPU that also
        # computes (a GPU's host dispatch runs ahead of its kernels: not charged there)
        n_tp_ops = n_tp_param_ops
        forward_compute += n_tp_ops * overhead.forward_s
        backward_compute += n_tp_ops * overhead.backward_s
    # expert parallelism's all-to-alls (module docstring)
    ep_f = ep_b = ep_vol = 0.0
    if ep > 1:
        link = model.group_link(ep, tp)  # the ep group: consecutive dp ranks, tp apart (specs.MeshDims)
        for e in experts:
            rows = e.routed_rows_per_sample * mb * imbalance * e.hidden * model.act_isz
            pair = 2 * comm.all_to_all_s(rows, link) + comm.all_to_all_s(8.0 * e.num_experts, link)  # + counts
            ep_f += pair
            ep_b += 2 * comm.all_to_all_s(rows, link)
            ep_vol += 4 * comm.all_gather_volume_bytes(rows, ep)  # (ep-1)/ep of each send leaves the rank
    # context parallelism's key/value all-gathers (module docstring)
    cp_f = cp_b = cp_vol = kv_gathered = 0.0
    fa = lt.fused_attention
    if cp > 1 and fa is not None and fa.kv_bytes_per_sample > 0:
        link = model.group_link(cp, tp)  # the cp group: tp apart (specs.MeshDims)
        kv = fa.kv_bytes_per_sample * micro_batch * model.act_scale / (tp if splittable else 1)  # whole sequence
        cp_f = comm.all_gather_s(kv, link)
        cp_b = comm.all_gather_s(kv, link) + comm.reduce_scatter_s(kv, link)
        cp_vol = 3 * comm.all_gather_volume_bytes(kv, cp)
        kv_gathered = kv * (1 - 1 / cp)  # kept for backward beyond the local 1/cp in the saved bytes
    if recompute == "full":
        rec_s, rec_fl = forward_compute, layer_time.fwd_flops
        tp_b += tp_f
        ep_b += ep_f
        cp_b += cp_f
    elif recompute == "selective":
        rec_s, rec_fl = layer_time.attention_core_forward_s, layer_time.attention_core_fwd_flops
    else:
        rec_s, rec_fl = 0.0, 0.0
    s = model.act_scale * mb
    saved_bytes = model.saved[lt.name]
    act = layer_activation_bytes(
        saved_bytes.saved * s + saved_bytes.fp32 * mb, saved_bytes.core * s + saved_bytes.fp32 * mb,
        saved_bytes.replicated * s, lt.input_bytes_per_sample * s,
        tp=tp, sequence_parallel=sp, recompute=recompute, splittable=splittable,
    )
    frac = model.split_fraction[lt.name] if splittable else 0.0
    params = lt.num_params * ((1 - frac) + frac / tp)
    expert_params = 0.0
    if experts:  # experts are not split by tp (whole on each tp rank); a rank holds 1/ep of them
        all_expert_params = float(sum(e.num_params for e in experts))
        expert_params = all_expert_params / ep
        params += expert_params - all_expert_params
    out_b = lt.output_bytes_per_sample * s / (tp if sp and splittable else 1)
    return BlockCost(
        forward_compute, backward_compute, layer_time.weight_grad_s, rec_s, tp_f, tp_b, tp_vol, params,
        act.stored_bytes + (kv_gathered if recompute != "full" else 0.0), act.working_bytes, out_b, layer_time.fwd_flops, layer_time.bwd_flops, rec_fl, n_tp_ops, n_param_ops,
        ep_forward_s=ep_f, ep_backward_s=ep_b, ep_volume_bytes=ep_vol, expert_params=expert_params,
        cp_forward_s=cp_f, cp_backward_s=cp_b, cp_volume_bytes=cp_vol,
    )



def block_types(model: CostModel) -> BlockTypes:
    """The graph's (layer-type index of each block, per type its prefix counts of blocks, those
    counts per position), layer types in the graph's order; the same for every setting."""
    shape: BlockTypes | None = model.block_memo.get("block types")
    if shape is None:
        names = list(model.graph.layer_types)
        block_type = tuple(names.index(b.layer_type) for b in model.graph.blocks)
        counts = tuple(tuple(accumulate((int(t == i) for t in block_type), initial=0)) for i in range(len(names)))
        shape = model.block_memo["block types"] = (block_type, counts, tuple(zip(*counts, strict=True)))
    return shape


def composition(model: CostModel, first: int, last: int) -> Composition:
    """BlockCosts.composition of blocks first..last without a setting (it is the graph's)."""
    block_type, _counts, position_counts = block_types(model)
    return tuple(map(sub, position_counts[last + 1], position_counts[first])), block_type[last]


def block_costs_of(model: CostModel, tp: int, sequence_parallel: bool, micro_batch_size: int, recompute: str,
                   ep: int = 1, cp: int = 1) -> BlockCosts:
    ep = ep if model.has_experts else 1
    key = (tp, bool(sequence_parallel and tp > 1), micro_batch_size, recompute, ep, cp)
    got: BlockCosts | None = model.block_memo.get(key)
    if got is not None:
        return got
    if tp < 1 or micro_batch_size < 1:
        raise SpecError(f"block_costs: tp ({tp}) and micro_batch_size ({micro_batch_size}) must be >= 1")
    if tp > 1:
        _check_tp(model.graph, tp)
    if ep > 1:
        _check_ep(model.graph, ep)
    by_type = {name: _layer_cost(model, lt, tp, key[1], micro_batch_size, recompute, ep, cp)
               for name, lt in model.graph.layer_types.items()}
    blocks = tuple(by_type[b.layer_type] for b in model.graph.blocks)
    names = list(by_type)
    block_type, counts, position_counts = block_types(model)
    got = BlockCosts(tp, key[1], micro_batch_size, recompute, ep, cp, blocks, by_type,
                     tuple(by_type[n] for n in names), counts, block_type,
                     max(b.working_bytes for b in blocks), max(b.num_params for b in blocks), {}, {},
                     position_counts)
    model.block_memo[key] = got
    return got


def block_costs(graph: ModelGraph, hw: HardwareSpec, train: TrainSpec, *, tp: int, sequence_parallel: bool,
                micro_batch_size: int, recompute: str, ep: int = 1, cp: int = 1) -> BlockCosts:
    """Per-block costs of `graph` for one micro-batch on one tp rank (see module docstring).

    Args:
        graph, hw, train: the model, the machine and the training setup (a CostModel of them is
            made for the call; hold a cost_models.CostModel to reuse its memos).
        tp: tensor-parallel degree (must divide every TP candidate's divisor).
        sequence_parallel: split norms/dropout along the sequence (ignored when tp == 1).
        micro_batch_size: samples per micro-batch.
        recompute: "none", "selective" or "full" for every block.
        ep: expert-parallel degree (divides every MoE layer's experts; no effect on dense layers).
        cp: context-parallel degree (each rank holds 1/cp of every sample's tokens).
    Returns:
        BlockCosts: `.blocks[i]` is block i's BlockCost; `.stage(first, last)` sums a range.
    """
    from cost_models.model import CostModel

    return CostModel(graph, hw, train).block_costs(tp, sequence_parallel, micro_batch_size, recompute, ep, cp)
