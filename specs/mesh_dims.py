"""MeshDims: a plan's parallel axes as one value (sizes, order, strides, which link each crosses).

The device mesh is laid out outermost first as

    pp  x  dp_replicate  x  dp_shard  x  cp  x  tp

so tp is innermost: the ranks of one tp group are consecutive (global rank =
(((pp_i * dp_replicate + replicate_i) * dp_shard + shard_i) * cp + cp_i) * tp + tp_i) and stay
inside a node when tp <= devices per node. cp (context parallelism: each rank of a cp group holds
1/cp of every sample's tokens) sits between the data-parallel axes and tp, as in torchtitan; the
cp ranks of one replica hold the same parameters, so gradients are averaged and states sharded
over dp x cp ("dp_cp", `fold_cp()`). The data-parallel axis dp = dp_replicate x dp_shard is split by
what the data-parallel engine does with it: DDP / ZeRO-1 replicate over all of it
(dp_shard = 1), ZeRO-2 / ZeRO-3 shard over all of it (dp_replicate = 1), HSDP shards within
groups of `hsdp_shard_size` and replicates across them. This is torchtitan's `ParallelDims`
order.

Everything that needs a group's size or the rank distance between its members reads it here:
the cost model (which link a collective crosses), the search, the explainer's mesh table and
the runtime's DeviceMesh (runtime/mesh.py). A new axis is one field here plus its place in
`AXES`.

Groups (`group(name)`): "tp", "dp_shard", "dp_replicate", "dp" (the two together), "pp"; a
group of size n and stride d holds ranks r, r + d, ..., r + (n - 1) d.

Expert parallelism (`ep`, a divisor of dp; runtime/expert_parallel.py) is no axis of its own: it
borrows data-parallel ranks, splitting the dp index as dp_i = expert_dp_i * ep + ep_i (torchtitan's
way). Its groups: "ep" (ep consecutive dp ranks, stride tp: the all-to-all of one MoE layer) and
"expert_dp" (the dp / ep copies of one expert shard, stride ep * tp: the experts' gradient sync).
`experts()` gives the mesh the experts' data parallelism sees (cost_models.ranks). Not with HSDP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import TYPE_CHECKING, Protocol

from specs._base import SpecError

if TYPE_CHECKING:
    from specs.plan import Plan

# outermost first
AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
# groups made of several adjacent axes
COMPOSITE = {"dp": ("dp_replicate", "dp_shard"), "dp_cp": ("dp_replicate", "dp_shard", "cp"),
             "dp_shard_cp": ("dp_shard", "cp")}
# expert parallelism's groups, carved out of dp (module docstring)
EXPERT = ("ep", "expert_dp")


class MeshKnobs(Protocol):
    """What `MeshDims.from_knobs` reads: specs.Knobs, or any value with these attributes."""

    @property
    def pp(self) -> int: ...
    @property
    def dp(self) -> int: ...
    @property
    def tp(self) -> int: ...
    @property
    def ep(self) -> int: ...
    @property
    def cp(self) -> int: ...
    @property
    def sharding(self) -> str: ...
    @property
    def hsdp_shard_size(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class MeshDims:
    """Sizes of the mesh axes (see the module docstring). `hsdp`: the data-parallel axis is
    two mesh dimensions at run time (HSDP's replicate x shard), else one named "dp"."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    hsdp: bool = False
    ep: int = 1
    cp: int = 1
    # (size, stride) of every group, made once (the cost model asks for them per candidate)
    _groups: dict[str, tuple[int, int]] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in AXES:
            size = getattr(self, name)
            if not isinstance(size, int) or size < 1:
                raise SpecError(f"mesh.{name}: {size!r} is not a positive integer")
        groups = {}
        for group in (*AXES, *COMPOSITE):
            axes = self._axes(group)
            inner = AXES[AXES.index(axes[-1]) + 1 :]
            groups[group] = (prod(getattr(self, a) for a in axes), prod(getattr(self, a) for a in inner))
        if not isinstance(self.ep, int) or self.ep < 1 or self.dp % self.ep or (self.ep > 1 and (self.hsdp or self.cp > 1)):
            raise SpecError(
                f"mesh.ep: {self.ep!r} must be a positive divisor of dp ({self.dp}), without hsdp or cp"
            )
        dp_stride = groups["dp"][1]
        groups["ep"] = (self.ep, dp_stride)
        groups["expert_dp"] = (self.dp // self.ep, dp_stride * self.ep)
        object.__setattr__(self, "_groups", groups)

    @classmethod
    def of(
        cls,
        *,
        pp: int,
        dp: int,
        tp: int,
        sharding: str = "none",
        hsdp_shard_size: int | None = None,
        ep: int = 1,
        cp: int = 1,
    ) -> MeshDims:
        """The mesh of a plan's knobs: dp split by the sharding (module docstring)."""
        if sharding == "hsdp":
            shard = hsdp_shard_size or dp
            if shard < 1 or dp % shard:
                raise SpecError(
                    f"hsdp_shard_size: {shard} must divide dp ({dp}); pick a divisor of dp"
                )
            return cls(pp=pp, dp_replicate=dp // shard, dp_shard=shard, tp=tp, hsdp=True, ep=ep, cp=cp)
        if sharding in ("zero2", "zero3"):
            return cls(pp=pp, dp_replicate=1, dp_shard=dp, tp=tp, ep=ep, cp=cp)
        return cls(pp=pp, dp_replicate=dp, dp_shard=1, tp=tp, ep=ep, cp=cp)

    @classmethod
    def from_knobs(cls, knobs: MeshKnobs) -> MeshDims:
        """specs.Knobs (or anything with pp, dp, tp, sharding, hsdp_shard_size) -> MeshDims."""
        return cls.of(
            pp=knobs.pp,
            dp=knobs.dp,
            tp=knobs.tp,
            sharding=knobs.sharding,
            hsdp_shard_size=knobs.hsdp_shard_size,
            ep=knobs.ep,
            cp=knobs.cp,
        )

    @classmethod
    def from_plan(cls, plan: Plan) -> MeshDims:
        mesh, data_parallel = plan.mesh, plan.data_parallel
        return cls.of(
            pp=mesh.pp,
            dp=mesh.dp,
            tp=mesh.tp,
            sharding=data_parallel.sharding,
            hsdp_shard_size=data_parallel.hsdp_shard_size,
            ep=mesh.ep,
            cp=mesh.cp,
        )

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return prod(getattr(self, a) for a in AXES)

    def fold_cp(self) -> MeshDims:
        """The mesh as data parallelism sees it: the cp ranks of a replica folded into its
        data-parallel shard axis (or, without sharding, its replicate axis), so that "dp" is
        dp x cp ranks, tp apart (gradients are averaged and states sharded over them); self when
        cp is 1. Every other group (pp, tp) keeps its size and stride."""
        if self.cp == 1:
            return self
        if self.dp_shard > 1 or self.hsdp:
            return MeshDims(pp=self.pp, dp_replicate=self.dp_replicate, dp_shard=self.dp_shard * self.cp,
                            tp=self.tp, hsdp=self.hsdp)
        return MeshDims(pp=self.pp, dp_replicate=self.dp_replicate * self.cp, tp=self.tp)

    def experts(self) -> MeshDims:
        """The mesh as the experts' data parallelism sees it: dp / ep copies of each expert shard,
        ep * tp ranks apart (its "dp" group is this mesh's "expert_dp"); self when ep is 1."""
        if self.ep == 1:
            return self
        return MeshDims(
            pp=self.pp,
            dp_replicate=self.dp_replicate // self.ep if self.dp_replicate > 1 else 1,
            dp_shard=self.dp_shard // self.ep if self.dp_shard > 1 else 1,
            tp=self.tp * self.ep,
        )

    def size(self, group: str) -> int:
        """Ranks in one group of `group` (an axis or a composite such as "dp")."""
        return self.group(group)[0]

    def stride(self, group: str) -> int:
        """Rank distance between neighbours of one group: the product of the axes inside it."""
        return self.group(group)[1]

    def group(self, group: str) -> tuple[int, int]:
        """(size, stride) of `group`."""
        got = self._groups.get(group)
        if got is None:
            raise SpecError(f"mesh group {group!r}: not one of {', '.join((*AXES, *COMPOSITE, *EXPERT))}")
        return got

    def first_group(self, group: str) -> list[int]:
        """The global ranks of the group that holds rank 0."""
        size, stride = self.group(group)
        return [k * stride for k in range(size)]

    def nodes_spanned(self, group: str, devices_per_node: int) -> int:
        """Nodes the group holding rank 0 spans (1: it stays on one node's link)."""
        return len({r // devices_per_node for r in self.first_group(group)})

    def crosses_nodes(self, group: str, devices_per_node: int) -> bool:
        return self.nodes_spanned(group, devices_per_node) > 1

    def mesh_shape(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """(sizes, names) of the runtime's DeviceMesh, outermost first: the data-parallel axis as
        two dimensions under HSDP, one ("dp") otherwise; a "cp" dimension only when cp > 1."""
        cp = ((self.cp,), ("cp",)) if self.cp > 1 else ((), ())
        if self.hsdp:
            sizes = (self.pp, self.dp_replicate, self.dp_shard, *cp[0], self.tp)
            return sizes, ("pp", "dp_replicate", "dp_shard", *cp[1], "tp")
        return (self.pp, self.dp, *cp[0], self.tp), ("pp", "dp", *cp[1], "tp")

    def _axes(self, group: str) -> tuple[str, ...]:
        if group in AXES:
            return (group,)
        if group in COMPOSITE:
            return COMPOSITE[group]
        raise SpecError(f"mesh group {group!r}: not one of {', '.join((*AXES, *COMPOSITE))}")
