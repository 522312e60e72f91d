"""Pipeline parallelism: run a Plan's stages with torch.distributed.pipelining schedules.

`build_pipeline(model, plan, pp_mesh_or_group, *, loss_fn, example_inputs, device, apply_fn)`
cuts the model into `pp * virtual_stages` stages (runtime.pipeline_split: torch.fx graph, split at
the BEGINNING of each stage's first block, original block modules kept), keeps this rank's
stages, lets `apply_fn` wrap each (tensor parallel, activation checkpointing, DDP/FSDP over the dp
sub-mesh), wraps each in a plain `PipelineStage` and builds the plan's schedule. No schedule or
send/recv of our own: only the tied-parameter gradient sum and the loss broadcast below are ours.

Schedules (plan.pipeline.schedule -> torch class, stage placement on pp rank r of P, v = virtual_stages):
    gpipe             -> ScheduleGPipe                  stage r
    1f1b              -> Schedule1F1B                   stage r           (needs micro-batches >= P)
    interleaved_1f1b  -> ScheduleInterleaved1F1B        stages r, r+P, .., r+(v-1)P  (loop style)
    zero_bubble       -> ScheduleInterleavedZeroBubble  stages r, r+P, .., r+(v-1)P  (loop style;
                         ZB-H1-like with split input/weight backward; v = 1 is allowed). The V-shape
                         ZBVZeroBubble (stages r and 2P-1-r) is not what a plan's zero_bubble means.
For the interleaved schedules torch requires n_microbatches % max(1, n_microbatches // P) == 0.
FIELD-NOTES: `Pipe.build_stage()` fails with V-shape schedules on gloo; plain PipelineStage
(what this module builds) works with every schedule.

Loss contract: `loss_fn(output, target)` is called once per micro-batch on the last stage and
must return the MEAN loss over that micro-batch (as F.cross_entropy / F.mse_loss do). The
schedules are built with `scale_grads=True`: torch divides every stage's gradients by
n_microbatches after the last backward (`_PipelineStageBase.scale_grads`), so with equal-sized
micro-batches the gradient equals that of the full-batch mean loss, and `step` returns the mean of
the micro-batch losses, i.e. the full-batch mean loss. (A model with BatchNorm in training mode
normalises per micro-batch, as gradient accumulation does.) Under PP x DP, DDP/FSDP average over
the dp replicas as usual; `step` returns this replica's loss.

Tied parameters: pipeline_split gives each later stage its own copy of a parameter several
stages use (GPT's embedding / LM head). After each step's backward, `step` sums the copies'
gradients with one all-reduce per tied parameter over the pp group (ranks without a copy add
zeros), so every copy gets the single-process gradient and, stepped by the same optimizer, stays
equal to the others. Under TP (and FSDP2) the copies are DTensors; the sum runs on local shards,
each gradient first laid out like its parameter (the vocab-parallel embedding's and the colwise
head's weights are both Shard(0) over tp, so the pp peers hold matching shards). After materialising a meta-built model, call
`runner.sync_tied_parameters()` so that the copies start from the first stage's values.

PP x DP: apply_fn wraps each stage for the dp sub-mesh. FSDP2 `fully_shard` works with every
schedule; DDP only with one stage per rank and no activation checkpointing in it (see
`_refuse_ddp_double_backward`, which refuses the rest with a SpecError).

`step(inputs, targets) -> loss` returns the loss on EVERY pp rank (broadcast from the rank that
holds the last stage, a 0-d float64 tensor), so one training loop can log it anywhere. With
loss_parallel the last stage's micro-batch losses are DTensors; they are made plain (full_tensor,
a collective over tp in the same order on every tp rank) before the broadcast. `eval(inputs,
targets)` is the same without backward (torch's schedule.eval; the gradients are left as they
were, see its docstring), and `norm_parameters()` lists the parameters whose gradients make the
model's global norm (each tied parameter once over the pipeline), for runtime.training's clipping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.tensor import DTensor

from runtime.pipeline_split import (
    SplitModel,
    TiedParam,
    clean_param_name,
    split_model,
    validate_split,
)
from runtime.training import reshard_fsdp
from specs import Plan, SpecError

__all__ = [
    "PipelineRunner", "SCHEDULES", "build_pipeline", "local_stage_indices", "validate_pipeline",
]

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zero_bubble": ScheduleInterleavedZeroBubble,
}
_MULTI_STAGE = ("interleaved_1f1b", "zero_bubble")


def local_stage_indices(schedule: str, pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """Global stage indices that pp rank `pp_rank` runs: loop style, r, r+P, ..., r+(v-1)P."""
    if schedule not in _MULTI_STAGE and virtual_stages != 1:
        raise SpecError(f"pipeline.virtual_stages: {virtual_stages} needs interleaved_1f1b or zero_bubble")
    return [pp_rank + k * pp for k in range(virtual_stages)]


def validate_pipeline(model: nn.Module, plan: Plan) -> None:
    """Raise SpecError if `plan.pipeline` cannot run on `model`; pure, call before any collective."""
    validate_split(model, plan)
    p, pp = plan.pipeline, plan.mesh.pp
    n = p.num_micro_batches
    if p.schedule not in SCHEDULES:
        raise SpecError(f"pipeline.schedule: {p.schedule!r}; known: {', '.join(SCHEDULES)}")
    sharding = plan.data_parallel.sharding
    if p.schedule == "zero_bubble" and pp > 1 and plan.mesh.dp > 1 and sharding in ("zero3", "hsdp"):
        # ScheduleInterleavedZeroBubble runs each backward as an input part and a later weight
        # part; with FSDP2 resharding parameters after forward (zero3, hsdp) the weight part's
        # gradients are wrong: pp=2 x dp=2 zero3 drifted from one process by 5e-2 in three steps
        # (tests/coverage_cases.py), with no error. zero2 (no resharding) and DDP match.
        raise SpecError(
            f"pipeline.schedule: zero_bubble with data_parallel.sharding {sharding} trains to wrong "
            f"numbers (FSDP2 reshards parameters between the split input and weight backward); "
            f"use sharding zero2, or schedule 1f1b / interleaved_1f1b"
        )
    if p.schedule == "1f1b" and n < pp:
        raise SpecError(
            f"pipeline.num_micro_batches: 1f1b needs at least pp({pp}) micro-batches (got {n}); "
            f"raise num_micro_batches or use gpipe"
        )
    if p.schedule in _MULTI_STAGE:
        rounds = max(1, n // pp)  # torch's ScheduleInterleaved1F1B / InterleavedZeroBubble rule
        if n % rounds:
            raise SpecError(
                f"pipeline.num_micro_batches: {p.schedule} runs micro-batches in rounds of pp({pp}); "
                f"num_micro_batches({n}) % rounds({rounds}) = {n % rounds}; use a multiple of {pp}"
            )


def _resolve_group(pp_mesh_or_group) -> dist.ProcessGroup:
    if isinstance(pp_mesh_or_group, DeviceMesh):
        if pp_mesh_or_group.ndim != 1:
            raise ValueError(f"build_pipeline: pass the 1-D pp sub-mesh (got a {pp_mesh_or_group.ndim}-D mesh)")
        return pp_mesh_or_group.get_group()
    if pp_mesh_or_group is None:
        return dist.group.WORLD
    return pp_mesh_or_group


def _refuse_ddp_double_backward(mod: nn.Module, num_local_stages: int) -> None:
    """DDP inside torch pipelining (torch 2.14, gloo, measured in tests/dist_pipeline_cases.py):
    with two stages on a rank (interleaved/zero_bubble v>1) or activation checkpointing in the
    stage, the 2nd step fails in DDP's Reducer._rebuild_buckets ("rebuilt parameter indices size
    is not same as original model parameters size"), and static_graph=True runs but gives wrong
    gradients. Refuse it here, before any step, instead of failing (and hanging peers) mid-run."""
    if not isinstance(mod, nn.parallel.DistributedDataParallel):
        return
    ckpt = any(type(m).__name__ == "CheckpointWrapper" for m in mod.modules())
    if num_local_stages > 1 or ckpt:
        why = f"{num_local_stages} stages per rank" if num_local_stages > 1 else "activation checkpointing"
        raise SpecError(
            f"data_parallel.sharding: none (DDP) does not work inside a pipeline stage with {why} "
            f"(DDP's reducer fails at the 2nd step); use FSDP2 (zero2/zero3) for pp x dp here"
        )


class PipelineRunner:
    """This rank's pipeline stages and their schedule. Built by `build_pipeline`."""

    def __init__(
        self,
        plan: Plan,
        group: dist.ProcessGroup,
        stage_indices: list[int],
        stage_modules: list[nn.Module],
        stages: list[PipelineStage],
        schedule,
        tied: list[TiedParam],
    ):
        self.plan = plan
        self.group = group
        self.pp_rank = dist.get_rank(group)
        self.stage_indices = stage_indices
        self.stage_modules = stage_modules
        self.stages = stages
        self.schedule = schedule
        self.tied = tied
        num_stages = len(plan.pipeline.stages)
        self.is_first = 0 in stage_indices
        self.is_last = num_stages - 1 in stage_indices
        # pp rank that owns the last stage (loop style: P-1).
        self.last_rank = (num_stages - 1) % plan.mesh.pp

    # ------------------------------------------------------------------ parameters
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Local parameters by the model's own names (wrapper prefixes removed)."""
        for mod in self.stage_modules:
            for name, p in mod.named_parameters():
                yield clean_param_name(name), p

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    def _local_copies(self, tp: TiedParam) -> list[nn.Parameter]:
        out = []
        for s, mod in zip(self.stage_indices, self.stage_modules, strict=True):
            if s in tp.names:
                found = [p for n, p in mod.named_parameters() if clean_param_name(n) == tp.names[s]]
                if len(found) != 1:
                    raise RuntimeError(f"tied parameter {tp.names[s]!r} not found once in stage {s} after apply_fn")
                out.append(found[0])
        return out

    @staticmethod
    def _local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t  # DTensor (FSDP2/TP) -> this rank's shard

    @staticmethod
    def _local_grad(p: nn.Parameter) -> torch.Tensor:
        """This rank's shard of p.grad laid out like p itself. Under TP a tied copy's gradient can
        come back in another layout than its parameter (the vocab-parallel embedding's is
        Replicate over tp, the full vocabulary); redistributing it (a collective over p's mesh,
        the same on every rank of it) makes the shards of the first and last stage line up."""
        g = p.grad
        if isinstance(p, DTensor) and isinstance(g, DTensor) and tuple(g.placements) != tuple(p.placements):
            g = g.redistribute(p.device_mesh, p.placements)
        return g.to_local() if isinstance(g, DTensor) else g

    def _shard_shapes(self) -> list[tuple[int, ...]]:
        """Per tied parameter, the shape of this rank's shard of it. A pp rank without a copy
        (pp > 2: a middle stage) learns it from the ranks that have one (one all_gather_object over
        the pp group at the first call: pp peers share their dp and tp coordinates, so every
        holder's shard has the same shape). Copies sharded differently on two stages (the tied
        modules got different TP styles) are refused with a SpecError on every rank."""
        if getattr(self, "_shapes", None) is None:
            mine = []
            for tp in self.tied:
                copies = self._local_copies(tp)
                mine.append(sorted({tuple(self._local(p).shape) for p in copies}))
            every: list = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(every, mine, group=self.group)
            shapes = []
            for i, tp in enumerate(self.tied):
                found = sorted({s for rank in every for s in map(tuple, rank[i])})
                if len(found) != 1:
                    raise SpecError(
                        f"tensor_parallel.styles: the tied parameter {sorted(tp.names.values())} is sharded "
                        f"differently on its stages (local shards {found}); give the tied modules matching "
                        f"styles (vocab on the embedding, colwise on the head) or none"
                    )
                shapes.append(found[0])
            self._shapes = shapes
        return self._shapes

    @torch.no_grad()
    def sync_tied_gradients(self) -> None:
        """Sum the gradients of each tied parameter's copies over the pp group (in place).

        Works on local shards: a copy's gradient is first laid out like its parameter
        (`_local_grad`); the first and last stage's copies are sharded alike (TP shards the
        vocab-parallel embedding and the colwise head both on dim 0, FSDP2 shards dim 0 over dp;
        `_shard_shapes` checks it), so equal shards sit on the pp peers and one all-reduce over
        the pp group sums them. Ranks without a copy add zeros."""
        shapes = self._shard_shapes()
        device = self.stages[0].device
        for tp, shape in zip(self.tied, shapes, strict=True):
            copies = self._local_copies(tp)
            grads = [self._local_grad(p) for p in copies if p.grad is not None]
            total = torch.zeros(shape, dtype=tp.dtype, device=device)
            for g in grads:
                total += g
            dist.all_reduce(total, group=self.group)
            for p in copies:
                if isinstance(p, DTensor):
                    p.grad = DTensor.from_local(total.clone(), p.device_mesh, p.placements,
                                                shape=p.shape, stride=p.stride())
                else:
                    p.grad = total.clone()

    @torch.no_grad()
    def sync_tied_parameters(self) -> None:
        """Copy each tied parameter's value from its first stage to the other copies (shard by
        shard: the copies are sharded alike, see sync_tied_gradients)."""
        shapes = self._shard_shapes()
        for tp, shape in zip(self.tied, shapes, strict=True):
            first = min(tp.names)
            src = first % self.plan.mesh.pp
            copies = self._local_copies(tp)
            buf = (torch.zeros(shape, dtype=tp.dtype, device=self.stages[0].device)
                   if not copies else self._local(copies[0]).clone())
            dist.broadcast(buf, group=self.group, group_src=src)
            for p in copies:
                self._local(p).copy_(buf)

    # ------------------------------------------------------------------ training
    def step(self, inputs, targets) -> torch.Tensor:
        """One forward+backward over the plan's micro-batches (no optimizer step).

        Args:
            inputs: the replica's batch (tensor or tuple of tensors, dim 0 = micro_batch_size *
                num_micro_batches); only read on the rank holding the first stage.
            targets: the batch's targets; only read on the rank holding the last stage.
        Returns:
            The mean micro-batch loss (a 0-d float64 tensor, detached) on every pp rank.
        """
        args, kwargs = self._schedule_args(inputs, targets)
        self.schedule.step(*args, **kwargs)
        if self.tied:
            self.sync_tied_gradients()
        return self._broadcast_loss(kwargs.get("losses"))

    def _schedule_args(self, inputs, targets) -> tuple[tuple, dict]:
        """The schedule's positional inputs (first stage only) and its target and loss list (last
        stage only)."""
        p = self.plan.pipeline
        want = p.micro_batch_size * p.num_micro_batches
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        kwargs: dict = {}
        if self.is_first:
            got = args[0].shape[0]
            if got != want:
                raise ValueError(
                    f"pipeline step: batch of {got} samples, but the plan runs micro_batch_size"
                    f"({p.micro_batch_size}) * num_micro_batches({p.num_micro_batches}) = {want} per replica"
                )
        else:
            args = ()
        if self.is_last:
            kwargs["target"] = targets
            kwargs["losses"] = []
        return args, kwargs

    def eval(self, inputs, targets) -> torch.Tensor:
        """One forward-only pass over the plan's micro-batches (torch's `schedule.eval`, under
        no_grad): no backward, no gradient touched. Same arguments and return as `step`.

        torch 2.14 touches gradients in eval, measured with an eval between backward and optimizer
        step: it still ends with the stage's REDUCE_GRAD action, which divides every gradient by
        n_microbatches (halved at 2 micro-batches), so scale_grads is off for the eval; and the
        switch from train to eval re-runs the stages' metadata inference, whose cleanup sets the
        gradients of FSDP2 modules to None, so the gradients are put back after. FSDP2 leaves
        the root's parameters unsharded after a forward without backward; they are resharded.
        Each switch between train and eval costs torch one metadata-inference pass (a forward; a
        forward and backward on the way back to train).
        """
        args, kwargs = self._schedule_args(inputs, targets)
        grads = [(p, p.grad) for mod in self.stage_modules for p in mod.parameters()]
        scale, self.schedule.scale_grads = self.schedule.scale_grads, False
        try:
            with torch.no_grad():
                self.schedule.eval(*args, **kwargs)
        finally:
            self.schedule.scale_grads = scale
            reshard_fsdp(self.stage_modules)
            for p, g in grads:
                p.grad = g
        return self._broadcast_loss(kwargs.get("losses"))

    def norm_parameters(self) -> list[nn.Parameter]:
        """This rank's parameters with each tied parameter counted once over the pipeline (its copy
        on the first stage that holds it): the set whose gradients make the model's global norm."""
        skip = set()
        for tp in self.tied:
            first = min(tp.names)
            for s, mod in zip(self.stage_indices, self.stage_modules, strict=True):
                if s in tp.names and s != first:
                    skip |= {id(p) for n, p in mod.named_parameters() if clean_param_name(n) == tp.names[s]}
        return [p for p in self.parameters() if id(p) not in skip]

    def _broadcast_loss(self, losses: list | None) -> torch.Tensor:
        if self.is_last:
            # Under loss_parallel each micro-batch loss is a DTensor over the tp mesh:
            # full_tensor() (a collective over tp, whose ranks all hold this last stage and walk
            # the same micro-batches in order) turns it into the plain tensor broadcast needs.
            loss = torch.stack([
                (x.full_tensor() if isinstance(x, DTensor) else x).detach().to(torch.float64) for x in losses
            ]).mean()
        else:
            loss = torch.zeros((), dtype=torch.float64, device=self.stages[0].device)
        dist.broadcast(loss, group=self.group, group_src=self.last_rank)
        return loss


def build_pipeline(
    model: nn.Module,
    plan: Plan,
    pp_mesh_or_group: DeviceMesh | dist.ProcessGroup | None,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    device: torch.device | str = "cpu",
    apply_fn: Callable[[nn.Module], nn.Module] | None = None,
) -> PipelineRunner:
    """Split `model` by `plan.pipeline`, keep this pp rank's stages, build the schedule.

    Args:
        model: the whole model (modified in place; its non-local blocks are no longer referenced
            by the runner). May live on the meta device (materialise the stage modules after).
        plan: the Plan; its pipeline, mesh.pp and model.block_names are read.
        pp_mesh_or_group: the 1-D pp sub-mesh or its ProcessGroup (None: the world).
        loss_fn: loss_fn(output, target) -> mean loss of one micro-batch (see module docstring).
        example_inputs: example inputs (dim 0 = batch); only used when torch.fx cannot trace the
            model and torch.export splits it instead (shapes fixed at the micro-batch size).
        device: the device the stages run on.
        apply_fn: apply_fn(stage_module) -> module, called on each local stage before its
            PipelineStage is built (tensor parallel, checkpointing, DDP/FSDP over dp).
    Returns:
        The PipelineRunner.
    Raises:
        SpecError: the plan does not fit the model (raised on every rank, before any collective).
    """
    validate_pipeline(model, plan)
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        raise ValueError("build_pipeline: example_inputs must be a tuple of tensors")
    split: SplitModel = split_model(model, plan, example_inputs)
    group = _resolve_group(pp_mesh_or_group)
    pp = plan.mesh.pp
    if dist.get_world_size(group) != pp:
        raise SpecError(
            f"mesh.pp: the plan has pp={pp}, but the pp process group has {dist.get_world_size(group)} ranks"
        )
    rank = dist.get_rank(group)
    p = plan.pipeline
    indices = local_stage_indices(p.schedule, rank, pp, p.virtual_stages)
    num_stages = len(p.stages)
    device = torch.device(device)
    modules, stages = [], []
    for s in indices:
        mod = split.stage_modules[s]
        if apply_fn is not None:
            mod = apply_fn(mod)
        _refuse_ddp_double_backward(mod, len(indices))
        modules.append(mod)
        stages.append(PipelineStage(mod, s, num_stages, device, group=group))
    split.stage_modules = []  # drop the other ranks' stages
    cls = SCHEDULES[p.schedule]
    if p.schedule in _MULTI_STAGE:
        schedule = cls(stages, n_microbatches=p.num_micro_batches, loss_fn=loss_fn, scale_grads=True)
    else:
        schedule = cls(stages[0], n_microbatches=p.num_micro_batches, loss_fn=loss_fn, scale_grads=True)
    return PipelineRunner(plan, group, indices, modules, stages, schedule, split.tied)
