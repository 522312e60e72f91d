"""The pieces of a user's training loop, as functions of tensors, groups and plain values: batches
of any structure and the loss contract, per-replica data loading, gradient clipping by the global
norm, and writing a full state dict. `ParallelModel` (runtime/parallelize.py) wires them to a
plan's meshes.

Batches. A batch is a tensor, a tuple/list (a namedtuple too) or a dict of them, nested at will;
every tensor with a dimension has the samples on dim 0, and all of them the same number.
`split_batch` cuts one into micro-batches of the same structure, `slice_batch` takes a range of
samples; anything that is not a tensor with a dim 0 (a 0-d tensor, None, an int) is passed along
unchanged to every part. The loss of a micro-batch comes from forward_fn(module, micro_batch)
for any structure, or from loss_fn(module(inputs), targets) for a pair (`pair_forward`); a
pipeline runs the pair form only (`pipeline_pair` refuses the rest with one SpecError).

Clipping (`clip_grad_norm_`), the way torchtitan's `dist_utils.clip_grad_norm_` does it: the
gradients' p-norm comes from `torch.nn.utils.get_total_norm`, which on DTensor gradients (FSDP2
shards, TP shards, replicated) gives a DTensor whose `full_tensor()` is the norm over the whole
logical tensor (an all-reduce over that DTensor's mesh). Gradients are grouped by (mesh,
placements), plain tensors apart, so one foreach pass and one reduction run per group and no
DTensor op mixes meshes; the groups' norms combine as ||(n_1, .., n_k)||_p. With a pipeline each
pp rank holds other parameters: the stage norms combine over the pp group as
(sum_r n_r^p)^(1/p) (one all-reduce SUM; MAX for p = inf). The caller passes each parameter once
for the norm (a tied parameter copied onto several stages counts once: PipelineRunner.
norm_parameters) and every copy for the scaling, which is `torch.nn.utils.clip_grads_with_norm_`
(grad *= min(1, max_norm / (total + 1e-6)), as in one process).

Data (`build_data_loader`): a `DistributedSampler` over the dp replicas (num_replicas = dp, rank
= the dp rank, not the world's), so each replica reads only its own samples and the tp/pp peers
of a replica read the same ones.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from specs import Plan, SpecError

Batch = Any  # a tensor, or a tuple/list/dict of batches (module docstring)
ForwardFn = Callable[[nn.Module, Any], torch.Tensor]  # forward_fn(module, micro_batch) -> mean loss


# ---------------------------------------------------------------------------- batches
def _tensors(batch: Batch) -> Iterable[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, (tuple, list)):
        for v in batch:
            yield from _tensors(v)


def map_batch(batch: Batch, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
    """`batch` with fn applied to every tensor that has a dim 0 (same structure; a Mapping comes
    back as a dict, a namedtuple as its own type)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch) if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return {k: map_batch(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(map_batch(v, fn) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_batch(v, fn) for v in batch)
    return batch


def batch_size(batch: Batch) -> int:
    """Samples in `batch` (dim 0 of its tensors, which must agree)."""
    sizes = {t.shape[0] for t in _tensors(batch) if t.dim() > 0}
    if not sizes:
        raise SpecError(f"batch: no tensor with a batch dimension (dim 0) in a {type(batch).__name__}")
    if len(sizes) > 1:
        raise SpecError(f"batch: its tensors disagree on the number of samples (dim 0): {sorted(sizes)}")
    return sizes.pop()


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Samples start..stop-1 of every tensor in `batch`."""
    return map_batch(batch, lambda t: t[start:stop])


def split_batch(batch: Batch, parts: int, what: str = "num_micro_batches") -> list[Batch]:
    """`batch` cut into `parts` equal, contiguous pieces of the same structure."""
    n = batch_size(batch)
    if n % parts:
        raise SpecError(f"batch: {n} samples do not split into {what}={parts}")
    k = n // parts
    return [slice_batch(batch, i * k, (i + 1) * k) for i in range(parts)]


# ---------------------------------------------------------------------------- the batch contract
def _is_pair(batch: Batch) -> bool:
    return (isinstance(batch, (tuple, list)) and len(batch) == 2 and not isinstance(batch[0], Mapping)
            and isinstance(batch[1], torch.Tensor))


def describe_batch(batch: Batch) -> str:
    """A few words on a batch's structure, for error messages."""
    if isinstance(batch, Mapping):
        return f"a dict batch (keys {', '.join(map(str, list(batch)[:6]))})"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)}"
    return f"a {type(batch).__name__}"


def pair_forward(loss_fn: Callable[[Any, torch.Tensor], torch.Tensor], batch: Batch) -> ForwardFn:
    """forward_fn for a batch (inputs, targets): loss_fn(module(inputs), targets), with
    module(*inputs) when inputs is a tuple. Any other batch raises SpecError (it needs forward_fn)."""
    if not _is_pair(batch):
        raise SpecError(
            f"batch: {describe_batch(batch)} needs forward_fn(module, batch) -> loss (e.g. lambda m, b: "
            f"m(**b).loss for a dict batch); loss_fn alone takes a batch (inputs, targets) and computes "
            f"loss_fn(module(inputs), targets)"
        )

    def forward(module: nn.Module, mb: Batch) -> torch.Tensor:
        inputs, targets = mb
        out = module(*inputs) if isinstance(inputs, tuple) else module(inputs)
        return loss_fn(out, targets)

    return forward


def pipeline_pair(batch: Batch, *, pp: int, what: str, forward_fn: bool) -> tuple[Any, torch.Tensor]:
    """(inputs, targets) of a batch for a pipeline schedule, or the one SpecError that states what
    a pipeline supports (forward_fn: one was given, which a pipeline cannot run)."""
    if forward_fn or not _is_pair(batch):
        got = "forward_fn" if forward_fn else describe_batch(batch)
        raise SpecError(
            f"{what}: with a pipeline (pp={pp}) a batch is (inputs, targets): inputs (a tensor, or a tuple of "
            f"the model's positional tensors) enter the first stage and targets go to the last, where "
            f"parallelize's loss_fn(output, targets) runs per micro-batch; dict batches and forward_fn need "
            f"pp=1 (pass (batch['input_ids'], batch['labels']) instead); got {got}"
        )
    return batch[0], batch[1]


def validate_loop_options(plan: Plan, *, loss_fn, forward_fn, optimizer_fn, optimizer_kwargs) -> None:
    """Raise SpecError for parallelize's loop options that cannot go together. Pure."""
    if loss_fn is None and forward_fn is None:
        raise SpecError("parallelize: give loss_fn(output, targets) or forward_fn(module, batch) -> loss")
    if loss_fn is not None and forward_fn is not None:
        raise SpecError("parallelize: give loss_fn or forward_fn, not both (forward_fn computes the loss itself)")
    if plan.mesh.pp > 1 and loss_fn is None:
        raise SpecError(
            f"parallelize: a pipeline (pp={plan.mesh.pp}) computes the loss on its last stage with "
            f"loss_fn(output, targets); forward_fn needs pp=1"
        )
    if optimizer_fn is not None and optimizer_kwargs:
        raise SpecError("parallelize: optimizer_kwargs configure the plan's optimizer; with optimizer_fn set them there")
    if optimizer_fn is not None and plan.data_parallel.sharding == "zero1" and plan.mesh.dp > 1:
        raise SpecError(
            "parallelize: zero1 shards the optimizer with ZeroRedundancyOptimizer, which builds it from the "
            "plan's optimizer and optimizer_kwargs; drop optimizer_fn, or use sharding zero2 (states sharded too)"
        )


# ---------------------------------------------------------------------------- clipping
def _group_key(g: torch.Tensor) -> tuple:
    if isinstance(g, DTensor):
        return ("dtensor", g.device_mesh, tuple(g.placements))
    return ("tensor", g.device)


def _grouped(params: Iterable[nn.Parameter]) -> dict[tuple, list[nn.Parameter]]:
    groups: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(_group_key(p.grad), []).append(p)
    return groups


@torch.no_grad()
def total_grad_norm(norm_params: Iterable[nn.Parameter], norm_type: float = 2.0, *,
                    pp_group: dist.ProcessGroup | None = None, device: torch.device | None = None,
                    foreach: bool | None = None) -> torch.Tensor:
    """The p-norm of the gradients of `norm_params` over the whole model (module docstring).

    A collective: every rank of each gradient's mesh (and of pp_group) must call it, with its
    parameters in the same order. Returns a 0-d float64 tensor, the same on every rank.
    """
    norm_type = float(norm_type)
    norms = []
    for params in _grouped(norm_params).values():
        n = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type, False, foreach)
        norms.append((n.full_tensor() if isinstance(n, DTensor) else n).to(torch.float64))
    if norms:
        device = norms[0].device
        total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
    else:  # e.g. a pp rank whose stages have no trainable parameter
        total = torch.zeros((), dtype=torch.float64, device=device)
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        if math.isinf(norm_type):
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=pp_group)
        else:
            total = total ** norm_type
            dist.all_reduce(total, group=pp_group)
            total = total ** (1.0 / norm_type)
    return total


@torch.no_grad()
def clip_grad_norm_(norm_params: Iterable[nn.Parameter], all_params: Iterable[nn.Parameter], max_norm: float,
                    norm_type: float = 2.0, *, pp_group: dist.ProcessGroup | None = None,
                    device: torch.device | None = None, foreach: bool | None = None) -> torch.Tensor:
    """Scale the gradients of `all_params` so that their global norm is at most max_norm.

    Args:
        norm_params: the parameters that make the norm, each once over the whole model.
        all_params: the parameters to scale (tied copies included).
        max_norm: the largest norm kept; above it every gradient is scaled by max_norm / norm.
        norm_type: p of the p-norm (float("inf") for the largest |g|).
        pp_group: the pipeline group, when this rank holds only some stages.
    Returns:
        The total norm before clipping (0-d float64, the same on every rank).
    """
    total = total_grad_norm(norm_params, norm_type, pp_group=pp_group, device=device, foreach=foreach)
    for params in _grouped(all_params).values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.to(params[0].grad.device), foreach)
    return total


def reshard_fsdp(modules: Iterable[nn.Module]) -> None:
    """Reshard every FSDP2 module (fully_shard or replicate) in `modules`. After a forward with no
    backward (eval) FSDP2 keeps the root's parameters unsharded and registered on the module, so
    `parameters()` would yield the unsharded ones, whose .grad is None, instead of the sharded
    parameters the optimizer holds."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


# ---------------------------------------------------------------------------- data
def build_data_loader(dataset: Dataset, *, num_replicas: int, rank: int, batch_size: int, shuffle: bool = True,
                      seed: int = 0, drop_last: bool = True, **loader_kwargs) -> DataLoader:
    """A DataLoader that yields only replica `rank`'s samples (of num_replicas), batch_size each.

    Call `loader.sampler.set_epoch(epoch)` at each epoch for a new shuffle (DistributedSampler).
    drop_last keeps every batch full (a pipeline runs exactly its micro-batches).
    """
    if isinstance(dataset, IterableDataset):
        raise SpecError(
            "data_loader: an IterableDataset has no indices to share out; shard it yourself with "
            "ParallelModel.dp_rank and .dp_size (each replica reading only its part)"
        )
    for key in ("sampler", "batch_sampler", "shuffle"):
        if key in loader_kwargs:
            raise SpecError(f"data_loader: {key}= is set by the replica sampler; pass shuffle/seed/drop_last instead")
    sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **loader_kwargs)


# ---------------------------------------------------------------------------- export
def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike, *,
                    dtype: torch.dtype | None = None) -> Path:
    """Write a full state dict: safetensors for a `.safetensors` suffix, torch.save otherwise.

    Tensors are written contiguous and apart (safetensors refuses shared storage, so the two
    names of a tied weight get one copy each: `load_state_dict(strict=True)` finds both).
    Floating-point tensors are cast to `dtype` when given. The write is atomic (temporary file,
    then rename).
    """
    path = Path(path)
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous().clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError as e:
            raise SpecError(f"export: {path.name} asks for safetensors, which is not installed ({e})") from None
        save_file(out, str(tmp), metadata={"format": "pt"})
    else:
        torch.save(out, tmp)
    os.replace(tmp, path)
    return path
