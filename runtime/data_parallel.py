"""Data parallelism with PyTorch's engines, one per `plan.data_parallel.sharding`. Which engine
runs a plan is ONE rule, `cost_models.engines.data_parallel_engine`, which the cost model charges
too (dp = 1: none at all, whatever the sharding):

| sharding | engine                                                                 | shards          |
|----------|------------------------------------------------------------------------|-----------------|
| none     | DDP; FSDP2-based `replicate` on the dp mesh when tp > 1 or pp > 1       | nothing         |
| zero1    | DDP + ZeroRedundancyOptimizer over the dp group (see `build_optimizer`) | optimizer state |
| zero2    | FSDP2 `fully_shard(reshard_after_forward=False)` per block, then root   | + gradients     |
| zero3    | FSDP2 `fully_shard(reshard_after_forward=True)` per block, then root    | + parameters    |
| hsdp     | FSDP2 on the 2-D (dp_replicate, dp_shard) mesh                          | within a group  |

DDP cannot take DTensor parameters (TP), nor several forwards in flight before their backwards
(a pipeline schedule: its reducer fails "rebuilt parameter indices size is not same"), so
tp > 1 or pp > 1 with sharding none uses FSDP2's `replicate`, and zero1 refuses them.

offload=cpu adds FSDP2's CPUOffloadPolicy (parameters, gradients and optimizer step on the
host); it needs an FSDP sharding. Blocks are `plan.model.block_names`; a block holding a
parameter shared with another block (tied embeddings) is left to the root group, since FSDP2
cannot put one parameter in two groups.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from cost_models.engines import DDP_ENGINES, FSDP2_ENGINES, FSDP_SHARDINGS, data_parallel_engine
from runtime.mesh import Meshes
from specs import Plan, SpecError


def validate_data_parallel(plan: Plan) -> None:
    """Raise SpecError for data-parallel settings this runtime cannot execute."""
    dpc = plan.data_parallel
    if dpc.offload == "cpu" and dpc.sharding not in FSDP_SHARDINGS:
        raise SpecError(
            f"data_parallel.offload: cpu offload runs through FSDP2; it needs sharding zero2, zero3 or hsdp "
            f"(got {dpc.sharding})"
        )
    if dpc.sharding == "zero1" and plan.mesh.dp > 1 and (plan.mesh.tp > 1 or plan.mesh.pp > 1):
        raise SpecError(
            f"data_parallel.sharding: zero1 (ZeroRedundancyOptimizer over DDP) works with neither tensor-parallel "
            f"DTensor parameters nor pipeline schedules (tp={plan.mesh.tp}, pp={plan.mesh.pp}); use zero2 "
            f"(FSDP2 without resharding after forward), which also keeps optimizer states sharded"
        )


def uses_fsdp(plan: Plan) -> bool:
    """True when gradients/parameters are handled by an FSDP2 engine (fully_shard or replicate)."""
    return data_parallel_engine(plan.knobs()) in FSDP2_ENGINES


def _shared_param_ids(blocks: list[nn.Module]) -> set[int]:
    count: dict[int, int] = {}
    for b in blocks:
        for p in {id(p) for p in b.parameters()}:
            count[p] = count.get(p, 0) + 1
    return {p for p, c in count.items() if c > 1}


def apply_data_parallel(
    model: nn.Module,
    meshes: Meshes,
    plan: Plan,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    is_pipeline_stage: bool = False,
) -> nn.Module:
    """Wrap `model` (the whole model or one pipeline stage) for data parallelism.

    Args:
        model: module after TP and activation checkpointing.
        meshes: the plan's meshes.
        plan: the plan.
        mp_policy: FSDP2 mixed-precision policy (None: parameters' own dtype).
        is_pipeline_stage: the module is one stage (blocks absent from it are skipped).

    Returns:
        The module to train: a DDP wrapper, or `model` itself (FSDP2 modifies it in place).
    """
    validate_data_parallel(plan)
    dpc = plan.data_parallel
    engine = data_parallel_engine(plan.knobs())
    if engine == "none":
        return model
    mp_policy = mp_policy or MixedPrecisionPolicy()
    if engine in DDP_ENGINES:
        return DDP(model, process_group=meshes.dp.get_group(), broadcast_buffers=False)
    if engine == "fsdp2_replicate":  # DTensor parameters or a pipeline
        replicate(model, mesh=meshes.dp, mp_policy=mp_policy)
        return model
    # Pinned host memory needs a CUDA driver; on a CPU-only run the policy is kept (a no-op move).
    pin = torch.cuda.is_available()
    offload: OffloadPolicy = CPUOffloadPolicy(pin_memory=pin) if dpc.offload == "cpu" else OffloadPolicy()
    reshard = dpc.sharding != "zero2"
    names = dict(model.named_modules())
    blocks = [names[b] for b in plan.model.block_names if b in names and names[b] is not model]
    shared = _shared_param_ids(blocks) | _shared_with_rest(model, blocks)
    for block in blocks:
        if any(id(p) in shared for p in block.parameters()):
            continue
        fully_shard(block, mesh=meshes.fsdp, reshard_after_forward=reshard, mp_policy=mp_policy,
                    offload_policy=offload)
    # The root keeps what no block owns; it is resharded only at the end of backward anyway.
    fully_shard(model, mesh=meshes.fsdp, reshard_after_forward=reshard and not is_pipeline_stage,
                mp_policy=mp_policy, offload_policy=offload)
    return model


def _shared_with_rest(model: nn.Module, blocks: list[nn.Module]) -> set[int]:
    """Params of a block also reachable from a module outside every block."""
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    outside = set()
    for m in model.modules():
        if id(m) in in_blocks:
            continue
        outside |= {id(p) for p in m.parameters(recurse=False)}
    return {id(p) for b in blocks for p in b.parameters() if id(p) in outside}


def _optimizer_class(name: str) -> Callable[..., torch.optim.Optimizer]:
    return {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name]


def build_optimizer(module: nn.Module, meshes: Meshes, plan: Plan, **kwargs) -> torch.optim.Optimizer:
    """The plan's optimizer over `module`'s parameters; ZeroRedundancyOptimizer for zero1 (dp > 1).

    kwargs go to the optimizer (lr, weight_decay, momentum, ...).
    """
    cls = _optimizer_class(plan.train.optimizer)
    params = [p for p in module.parameters() if p.requires_grad]
    if data_parallel_engine(plan.knobs()) == "zero_redundancy":
        if any(isinstance(p, DTensor) for p in params):  # validate_data_parallel refuses tp > 1
            raise SpecError("data_parallel.sharding: zero1 cannot shard DTensor parameters; use zero2")
        return ZeroRedundancyOptimizer(params, optimizer_class=cls, process_group=meshes.dp.get_group(), **kwargs)
    return cls(params, **kwargs)
