"""`parallelize(model, plan)`: apply a Plan in one fixed, thin sequence, and `ParallelModel`, the
object the training loop talks to.

Sequence (torchtitan's order), with the Plan as the only input:
    checks (world size, block names, fingerprint) -> mesh -> pipeline split (pp > 1) ->
    per stage: tensor parallel -> activation checkpointing -> FSDP2/DDP -> materialise (meta) ->
    optimizer.

`ParallelModel.train_step(batch, loss_fn)` runs one optimizer step on this replica's batch of
micro_batch_size * num_micro_batches samples: without a pipeline it loops over the
micro-batches (gradient accumulation; DDP's no_sync / FSDP2's gradient sync off between them,
each micro-batch's loss scaled by 1/num_micro_batches); with one, the pipeline schedule runs
them. The same user loop serves every plan.

Batch convention: the global batch (plan.train.global_batch_size samples, identical on every
rank) is cut by `local_batch` into dp contiguous slices, slice i for the replicas with dp rank i.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.nn.parallel import DistributedDataParallel as DDP

from runtime.checkpointing import apply_activation_checkpointing
from runtime.data_parallel import (
    apply_data_parallel,
    build_optimizer,
    uses_fsdp,
    validate_data_parallel,
)
from runtime.mesh import Meshes, build_mesh, validate_world
from runtime.precision import PrecisionSetup, build_precision
from runtime.tensor_parallel import apply_tensor_parallel, resolve_styles
from specs import Plan, SpecError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
UNCHECKED_FINGERPRINT = "*"


def _planner_trace():
    try:
        from planner import trace  # being written alongside; guarded until it lands
    except ImportError:
        return None
    return trace


def validate_model(model: nn.Module, plan: Plan, example_inputs: Sequence[torch.Tensor] | None = None) -> list[str]:
    """Raise SpecError when `model` is not the model the plan was made for. Pure: no collectives.

    Checks that every block name exists, that tp styles name real modules (with dimensions tp
    divides), the pipeline split (stages cover the blocks; runtime.pipeline) when pp > 1, and
    the fingerprint (planner.trace) unless the plan's fingerprint is "*". Returns notes on
    checks that could not run.
    """
    notes = []
    names = dict(model.named_modules())
    blocks = plan.model.block_names
    # The tracer names a block that groups several small sibling modules "a+b" (e.g. HF's
    # "model.embed_tokens+model.rotary_emb"); each part must exist.
    missing = [b for b in blocks if b not in names and not all(part in names for part in b.split("+"))]
    if missing:
        raise SpecError(
            f"model.block_names: {', '.join(missing[:5])} not found in the model "
            f"({type(model).__name__} has top-level modules {', '.join(n for n in names if n and '.' not in n)}); "
            f"was the plan made for another model?"
        )
    if plan.mesh.tp > 1:
        resolve_styles(model, plan)
    if plan.mesh.pp > 1:
        from runtime.pipeline import validate_pipeline

        validate_pipeline(model, plan)
    fp = plan.model.fingerprint
    if fp == UNCHECKED_FINGERPRINT:
        notes.append("model fingerprint not checked (plan says '*')")
    elif (trace := _planner_trace()) is None:
        notes.append("model fingerprint not checked (planner.trace is not available)")
    elif example_inputs is None:
        notes.append("model fingerprint not checked (no example_inputs given)")
    else:
        graph = _trace_one(trace, model, tuple(example_inputs))
        if fp != graph.fingerprint:
            raise SpecError(
                f"model.fingerprint: the plan was made for a model with fingerprint {fp}, this model "
                f"({plan.model.name}) traces to {graph.fingerprint}; re-plan for this model (or set the "
                f"fingerprint to '*' in a hand-written plan to skip the check)"
            )
        if plan.mesh.tp > 1 and plan.tensor_parallel.sequence_parallel:
            from planner.capabilities import sequence_parallel_problem

            why = sequence_parallel_problem(graph)
            if why:
                raise SpecError(f"tensor_parallel.sequence_parallel: {why}; set it to false")
    return notes


def _materialize(module: nn.Module, device: torch.device, init_fn: Callable[[nn.Module], None] | None) -> None:
    if not any(p.is_meta for p in module.parameters()) and not any(b.is_meta for b in module.buffers()):
        return
    module.to_empty(device=device)
    inner = module.module if isinstance(module, DDP) else module
    with torch.no_grad():
        if init_fn is not None:
            init_fn(inner)
        elif hasattr(inner, "init_weights"):
            inner.init_weights()
        else:
            raise SpecError(
                f"model on the meta device: {type(inner).__name__} has no init_weights(); pass init_fn= "
                f"to parallelize, or build the model on a real device"
            )


def _trace_one(trace, model: nn.Module, inputs: tuple):
    """`model` traced with `inputs` cut to batch 1 (the fingerprint does not depend on the batch
    size, and batch 1 is autoplan's convention, which also keeps torch.export traces, whose graphs
    bake the batch in, comparable)."""
    one = tuple(x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in inputs)
    return trace(model, one)


class ParallelModel:
    """A model with a plan applied: the local module(s), optimizer(s) and the step that hides the
    schedule. Build it with `parallelize`."""

    def __init__(self, plan: Plan, meshes: Meshes, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                 precision: PrecisionSetup, *, loss_fn: LossFn, runner: Any = None, notes: list[str] | None = None):
        self.plan = plan
        self.meshes = meshes
        self.modules = modules
        self.optimizers = optimizers
        self.precision = precision
        self.loss_fn = loss_fn
        self.runner = runner
        self.notes = notes or []
        self.last_step_time_s = 0.0

    @property
    def module(self) -> nn.Module:
        """The local model (the only stage module when there is no pipeline)."""
        if len(self.modules) != 1:
            raise AttributeError("this rank holds several pipeline stages; use .modules")
        return self.modules[0]

    def local_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This replica's slice of a global batch (dim 0)."""
        dp, rank = self.plan.mesh.dp, self.meshes.dp_rank
        n = inputs.shape[0]
        if n % dp:
            raise SpecError(f"batch: {n} samples cannot be split over dp={dp} replicas")
        k = n // dp
        return inputs[rank * k:(rank + 1) * k], targets[rank * k:(rank + 1) * k]

    def _loss_ctx(self) -> contextlib.AbstractContextManager:
        tpc = self.plan.tensor_parallel
        return loss_parallel() if self.plan.mesh.tp > 1 and tpc.loss_parallel else contextlib.nullcontext()

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor], loss_fn: LossFn | None = None, *,
                   sync_loss: bool = True) -> torch.Tensor | None:
        """One optimizer step on this replica's batch (inputs, targets).

        Returns:
            The mean loss over the step's micro-batches (averaged over dp replicas when sync_loss),
            detached, on every rank (the pipeline broadcasts it from its last stage).
        """
        t0 = time.perf_counter()
        inputs, targets = batch
        loss_fn = loss_fn or self.loss_fn
        if self.runner is not None:
            if loss_fn is not self.loss_fn:
                raise SpecError("train_step: with a pipeline the loss function is fixed at parallelize(loss_fn=...)")
            with self._loss_ctx():
                loss = self.runner.step(inputs, targets)
        else:
            loss = self._accumulate(inputs, targets, loss_fn)
        self._optimizer_step()
        if loss is not None:
            loss = loss.full_tensor() if isinstance(loss, DTensor) else loss
            loss = loss.detach().to(torch.float64)
        if sync_loss and self.plan.mesh.dp > 1 and loss is not None:
            loss = loss.clone()
            dist.all_reduce(loss, group=self.meshes.dp.get_group())
            loss /= self.plan.mesh.dp
        self.last_step_time_s = time.perf_counter() - t0
        return loss

    def _accumulate(self, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        n_mb = self.plan.pipeline.num_micro_batches
        if inputs.shape[0] % n_mb:
            raise SpecError(f"batch: {inputs.shape[0]} samples do not split into num_micro_batches={n_mb}")
        module = self.module
        scaler = self.precision.scaler
        total = torch.zeros((), dtype=torch.float64)
        for i, (x, y) in enumerate(zip(inputs.chunk(n_mb), targets.chunk(n_mb), strict=True)):
            last = i == n_mb - 1
            with self._sync_ctx(module, last), self._loss_ctx():
                with self.precision.autocast():
                    loss = loss_fn(module(x), y) / n_mb
                (scaler.scale(loss) if scaler is not None else loss).backward()
            loss = loss.detach()
            total = total + (loss.full_tensor() if isinstance(loss, DTensor) else loss).to(torch.float64)
        return total

    def _sync_ctx(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        if isinstance(module, DDP):
            return contextlib.nullcontext() if last else module.no_sync()
        if self.plan.data_parallel.sharding == "zero2" and hasattr(module, "set_requires_gradient_sync"):
            module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _optimizer_step(self) -> None:
        scaler = self.precision.scaler
        for opt in self.optimizers:
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
        if scaler is not None:
            scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) parameters of the whole model by their original names, on every rank.
        A collective (gathers over dp/tp, and over pp with a pipeline); meant for tests and export
        of small models."""
        out: dict[str, torch.Tensor] = {}
        for m in self.modules:
            sd = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True))
            out.update({k: v.detach().cpu() for k, v in sd.items()})
        if self.runner is not None:
            from runtime.pipeline_split import clean_param_name

            out = {clean_param_name(k): v for k, v in out.items()}
            parts: list[dict | None] = [None] * self.plan.mesh.pp
            dist.all_gather_object(parts, out, group=self.meshes.pp.get_group())
            out = {k: v for part in parts for k, v in part.items()}
        return out


def parallelize(
    model: nn.Module,
    plan: Plan,
    *,
    loss_fn: LossFn,
    example_inputs: Sequence[torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    init_fn: Callable[[nn.Module], None] | None = None,
    optimizer_kwargs: dict[str, Any] | None = None,
) -> ParallelModel:
    """Apply `plan` to `model` on this rank. Needs an initialised process group (torchrun).

    Args:
        model: the full model, on a real device (every rank with the same weights) or on the meta
            device (materialised per shard after sharding with `init_fn` or `model.init_weights()`).
        plan: the plan; its mesh must match the world size.
        loss_fn: loss(outputs, targets) -> scalar (mean over the batch).
        example_inputs: inputs with the model's shapes (for the fingerprint and pipeline split).
        device: where parameters live (default: cuda:LOCAL if available, else cpu).
        init_fn: initialises a materialised meta model (default: its init_weights()).
        optimizer_kwargs: optimizer keyword arguments (lr, weight_decay, ...).

    Returns:
        The ParallelModel; train with `.train_step(pm.local_batch(x, y))`.
    """
    validate_world(plan, dist.get_world_size())  # before any collective
    validate_data_parallel(plan)
    notes = validate_model(model, plan, example_inputs)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if plan.train.precision == "fp16" and plan.mesh.pp > 1:
        raise SpecError("train.precision: fp16 loss scaling is not supported with a pipeline (pp > 1); use bf16")
    meshes = build_mesh(plan, device.type)
    fsdp = uses_fsdp(plan)
    precision = build_precision(plan.train.precision, fsdp=fsdp, sharded_grads=fsdp or plan.mesh.tp > 1,
                                device_type=device.type)
    styles = resolve_styles(model, plan) if plan.mesh.tp > 1 else {}
    meta = any(p.is_meta for p in model.parameters())

    def apply(stage: nn.Module, is_stage: bool = False) -> nn.Module:
        apply_tensor_parallel(stage, meshes.tp, plan, styles=styles)
        notes.extend(apply_activation_checkpointing(stage, plan))
        if not fsdp:
            _materialize(stage, device, init_fn)
        stage = apply_data_parallel(stage, meshes, plan, mp_policy=precision.mp_policy, is_pipeline_stage=is_stage)
        if fsdp:
            _materialize(stage, device, init_fn)
        return stage

    runner = None
    if plan.mesh.pp > 1:
        runner = _build_pipeline(model, plan, meshes, loss_fn, example_inputs, device,
                                 lambda m: apply(m, is_stage=True))
        modules = list(runner.stage_modules)
        if meta:
            runner.sync_tied_parameters()  # copies of a tied weight start from the first stage's values
    else:
        modules = [apply(model)]
    opt_kwargs = dict(optimizer_kwargs or {})
    optimizers = [build_optimizer(m, meshes, plan, **opt_kwargs) for m in modules]
    return ParallelModel(plan, meshes, modules, optimizers, precision, loss_fn=loss_fn, runner=runner, notes=notes)


def _build_pipeline(model, plan, meshes, loss_fn, example_inputs, device, apply_fn):
    try:
        from runtime.pipeline import build_pipeline
    except ImportError as e:
        raise SpecError(f"mesh.pp: pipeline parallelism needs runtime.pipeline, which failed to import: {e}") from None
    if example_inputs is None:
        raise SpecError("parallelize: a pipeline (pp > 1) needs example_inputs to shape its stages")
    params = inspect.signature(build_pipeline).parameters
    kwargs = dict(loss_fn=loss_fn, example_inputs=tuple(example_inputs), device=device)
    if "apply_fn" not in params:
        raise SpecError("runtime.pipeline.build_pipeline takes no apply_fn; cannot compose TP/FSDP with stages")
    return build_pipeline(model, plan, meshes.pp, apply_fn=apply_fn, **kwargs)
