"""The device mesh of a plan, and the checks that must pass before any collective runs.

Mesh layout: specs.MeshDims's, the one the cost model and the explainer read. Axes ("pp", "dp",
"tp") in that order, so tp is innermost: the ranks of one tp group are consecutive and stay
inside a node when tp <= devices per node. With `sharding: hsdp` the dp axis is two dimensions,
("dp_replicate", "dp_shard"), shard innermost: replicas = dp / hsdp_shard_size.

`validate_world` is pure (it raises specs.SpecError); `build_mesh` creates the process groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from specs import MeshDims, Plan, SpecError


def mesh_shape(plan: Plan) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(sizes, axis names) of the plan's mesh, outermost first."""
    return MeshDims.from_plan(plan).mesh_shape()


def validate_world(plan: Plan, world_size: int) -> None:
    """Raise SpecError when the launched world size is not the plan's pp * dp * tp."""
    mesh = plan.mesh
    if mesh.world_size != world_size:
        raise SpecError(
            f"world size: the plan needs pp({mesh.pp}) * dp({mesh.dp}) * tp({mesh.tp}) = "
            f"{mesh.world_size} processes, but {world_size} were launched; run torchrun with --nproc-per-node "
            f"(times --nnodes) = {mesh.world_size}, or re-plan for {world_size} devices"
        )


@dataclass(frozen=True)
class Meshes:
    """The full mesh and the views each technique needs.

    `dp` is the whole data-parallel group (flattened replicate x shard under HSDP);
    `fsdp` is what fully_shard takes: 1-D dp, or 2-D (dp_replicate, dp_shard) under HSDP.
    """

    world: DeviceMesh
    pp: DeviceMesh
    dp: DeviceMesh
    fsdp: DeviceMesh
    tp: DeviceMesh

    @property
    def dp_rank(self) -> int:
        return self.dp.get_local_rank()

    @property
    def pp_rank(self) -> int:
        return self.pp.get_local_rank()


def build_mesh(plan: Plan, device_type: str = "cpu") -> Meshes:
    """Create the DeviceMesh (and its process groups) for the plan. Checks the world size first."""
    validate_world(plan, dist.get_world_size())
    dims = MeshDims.from_plan(plan)
    sizes, names = dims.mesh_shape()
    world = init_device_mesh(device_type, sizes, mesh_dim_names=names)
    if dims.hsdp:
        fsdp = world["dp_replicate", "dp_shard"]
        dp = fsdp._flatten("dp")
    else:
        fsdp = dp = world["dp"]
    return Meshes(world=world, pp=world["pp"], dp=dp, fsdp=fsdp, tp=world["tp"])
