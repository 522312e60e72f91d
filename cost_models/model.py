"""CostModel: the cost model of one (model graph, hardware, training setup), as one object.

    cm = CostModel(graph, hw, train)
    cm.estimate(knobs, stages) -> StepEstimate       one step of a candidate, term by term
    cm.lower_bound(knobs, stages) -> float           <= cm.estimate(...).step_time_s, no simulation
    cm.block_costs(tp, sp, mb, recompute, ep, cp)    per-block terms (the stage-partition DP's input)
    cm.estimate_plan(plan) -> StepEstimate           the same for a built Plan

The formulation, from the bottom up (each level a named value; the module that computes it):

    BlockCost   one block, one micro-batch, one tp rank    cost_models.blocks  (compute, comm, memory)
    StageSum    BlockCosts summed over a stage's blocks     cost_models.blocks
    StageTerms  a stage's F, B, W, p2p with the data-       cost_models.stages
                parallel engine's per-micro-batch work
    RankTerms   what one pp rank holds and does besides     cost_models.ranks
                its stages' times (states, buffers, the
                gradient sync, the optimizer step)
    ScheduleResult  the pipeline schedule played with the   cost_models.simulator
                stage times (step, busy, in-flight peaks)
    StepEstimate  pipeline + the worst rank's post-pipeline cost_models.estimate
                terms; memory peak of every rank

The object owns every memo; nothing is cached at module level, and a memo lives exactly as long
as its CostModel (the search holds one for its whole run). Memos sit at three seams:

1. block costs: `BlockCosts` per (tp, sp, micro-batch size, recompute, ep, cp), and what they are made
   of per layer type (`block_memo`);
2. stage terms per composition: one `StageSum` per (setting, blocks of each layer type), the
   `StageTerms` per (StageSum, data-parallel setting), the stage lists, layouts and rank terms
   built from them (`stage_memo`);
3. pipeline simulations: a compiled schedule per (schedule, pp, m, v) and a `ScheduleResult`
   per (those, stage times) (`simulation_memo`).

Pure memos: two CostModels give the same estimates, bit for bit, whatever was asked before
(tests/test_cost_model_object.py).

Shared hosts (more processes than cores, cost_models.sharedhost) are estimated through two
derived CostModels of the same graph and training setup: the hardware at per-core speed
(`unshared`) and with every core busy (`contended`), made on first use.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from itertools import count
from typing import TYPE_CHECKING, Any

from cost_models import comm, kernels, sharedhost
from cost_models.compute import TP_SPLIT, compute_dtype, itemsize
from cost_models.efficiency import curves_for
from cost_models.memory import bytes_per_param, layer_saved_bytes, margin_bytes
from specs import HardwareSpec, Knobs, LayerType, MeshDims, ModelGraph, Plan, SpecError, TrainSpec

# the compiled simulation kernel is worth loading (a fixed ~0.5 s CPU) for searches over this many
# devices or more (measured, benchmarks/plan_bench.py: gpt-1t on 3072 A100 plans in 2.6 s CPU with it,
# 8.2 s without; GPT-3 175B on 1024 A100 1.7 s vs 1.9 s; small spaces never repay the load)
KERNELS_FROM_DEVICES = 512

if TYPE_CHECKING:
    from cost_models.blocks import BlockCosts
    from cost_models.estimate import StepEstimate
    from cost_models.simulator import ScheduleResult, _Compiled


class CostModel:
    """The cost model of `graph` trained with `train` on `hw` (see the module docstring).

    `compiled`: play pipeline simulations with the compiled kernel (cost_models.kernels; the same
    results, bit for bit): True, False, or None to decide by the space's size (KERNELS_FROM_DEVICES)
    and only when its machine code is cached (a plan never waits for a compile)."""

    def __init__(self, graph: ModelGraph, hw: HardwareSpec, train: TrainSpec, *, compiled: bool | None = None):
        self.graph, self.hw, self.train = graph, hw, train
        # --- the three memos (module docstring); each holds values of several kinds, told apart by
        # the key's first field, so the readers annotate what they get back
        self.block_memo: dict[Hashable, Any] = {}
        self.stage_memo: dict[Hashable, Any] = {}
        self.simulation_memo: dict[Hashable, Any] = {}
        self._ids = count()  # never-reused numbers for memo keys (stage lists, stage-time sets)
        # --- constants of (graph, hw, train) every term reads
        self.curves = curves_for(hw)
        self.dtype = compute_dtype(train.precision)
        self.act_isz = itemsize(self.dtype)
        self.act_scale = itemsize(self.dtype) / itemsize(graph.activation_dtype)  # traced -> trained bytes
        self.par_scale = itemsize(self.dtype) / itemsize(graph.param_dtype)
        self.bpp = bytes_per_param(train.precision, train.optimizer)
        self.split_fraction = {name: _split_fraction(lt) for name, lt in graph.layer_types.items()}
        # saved activations as the target's attention kernels keep them (cost_models.memory)
        self.saved = {name: layer_saved_bytes(lt, hw.attention_kernel) for name, lt in graph.layer_types.items()}
        last = graph.layer(graph.num_blocks - 1)
        self.final_output_bytes = last.output_bytes_per_sample * self.act_scale
        self.model_flops_per_sample = graph.fwd_flops_per_sample + graph.bwd_flops_per_sample
        self.last_splittable = bool(last.tp_candidates)  # the last block (the head) can be tp-split
        # mixture-of-experts layers (specs.ExpertsInfo): expert parallelism applies to them
        self.num_experts = tuple(sorted({op.experts.num_experts for lt in graph.layer_types.values()
                                         for op in lt.ops if op.experts is not None}))
        self.has_experts = bool(self.num_experts)
        self.num_devices = hw.num_devices
        self.capacity = float(hw.device.memory_bytes)
        self.reserve = margin_bytes(0.0, self.capacity)  # the allocator margin's part that is not a fraction
        self.oversubscribed = sharedhost.oversubscribed(hw)
        if compiled is None:
            big = hw.num_devices >= KERNELS_FROM_DEVICES
            compiled = big and kernels.cache_ready()
            if big and not compiled:  # never compile in a plan: build the cache for the next one
                kernels.build_cache_in_background()
        self.compiled = bool(compiled) and kernels.load()
        self._unshared: CostModel | None = None
        self._contended: CostModel | None = None

    # ------------------------------------------------------------------ public API
    def block_costs(self, tp: int, sequence_parallel: bool, micro_batch_size: int, recompute: str,
                    ep: int = 1, cp: int = 1) -> BlockCosts:
        """Per-block costs for one micro-batch on one tp rank (cost_models.blocks.BlockCosts);
        `ep`: expert parallelism of the MoE layers' experts; `cp`: context parallelism."""
        from cost_models.blocks import block_costs_of

        return block_costs_of(self, tp, sequence_parallel, micro_batch_size, recompute, ep, cp)

    def estimate(self, knobs: Knobs, stages: Sequence[tuple[int, int, str]]) -> StepEstimate:
        """One step of `knobs` with `stages` = (first, last, recompute) per virtual stage
        (cost_models.estimate)."""
        from cost_models.estimate import estimate

        return estimate(self, knobs, stages)

    def lower_bound(self, knobs: Knobs, stages: Sequence[tuple[int, int, str]]) -> float:
        """A lower bound on `estimate(knobs, stages).step_time_s` without simulating the schedule."""
        from cost_models.estimate import lower_bound

        return lower_bound(self, knobs, stages)

    def estimate_plan(self, plan: Plan) -> StepEstimate:
        if plan.model.fingerprint != self.graph.fingerprint:
            raise SpecError(
                f"plan.model.fingerprint: the plan was made for model {plan.model.name!r} "
                f"({plan.model.fingerprint}), but this graph is {self.graph.name!r} ({self.graph.fingerprint}); re-plan"
            )
        return self.estimate(plan.knobs(), [(s.first, s.last, s.recompute) for s in plan.pipeline.stages])

    # ------------------------------------------------------------------ shared pieces
    def new_id(self) -> int:
        return next(self._ids)

    def link(self, mesh: MeshDims, group: str) -> comm.GroupLink:
        """The link one group of `mesh` communicates over (cost_models.comm.group_link)."""
        return self.group_link(*mesh.group(group))

    def group_link(self, size: int, stride: int) -> comm.GroupLink:
        key = ("link", size, stride)
        got: comm.GroupLink | None = self.stage_memo.get(key)
        if got is None:
            got = self.stage_memo[key] = comm.group_link(self.hw, size, stride)
        return got

    def p2p_link(self, stride: int) -> comm.GroupLink:
        key = ("p2p link", stride)
        got: comm.GroupLink | None = self.stage_memo.get(key)
        if got is None:
            got = self.stage_memo[key] = comm.p2p_link(self.hw, stride)
        return got

    def simulate(self, name: str, pp: int, m: int, v: int, times: Sequence[tuple[float, float, float, float]],
                 times_id: int) -> ScheduleResult:
        """The pipeline schedule played with `times` ((F, B, W, p2p) per virtual stage), memoised by
        `times_id` (a number from `new_id` that stands for exactly these times)."""
        from cost_models.simulator import compile_schedule, play

        key = (name, pp, m, v, times_id)
        got: ScheduleResult | None = self.simulation_memo.get(key)
        if got is None:
            skey = (name, pp, m, v)
            comp: _Compiled | None = self.simulation_memo.get(skey)
            if comp is None:
                comp = self.simulation_memo[skey] = compile_schedule(name, pp, m, v, compiled=self.compiled)
            got = self.simulation_memo[key] = play(comp, times, name == "zero_bubble", compiled=self.compiled)
        return got

    @property
    def unshared(self) -> CostModel:
        """This model on the hardware at per-core speed (cost_models.sharedhost.unshared)."""
        if self._unshared is None:
            self._unshared = CostModel(self.graph, sharedhost.unshared(self.hw), self.train, compiled=self.compiled)
        return self._unshared

    @property
    def contended(self) -> CostModel:
        """This model on the hardware with every core busy (cost_models.sharedhost.contended)."""
        if self._contended is None:
            self._contended = CostModel(self.graph, sharedhost.contended(self.hw), self.train, compiled=self.compiled)
        return self._contended


def _split_fraction(lt: LayerType) -> float:
    """Fraction of the layer's parameters that tensor parallelism splits."""
    total = sum(op.param_bytes for op in lt.ops)
    if total <= 0:
        return 1.0 if lt.tp_candidates else 0.0
    return sum(op.param_bytes for op in lt.ops if op.tp_split in TP_SPLIT) / total
