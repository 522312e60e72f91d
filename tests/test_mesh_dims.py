"""Tier 1: specs.MeshDims against the rank layout torch's init_device_mesh builds.

init_device_mesh(device, sizes) numbers the ranks `torch.arange(world).reshape(sizes)`; a group
of one mesh dimension is a line of that tensor along the dimension. Each MeshDims group (size,
stride, the group holding rank 0) must be exactly those lines, for every rank, on several
shapes (HSDP's 4-D mesh included). One test asks torch itself (a fake process group, no
processes) so the arange premise is checked too.
"""

from __future__ import annotations

import pytest
import torch

from specs import MeshDims, SpecError
from specs.mesh_dims import AXES, COMPOSITE

pytestmark = pytest.mark.tier1

SHAPES = [
    MeshDims(),
    MeshDims(tp=8),
    MeshDims(pp=4, dp_replicate=2, tp=2),
    MeshDims(pp=2, dp_shard=4, tp=2),
    MeshDims(dp_replicate=3, dp_shard=2, hsdp=True),
    MeshDims(pp=2, dp_replicate=2, dp_shard=4, tp=2, hsdp=True),
    MeshDims(pp=3, dp_replicate=5, dp_shard=2, tp=4, hsdp=True),
    MeshDims(pp=2, dp_shard=2, cp=2, tp=2),
    MeshDims(dp_replicate=3, cp=4, tp=2),
    MeshDims(pp=2, dp_replicate=2, dp_shard=2, cp=2, tp=2, hsdp=True),
]
GROUPS = (*AXES, *COMPOSITE)


def _rank_lines(dims: MeshDims, group: str) -> list[list[int]]:
    """Every group of `group` as init_device_mesh lays it out: the lines of arange(world) along
    the group's dimensions (a composite group: its adjacent dimensions flattened)."""
    ranks = torch.arange(dims.world).reshape([getattr(dims, axis) for axis in AXES])
    members = COMPOSITE.get(group, (group,))
    first, last = AXES.index(members[0]), AXES.index(members[-1])
    others = [d for d in range(len(AXES)) if not first <= d <= last]
    lines = ranks.permute(*others, *range(first, last + 1)).reshape(-1, dims.size(group))
    return lines.tolist()


def _group_of(dims: MeshDims, group: str, rank: int) -> list[int]:
    """The ranks of `rank`'s group by MeshDims's (size, stride): start at the line's first rank."""
    size, stride = dims.group(group)
    start = rank - (rank // stride) % size * stride
    return [start + k * stride for k in range(size)]


@pytest.mark.parametrize("dims", SHAPES, ids=str)
@pytest.mark.parametrize("group", GROUPS)
def test_groups_are_the_lines_of_the_rank_tensor(dims, group):
    lines = _rank_lines(dims, group)
    assert dims.first_group(group) == next(line for line in lines if 0 in line)
    for line in lines:
        for rank in line:
            assert _group_of(dims, group, rank) == line
    assert sorted(r for line in lines for r in line) == list(range(dims.world))


@pytest.mark.parametrize("dims", SHAPES, ids=str)
def test_sizes_multiply_to_the_world(dims):
    assert dims.world == dims.pp * dims.dp * dims.cp * dims.tp
    assert dims.size("dp") == dims.dp == dims.dp_replicate * dims.dp_shard
    assert dims.stride("tp") == 1 and dims.stride("cp") == dims.tp == dims.stride("dp_cp")
    assert dims.stride("dp") == dims.cp * dims.tp == dims.stride("dp_shard")
    assert dims.stride("dp_replicate") == dims.dp_shard * dims.cp * dims.tp
    assert dims.stride("pp") == dims.dp * dims.cp * dims.tp


@pytest.mark.parametrize("dims", SHAPES, ids=str)
def test_fold_cp_makes_dp_the_gradient_group(dims):
    """Data parallelism over dp x cp: the folded mesh's "dp" is the "dp_cp" group, and its pp and
    tp groups are the mesh's."""
    folded = dims.fold_cp()
    assert folded.cp == 1 and folded.world == dims.world
    assert folded.group("dp") == dims.group("dp_cp")
    assert folded.group("pp") == dims.group("pp") and folded.group("tp") == dims.group("tp")
    if dims.hsdp:
        assert folded.group("dp_replicate") == dims.group("dp_replicate")
        assert folded.group("dp_shard") == dims.group("dp_shard_cp")


def test_expert_groups_are_carved_out_of_dp():
    """ep consecutive dp ranks (the all-to-all), and the dp / ep copies of an expert shard, as the
    runtime's (pp, expert_dp, ep, tp) mesh lays them out (runtime/expert_parallel.py)."""
    dims = MeshDims.of(pp=2, dp=8, tp=2, sharding="zero3", ep=4)
    ranks = torch.arange(dims.world).reshape(2, 2, 4, 2)  # (pp, expert_dp, ep, tp)
    assert dims.first_group("ep") == ranks[0, 0, :, 0].tolist()
    assert dims.first_group("expert_dp") == ranks[0, :, 0, 0].tolist()
    assert dims.experts().group("dp") == dims.group("expert_dp")
    with pytest.raises(SpecError, match="mesh.ep"):
        MeshDims.of(pp=1, dp=6, tp=1, ep=4)


def test_of_splits_dp_by_the_sharding():
    assert MeshDims.of(pp=2, dp=8, tp=2, sharding="none") == MeshDims(pp=2, dp_replicate=8, tp=2)
    assert MeshDims.of(pp=2, dp=8, tp=2, sharding="zero1") == MeshDims(pp=2, dp_replicate=8, tp=2)
    assert MeshDims.of(pp=2, dp=8, tp=2, sharding="zero2") == MeshDims(pp=2, dp_shard=8, tp=2)
    assert MeshDims.of(pp=2, dp=8, tp=2, sharding="zero3") == MeshDims(pp=2, dp_shard=8, tp=2)
    hsdp = MeshDims.of(pp=2, dp=8, tp=2, sharding="hsdp", hsdp_shard_size=4)
    assert hsdp == MeshDims(pp=2, dp_replicate=2, dp_shard=4, tp=2, hsdp=True)
    assert MeshDims.of(pp=1, dp=8, tp=1, sharding="hsdp").dp_shard == 8  # no size: one shard group


@pytest.mark.parametrize(
    ("dims", "sizes", "names"),
    [
        (MeshDims(pp=2, dp_shard=4, tp=2), (2, 4, 2), ("pp", "dp", "tp")),
        (MeshDims(pp=2, dp_replicate=4, tp=2), (2, 4, 2), ("pp", "dp", "tp")),
        (
            MeshDims(pp=2, dp_replicate=2, dp_shard=2, tp=2, hsdp=True),
            (2, 2, 2, 2),
            ("pp", "dp_replicate", "dp_shard", "tp"),
        ),
        (MeshDims(pp=2, dp_shard=2, cp=2, tp=2), (2, 2, 2, 2), ("pp", "dp", "cp", "tp")),
    ],
)
def test_mesh_shape_is_the_runtime_mesh(dims, sizes, names):
    assert dims.mesh_shape() == (sizes, names)
    # the 3-D mesh's dp dimension holds the same ranks as the composite "dp" group
    ranks = torch.arange(dims.world).reshape(sizes)
    if "dp" in names:
        index = tuple(slice(None) if n == "dp" else 0 for n in names)
        assert ranks[index].tolist() == dims.first_group("dp")


def test_mesh_of_a_plan_follows_its_data_parallel_section():
    from tests.runtime_plans import make_plan

    plan = make_plan("gpt-tiny", dp=4, sharding="hsdp", hsdp_shard_size=2)
    assert MeshDims.from_plan(plan) == MeshDims(dp_replicate=2, dp_shard=2, hsdp=True)
    assert MeshDims.from_knobs(plan.knobs()) == MeshDims.from_plan(plan)


@pytest.mark.parametrize(
    ("dims", "group", "per_node", "nodes"),
    [
        (MeshDims(pp=4, dp_replicate=16, tp=8), "tp", 8, 1),  # tp inside a node
        (MeshDims(pp=4, dp_replicate=16, tp=8), "dp", 8, 16),  # stride 8: one rank per node
        (MeshDims(pp=4, dp_replicate=16, tp=8), "pp", 8, 4),
        (MeshDims(dp_replicate=2, dp_shard=4, tp=2, hsdp=True), "dp_shard", 8, 1),  # ranks 0,2,4,6
        (MeshDims(dp_replicate=2, dp_shard=4, tp=2, hsdp=True), "dp_replicate", 8, 2),  # 0, 8
        (MeshDims(dp_replicate=2, dp_shard=4, tp=2, hsdp=True), "dp", 8, 2),
        (MeshDims(tp=4), "tp", 2, 2),  # tp wider than a node
        (MeshDims(tp=4), "pp", 2, 1),  # degree 1: rank 0 alone
    ],
)
def test_nodes_spanned(dims, group, per_node, nodes):
    assert dims.nodes_spanned(group, per_node) == nodes
    assert dims.crosses_nodes(group, per_node) == (nodes > 1)
    line = next(line for line in _rank_lines(dims, group) if 0 in line)
    assert nodes == len({rank // per_node for rank in line})


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MeshDims(tp=0), r"mesh.tp: 0 is not a positive integer"),
        (lambda: MeshDims(pp=-2), r"mesh.pp: -2 is not a positive integer"),
        (lambda: MeshDims(dp_shard=2.0), r"mesh.dp_shard: 2.0 is not a positive integer"),
        (
            lambda: MeshDims.of(pp=1, dp=6, tp=1, sharding="hsdp", hsdp_shard_size=4),
            r"hsdp_shard_size: 4 must divide dp \(6\)",
        ),
        (
            lambda: MeshDims().size("xp"),
            r"mesh group 'xp': not one of pp, dp_replicate, dp_shard, cp, tp, dp",
        ),
        (lambda: MeshDims().stride("dp_rep"), r"mesh group 'dp_rep'"),
    ],
)
def test_errors_name_the_field(make, match):
    with pytest.raises(SpecError, match=match):
        make()


@pytest.mark.parametrize(
    "dims",
    [MeshDims(pp=2, dp_shard=2, tp=2), MeshDims(pp=2, dp_replicate=2, dp_shard=2, tp=2, hsdp=True)],
    ids=str,
)
def test_torch_builds_the_same_groups(dims):
    """init_device_mesh on a fake process group (no processes): rank 0's and the last rank's
    group on every mesh dimension are MeshDims's."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    sizes, names = dims.mesh_shape()
    for rank in (0, dims.world - 1):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world)
        try:
            mesh = init_device_mesh("cpu", sizes, mesh_dim_names=names)
            for name in names:
                assert mesh[name].mesh.tolist() == _group_of(dims, name, rank), (name, rank)
        finally:
            dist.destroy_process_group()
