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
them. The same user loop serves every plan:

    pm = parallelize(model, plan, loss_fn=F.cross_entropy, max_grad_norm=1.0,
                     optimizer_fn=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                     lr_scheduler_fn=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 100))
    for x, y in pm.data_loader(dataset):        # this replica's samples only
        loss = pm.train_step((x, y))            # fwd/bwd, clip by the global norm, step, LR step
    pm.eval_step((x, y)); pm.export_full_state_dict("model.safetensors")

train_step = forward_backward + clip_grad_norm_ (given max_grad_norm) + optimizer_step, each
public for loops that need them apart. Batches of any structure (dicts, several tensors) run
with forward_fn(module, batch) -> loss; the contract is ParallelModel's docstring.

Batch convention: each replica (dp rank) steps on its own batch. `data_loader` reads only that
replica's samples (DistributedSampler over dp, not the world); `local_batch` cuts a global batch
held by every rank into dp contiguous slices, slice i for the replicas with dp rank i.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from planner.capabilities import sequence_parallel_problem
from planner.tracer import trace
from runtime.checkpointing import apply_activation_checkpointing
from runtime.data_parallel import (
    apply_data_parallel,
    build_optimizer,
    uses_fsdp,
    validate_data_parallel,
)
from runtime.mesh import Meshes, build_mesh, validate_world
from runtime.meta_init import MetaInit, materialize
from runtime.precision import PrecisionSetup, build_precision
from runtime.tensor_parallel import apply_tensor_parallel, resolve_styles
from runtime.training import (
    Batch,
    ForwardFn,
    batch_size,
    build_data_loader,
    clip_grad_norm_,
    pair_forward,
    pipeline_pair,
    reshard_fsdp,
    save_state_dict,
    slice_batch,
    split_batch,
    validate_loop_options,
)
from specs import ModelGraph, Plan, SpecError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
UNCHECKED_FINGERPRINT = "*"


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
        resolved = resolve_styles(model, plan)
        if not any(style != "replicate" for style in resolved.values()):
            notes.append(f"tensor_parallel.styles split nothing: with tp={plan.mesh.tp} every module runs whole on "
                         f"each of the {plan.mesh.tp} tp ranks (the same work {plan.mesh.tp} times, no speed-up); "
                         f"re-plan with autoplan or name colwise/rowwise styles")
    if plan.mesh.pp > 1:
        # torch's pipelining: imported where a plan has pp > 1
        from runtime.pipeline import validate_pipeline

        validate_pipeline(model, plan)
    fingerprint = plan.model.fingerprint
    if fingerprint == UNCHECKED_FINGERPRINT:
        notes.append("model fingerprint not checked (plan says '*')")
    elif example_inputs is None:
        notes.append("model fingerprint not checked (no example_inputs given)")
    else:
        graph = _trace_batch_one(model, tuple(example_inputs))
        if fingerprint != graph.fingerprint:
            raise SpecError(
                f"model.fingerprint: the plan was made for a model with fingerprint {fingerprint}, "
                f"this model ({plan.model.name}) traces to {graph.fingerprint}; re-plan for this "
                f"model (or set the fingerprint to '*' in a hand-written plan to skip the check)"
            )
        if plan.mesh.tp > 1 and plan.tensor_parallel.sequence_parallel:
            why = sequence_parallel_problem(graph)
            if why:
                raise SpecError(f"tensor_parallel.sequence_parallel: {why}; set it to false")
    return notes


def _materialize(module: nn.Module, device: torch.device, init: MetaInit | None) -> None:
    """`module` (the model or a stage, sharded) to `device` and initialised, if built on meta
    (runtime/meta_init.py: ties kept, as the model built on one device would be initialised)."""
    if init is not None:
        materialize(module, device, init)


def _trace_batch_one(model: nn.Module, inputs: tuple[Any, ...]) -> ModelGraph:
    """`model` traced with `inputs` cut to batch 1 (the fingerprint does not depend on the batch
    size, and batch 1 is autoplan's convention, which also keeps torch.export traces, whose graphs
    bake the batch in, comparable)."""
    one = tuple(x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in inputs)
    return trace(model, one)


class ParallelModel:
    """A model with a plan applied: the local module(s), optimizer(s) and the step that hides the
    schedule. Build it with `parallelize`.

    How a step computes its loss (the batch contract, the same for train_step and eval_step):
      * `forward_fn(module, micro_batch) -> loss` when given (to the step, else to parallelize):
        any batch structure (runtime.training: a tensor, or tuples/lists/dicts of them, samples on
        dim 0), cut into micro-batches of the same structure; e.g. for a Hugging Face model
        `forward_fn=lambda m, b: m(**b).loss` with a dict batch (input_ids, attention_mask, labels).
      * otherwise the batch is a pair `(inputs, targets)` and the loss is
        `loss_fn(module(inputs), targets)` (`module(*inputs)` when inputs is a tuple).
    Either must return the MEAN loss of its micro-batch. With a pipeline (pp > 1) only the pair
    form runs: `inputs` enter the first stage, `targets` go to the last stage, where the loss_fn
    fixed at parallelize computes the loss per micro-batch; a dict batch or forward_fn is refused
    with a SpecError there (pass `(batch["input_ids"], batch["labels"])`).
    """

    def __init__(self, plan: Plan, meshes: Meshes, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                 precision: PrecisionSetup, *, loss_fn: LossFn | None, runner: Any = None,
                 notes: list[str] | None = None, forward_fn: ForwardFn | None = None,
                 lr_schedulers: list[Any] | None = None, max_grad_norm: float | None = None,
                 device: torch.device | None = None):
        self.plan = plan
        self.meshes = meshes
        self.modules = modules
        self.optimizers = optimizers
        self.precision = precision
        self.loss_fn = loss_fn
        self.forward_fn = forward_fn
        self.runner = runner
        self.notes = notes or []
        self.lr_schedulers = lr_schedulers or []
        self.max_grad_norm = max_grad_norm
        self.device = device or torch.device("cpu")
        self.last_step_time_s = 0.0
        self.last_grad_norm: torch.Tensor | None = None
        self.param_aliases: dict[str, str] = {}  # set by parallelize: extra name -> first name

    @property
    def module(self) -> nn.Module:
        """The local model (the only stage module when there is no pipeline)."""
        if len(self.modules) != 1:
            raise AttributeError("this rank holds several pipeline stages; use .modules")
        return self.modules[0]

    @property
    def dp_rank(self) -> int:
        """This rank's replica index in 0..dp_size-1 (tp and pp peers share it)."""
        return self.meshes.dp_rank

    @property
    def dp_size(self) -> int:
        """Number of data-parallel replicas (the plan's dp, not the world size)."""
        return self.plan.mesh.dp

    # ------------------------------------------------------------------ data
    def local_batch(self, batch: Batch, targets: torch.Tensor | None = None) -> Batch:
        """This replica's slice (dim 0) of a global batch: `local_batch(batch)` for a batch of any
        structure, `local_batch(inputs, targets)` -> (inputs, targets) as before. Every rank must
        hold the whole global batch; at scale read per replica with `data_loader` instead."""
        if targets is not None:
            batch = (batch, targets)
        num_samples = batch_size(batch)
        if num_samples % self.dp_size:
            raise SpecError(
                f"batch: {num_samples} samples cannot be split over dp={self.dp_size} replicas"
            )
        per_replica = num_samples // self.dp_size
        return slice_batch(batch, self.dp_rank * per_replica, (self.dp_rank + 1) * per_replica)

    def data_loader(self, dataset: Dataset, batch_size: int | None = None, *, shuffle: bool = True, seed: int = 0,
                    drop_last: bool = True, **loader_kwargs) -> DataLoader:
        """A DataLoader over this replica's share of `dataset` (DistributedSampler with the dp rank
        and dp size of the plan's mesh): each rank reads only its own samples, identical on its tp
        and pp peers. Call `loader.sampler.set_epoch(epoch)` each epoch.

        Args:
            dataset: a map-style dataset (IterableDataset: shard it with dp_rank / dp_size).
            batch_size: samples per step per replica (default: micro_batch_size * num_micro_batches,
                i.e. global_batch_size / dp).
            shuffle, seed, drop_last: DistributedSampler's; loader_kwargs go to the DataLoader.
        """
        pipeline = self.plan.pipeline
        if batch_size is None:
            batch_size = pipeline.micro_batch_size * pipeline.num_micro_batches
        return build_data_loader(dataset, num_replicas=self.dp_size, rank=self.dp_rank,
                                 batch_size=batch_size, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last, **loader_kwargs)

    # ------------------------------------------------------------------ steps
    def _loss_ctx(self) -> contextlib.AbstractContextManager:
        tpc = self.plan.tensor_parallel
        return loss_parallel() if self.plan.mesh.tp > 1 and tpc.loss_parallel else contextlib.nullcontext()

    def train_step(self, batch: Batch, loss_fn: LossFn | None = None, *, forward_fn: ForwardFn | None = None,
                   max_grad_norm: float | None = None, sync_loss: bool = True) -> torch.Tensor | None:
        """One optimizer step on this replica's batch: forward_backward, clipping (when
        max_grad_norm, here or at parallelize, is set), optimizer_step (which also steps the LR
        schedulers).

        Args:
            batch: this replica's batch (class docstring for its contract).
            loss_fn, forward_fn: override parallelize's for this step (not with a pipeline).
            max_grad_norm: clip the gradients to this global norm (`clip_grad_norm_`); the norm
                before clipping is kept in `last_grad_norm`.
            sync_loss: average the returned loss over the dp replicas.
        Returns:
            The mean loss over the step's micro-batches (averaged over dp replicas when sync_loss),
            detached, on every rank (the pipeline broadcasts it from its last stage).
        """
        t0 = time.perf_counter()
        loss = self.forward_backward(batch, loss_fn, forward_fn=forward_fn)
        max_grad_norm = self.max_grad_norm if max_grad_norm is None else max_grad_norm
        if max_grad_norm is not None:
            self.clip_grad_norm_(max_grad_norm)
        self._optimizer_step()
        loss = self._reduce_loss(loss, sync_loss)
        self.last_step_time_s = time.perf_counter() - t0
        return loss

    def forward_backward(self, batch: Batch, loss_fn: LossFn | None = None, *,
                         forward_fn: ForwardFn | None = None) -> torch.Tensor:
        """Forward and backward over the step's micro-batches, gradients left in place (for a loop
        that clips or inspects them before `optimizer_step`). Returns this replica's mean loss."""
        if self.runner is not None:
            inputs, targets = self._pipeline_batch(batch, loss_fn, forward_fn, "train_step")
            with self._loss_ctx():
                return self.runner.step(inputs, targets)
        return self._accumulate(batch, self._compute_fn(batch, loss_fn, forward_fn), backward=True)

    @torch.no_grad()
    def eval_step(self, batch: Batch, loss_fn: LossFn | None = None, *, forward_fn: ForwardFn | None = None,
                  sync_loss: bool = True) -> torch.Tensor:
        """The loss on `batch` without gradients: no backward, no optimizer, gradients untouched.
        The modules run in eval mode (dropout off, BatchNorm's running statistics) and return to
        their mode after. Same batch contract and return as train_step (under a pipeline, the
        loss on every rank)."""
        modes = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()
        try:
            if self.runner is not None:
                inputs, targets = self._pipeline_batch(batch, loss_fn, forward_fn, "eval_step")
                with self._loss_ctx():
                    loss = self.runner.eval(inputs, targets)
            else:
                loss = self._accumulate(batch, self._compute_fn(batch, loss_fn, forward_fn), backward=False)
                reshard_fsdp(self.modules)
        finally:
            for m, mode in zip(self.modules, modes, strict=True):
                m.train(mode)
        return self._reduce_loss(loss, sync_loss)

    def _reduce_loss(self, loss: torch.Tensor | None, sync_loss: bool) -> torch.Tensor | None:
        if loss is None:
            return None
        loss = loss.full_tensor() if isinstance(loss, DTensor) else loss
        loss = loss.detach().to(torch.float64)
        if sync_loss and self.plan.mesh.dp > 1:
            loss = loss.clone()
            dist.all_reduce(loss, group=self.meshes.dp.get_group())
            loss /= self.plan.mesh.dp
        return loss

    def _compute_fn(self, batch: Batch, loss_fn: LossFn | None, forward_fn: ForwardFn | None) -> ForwardFn:
        """forward_fn(module, micro_batch) -> loss for this step (class docstring: call-level
        arguments before parallelize's; forward_fn before loss_fn)."""
        if loss_fn is not None and forward_fn is not None:
            raise SpecError("train_step: give loss_fn or forward_fn, not both")
        if forward_fn is None and loss_fn is None:
            forward_fn, loss_fn = self.forward_fn, self.loss_fn
        if forward_fn is not None:
            return forward_fn
        if loss_fn is None:
            raise SpecError("train_step: no loss: pass loss_fn or forward_fn (here or to parallelize)")
        return pair_forward(loss_fn, batch)

    def _pipeline_batch(self, batch: Batch, loss_fn: LossFn | None, forward_fn: ForwardFn | None,
                        what: str) -> tuple[Any, torch.Tensor]:
        if loss_fn is not None and loss_fn is not self.loss_fn:
            raise SpecError(f"{what}: with a pipeline the loss function is fixed at parallelize(loss_fn=...)")
        uses_forward_fn = forward_fn is not None or self.forward_fn is not None
        return pipeline_pair(batch, pp=self.plan.mesh.pp, what=what, forward_fn=uses_forward_fn)

    def _accumulate(self, batch: Batch, compute: ForwardFn, *, backward: bool) -> torch.Tensor:
        n_mb = self.plan.pipeline.num_micro_batches
        parts = split_batch(batch, n_mb)
        module = self.module
        scaler = self.precision.scaler
        total = torch.zeros((), dtype=torch.float64)
        for i, mb in enumerate(parts):
            sync = self._sync_ctx(module, i == n_mb - 1) if backward else contextlib.nullcontext()
            with sync, self._loss_ctx():
                with self.precision.autocast():
                    loss = compute(module, mb) / n_mb
                if backward:
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

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the gradients in place to a global norm of max_norm, over the whole model: every
        DTensor/FSDP2 shard, tp rank and pipeline stage (runtime.training.clip_grad_norm_; a tied
        weight counts once). A collective: call it on every rank between forward_backward and
        optimizer_step (train_step does, given max_grad_norm). fp16: unscales the gradients first.

        Returns:
            The total norm before clipping (0-d float64, the same on every rank).
        """
        if self.precision.scaler is not None:
            for opt in self.optimizers:
                self.precision.scaler.unscale_(opt)
        all_params = [p for m in self.modules for p in m.parameters()]
        norm_params = self.runner.norm_parameters() if self.runner is not None else all_params
        pp_group = self.meshes.pp.get_group() if self.runner is not None else None
        self.last_grad_norm = clip_grad_norm_(norm_params, all_params, max_norm, norm_type, pp_group=pp_group,
                                              device=self.device)
        return self.last_grad_norm

    def optimizer_step(self) -> None:
        """Step every optimizer (through the fp16 scaler), zero the gradients, step the LR
        schedulers once."""
        self._optimizer_step()

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
        for sched in self.lr_schedulers:
            sched.step()

    # ------------------------------------------------------------------ state
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) parameters of the whole model by their original names, on every rank.
        A collective (gathers over dp/tp, and over pp with a pipeline); meant for tests and export
        of small models."""
        return self._gather_full_state_dict(to_all=True)

    def _gather_full_state_dict(self, *, to_all: bool) -> dict[str, torch.Tensor]:
        # torch's checkpoint package: imported where a state dict is gathered (~0.3 s per process otherwise)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        out: dict[str, torch.Tensor] = {}
        for module in self.modules:
            options = StateDictOptions(full_state_dict=True)
            state_dict = get_model_state_dict(module, options=options)
            out.update({name: tensor.detach().cpu() for name, tensor in state_dict.items()})
        if self.runner is not None:
            from runtime.pipeline_split import clean_param_name

            out = {clean_param_name(k): v for k, v in out.items()}
            group = self.meshes.pp.get_group()
            parts: list[dict | None] = [None] * self.plan.mesh.pp
            if to_all:
                dist.all_gather_object(parts, out, group=group)
            else:
                dist.gather_object(out, parts if self.meshes.pp_rank == 0 else None, group=group, group_dst=0)
            out = {k: v for part in parts if part is not None for k, v in part.items()}
        # every name the model gives a parameter, as its own state_dict has them (a pipeline
        # split keeps one name per parameter)
        for alias, name in self.param_aliases.items():
            if alias not in out and name in out:
                out[alias] = out[name]
            elif name not in out and alias in out:
                out[name] = out[alias]
        return out

    def export_full_state_dict(self, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
        """Write the trained model as one plain state dict for use outside autoplan: safetensors
        when `path` ends in `.safetensors`, torch.save otherwise; rank 0 writes, every rank returns
        after the file is complete (or raises the writer's error).

        Names are the original model's, as `model.state_dict()` has them (persistent buffers
        included); a tied weight appears under each of its names with equal values, so
        `model.load_state_dict(torch.load(path))` (or safetensors.torch.load_file) takes it with
        strict=True. A collective over every rank. Each stage is gathered whole on its ranks (fine
        for models that fit one host; at scale save with DCP, runtime.checkpoint).

        Args:
            path: the file to write.
            dtype: cast floating-point tensors to this dtype (e.g. torch.bfloat16).
        """
        state = self._gather_full_state_dict(to_all=False)
        error = [None]
        if dist.get_rank() == 0:
            try:
                save_state_dict(state, path, dtype=dtype)
            except Exception as e:  # noqa: BLE001 - every rank raises it below
                error = [f"{type(e).__name__}: {e}"]
        dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise RuntimeError(f"export_full_state_dict: rank 0 could not write {path}: {error[0]}")
        return Path(path)


def parallelize(
    model: nn.Module,
    plan: Plan,
    *,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    init_fn: Callable[[nn.Module], None] | None = None,
    optimizer_kwargs: dict[str, Any] | None = None,
    optimizer_fn: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    lr_scheduler_fn: Callable[[torch.optim.Optimizer], Any] | None = None,
    max_grad_norm: float | None = None,
) -> ParallelModel:
    """Apply `plan` to `model` on this rank. Needs an initialised process group (torchrun).

    Args:
        model: the full model, on a real device (every rank with the same weights) or on the meta
            device (materialised per shard after sharding with `init_fn` or `model.init_weights()`).
        plan: the plan; its mesh must match the world size.
        loss_fn: loss(outputs, targets) -> scalar (mean over the batch), for (inputs, targets)
            batches; required with a pipeline (pp > 1).
        forward_fn: forward_fn(module, batch) -> scalar mean loss, for batches of any structure
            (dicts, several tensors); pp = 1 only. Give loss_fn or forward_fn.
        example_inputs: inputs with the model's shapes (for the fingerprint and pipeline split).
        device: where parameters live (default: cuda:LOCAL if available, else cpu).
        init_fn: initialises each materialised part of a meta model, after its ties are re-bound
            (default: the model's init_weights() or torchvision's, run through the whole model;
            runtime/meta_init.py).
        optimizer_kwargs: keyword arguments of the plan's optimizer (plan.train.optimizer: lr,
            weight_decay, ...), the default.
        optimizer_fn: builds the optimizer instead: optimizer_fn(params) -> any torch.optim
            optimizer, called once per local stage module with its trainable parameters (DTensor
            shards under FSDP2/TP). Not with zero1, whose ZeroRedundancyOptimizer builds it.
        lr_scheduler_fn: lr_scheduler_fn(optimizer) -> scheduler, one per optimizer, stepped once
            per optimizer step.
        max_grad_norm: clip gradients to this global norm at every train_step (default: no clip).

    Returns:
        The ParallelModel; train with `.train_step(pm.local_batch(x, y))`.
    """
    validate_world(plan, dist.get_world_size())  # before any collective
    if plan.mesh.cp > 1:
        raise SpecError(
            f"mesh.cp: this runtime does not execute context parallelism (cp={plan.mesh.cp}) yet: torch's "
            f"context_parallel has no CPU path to test it on; run the plan through `autoplan export --to "
            f"torchtitan` (context_parallel_degree) or megatron (--context-parallel-size), or re-plan with cp=1"
        )
    validate_data_parallel(plan)
    notes = validate_model(model, plan, example_inputs)
    validate_loop_options(plan, loss_fn=loss_fn, forward_fn=forward_fn, optimizer_fn=optimizer_fn,
                          optimizer_kwargs=optimizer_kwargs)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if plan.train.precision == "fp16" and plan.mesh.pp > 1:
        raise SpecError("train.precision: fp16 loss scaling is not supported with a pipeline (pp > 1); use bf16")
    meshes = build_mesh(plan, device.type)
    if plan.mesh.ep > 1:
        from runtime.expert_parallel import apply_plan_expert_parallel

        notes.extend(apply_plan_expert_parallel(model, plan, device))
    fsdp = uses_fsdp(plan)
    precision = build_precision(plan.train.precision, fsdp=fsdp, sharded_grads=fsdp or plan.mesh.tp > 1,
                                device_type=device.type)
    styles = resolve_styles(model, plan) if plan.mesh.tp > 1 else {}
    meta = any(p.is_meta for p in model.parameters())
    # before sharding and the split: the ties and the model's class as built (launch passes its own)
    meta_init = (init_fn if isinstance(init_fn, MetaInit) and init_fn.model is model
                 else MetaInit(model, init_fn)) if meta else None

    def apply(stage: nn.Module, is_stage: bool = False) -> nn.Module:
        apply_tensor_parallel(stage, meshes.tp, plan, styles=styles)
        notes.extend(apply_activation_checkpointing(stage, plan))
        if not fsdp:
            _materialize(stage, device, meta_init)
        stage = apply_data_parallel(stage, meshes, plan, mp_policy=precision.mp_policy, is_pipeline_stage=is_stage)
        if fsdp:
            _materialize(stage, device, meta_init)
        return stage

    aliases = _param_aliases(model)  # before the split: stage modules keep one name per parameter
    runner = None
    if plan.mesh.pp > 1:
        runner = _build_pipeline(model, plan, meshes, loss_fn, example_inputs, device,
                                 lambda m: apply(m, is_stage=True))
        modules = list(runner.stage_modules)
        if meta:
            runner.sync_tied_parameters()  # copies of a tied weight start from the first stage's values
    else:
        modules = [apply(model)]
    optimizers = [_build_optimizer(m, meshes, plan, optimizer_fn, optimizer_kwargs) for m in modules]
    schedulers = [lr_scheduler_fn(opt) for opt in optimizers] if lr_scheduler_fn is not None else []
    pm = ParallelModel(plan, meshes, modules, optimizers, precision, loss_fn=loss_fn, runner=runner, notes=notes,
                       forward_fn=forward_fn, lr_schedulers=schedulers, max_grad_norm=max_grad_norm, device=device)
    pm.param_aliases = aliases
    return pm


def _param_aliases(model: nn.Module) -> dict[str, str]:
    """Second and later names of a parameter registered under several names (HF BERT's
    cls.predictions.bias is cls.predictions.decoder.bias) -> its first name."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def _build_optimizer(module: nn.Module, meshes: Meshes, plan: Plan, optimizer_fn, optimizer_kwargs):
    if optimizer_fn is None:
        return build_optimizer(module, meshes, plan, **dict(optimizer_kwargs or {}))
    opt = optimizer_fn([p for p in module.parameters() if p.requires_grad])
    if not isinstance(opt, torch.optim.Optimizer):
        raise SpecError(f"parallelize: optimizer_fn returned a {type(opt).__name__}, not a torch.optim.Optimizer")
    return opt


def _build_pipeline(model, plan, meshes, loss_fn, example_inputs, device, apply_fn):
    from runtime.pipeline import build_pipeline

    if example_inputs is None:
        raise SpecError("parallelize: a pipeline (pp > 1) needs example_inputs to shape its stages")
    return build_pipeline(model, plan, meshes.pp, apply_fn=apply_fn, loss_fn=loss_fn,
                          example_inputs=tuple(example_inputs), device=device)
