"""Expert parallelism (EP) for mixture-of-experts layers: each rank of an EP group holds
num_experts / ep of every MoE layer's experts, and the routed token rows travel to their expert's
rank and back with all-to-all (torch.distributed._functional_collectives.all_to_all_single_autograd,
which has a backward: the reverse all-to-all of the gradients). Tested on gloo (CPU); the same
collectives exist on NCCL, untested here (no GPU machine was lent).

What it applies to: `planner.models.moe.GroupedExperts` modules (the bundled MoE transformers,
`TransformerConfig(num_experts=...)`), whose forward takes the routed rows already grouped by
expert and the per-expert counts: the all-to-alls run as distribute_module's input/output hooks
around it. Hugging Face transformers 5 experts modules in their plain layout (`is_hf_experts`:
Mixtral, Qwen2-MoE, Qwen3-MoE) route inside their forward; theirs is replaced by
`_hf_experts_forward` (sort by expert, send, SwiGLU per local expert, receive, weight, sum).
The router, top-k, sort and combine stay on each rank (data-parallel like any other parameter);
only the expert computation is moved.

One MoE layer's forward on EP rank r (E experts, E_l = E / ep local ones):
    1. counts (E,) -> all-to-all -> recv (ep, E_l): rows each source rank sends to my experts
    2. rows -> all_to_all_single_autograd(send splits = counts summed per destination rank)
    3. regroup the received rows from (source, expert) order to (expert, source) order
    4. local experts on their rows (counts recv.sum(0)); weights are DTensors Shard(0) on the EP
       mesh, used through to_local()
    5. undo 3, reverse all-to-all: every row returns to its token's rank, in its original order.
The routing is dropless (no capacity), so each token meets the same experts and weights as in
one process: the forward equals one process up to float summation order.

Composition with data parallelism (torchtitan's: EP borrows its ranks from data parallelism).
Let D ranks each train on a different slice of the global batch (the plan's dp), and ep divide D.
The mesh is (expert_dp = D / ep, ep), ep innermost; `dp` is the two flattened (all D ranks).
  * Non-expert parameters (embeddings, attention, norms, router, head) are data-parallel over all
    D ranks with the runtime's engine (FSDP2 fully_shard / replicate over `dp`): gradient =
    (1/D) * sum over the D ranks of d(local mean loss)/dW, the gradient of the global mean loss.
  * An expert shard's local gradient after backward already sums the contributions of the tokens
    of the ep ranks of its EP group (the all-to-all's backward brings them home), each scaled by
    its own rank's 1/local batch. Its D / ep copies (one per EP group) hold the same experts, so
    the expert gradient must be (1/D) * sum over the expert_dp copies, not FSDP's plain mean over
    them ((ep/D) * sum, every token counted ep times). So the expert weights' gradients are scaled
    by 1/ep inside autograd (`GroupedExperts.grad_scale`; `ep_grad_scale` on a Hugging Face
    experts module), and each experts module gets its own
    FSDP2 `fully_shard` over the `expert_dp` mesh with its default mean: (ep/D) * sum(local/ep).
    Also when D == ep (expert_dp of one rank: no reduction, local/ep = local/D).
    Not FSDP2's `set_gradient_divide_factor(D)` (torchtitan's way): in torch 2.14 a one-rank
    FSDP2 group reducing in float64 or float16 divides twice (pre/post-divide factors and the
    single-rank copy's own division; fsdp/_fully_shard/_fsdp_collectives.py), measured here as
    expert gradients of half their value at ep = dp = 2.
  * Therefore apply EP BEFORE data parallelism: the experts then belong to their own FSDP2 group
    and the block/root `fully_shard` over `dp` leaves them out (FSDP2 skips parameters an inner
    fully_shard manages). DDP cannot hold the DTensor expert weights: with EP, sharding none needs
    FSDP2's `replicate` (as runtime.data_parallel does for tp > 1; not tested with EP yet).
  * The losses the runtime returns are dp-averaged as before.
So a step equals one process training on the global batch (tests/ep_cases.py checks it in
float64 on gloo: ep=2 on 2 ranks, ep=2 x expert_dp=2, ep=4, ep=2 x tp=2 and ep=2 x pp=2 (1f1b, two
micro-batches) on 4, on the bundled
MoE transformers and on Hugging Face Mixtral, Qwen2-MoE (its shared expert data-parallel like
any dense MLP) and Qwen3-MoE built from configs).

A plan's `mesh.ep` (a divisor of dp and of every MoE layer's num_experts; specs.Plan) is applied
by runtime.parallelize through `apply_plan_expert_parallel`: `build_expert_meshes` over the plan's
dp ranks, then `apply_expert_parallel` on the whole model before the pipeline split, tensor and
data parallelism, with the experts' group following the plan's sharding (zero3: fully_shard
resharding after forward; zero2: without; none: FSDP2's `replicate`); the rest of the model then
runs FSDP2 (`replicate` for sharding none, as cost_models.engines says for ep > 1). zero1, hsdp
and cpu offload are refused with ep > 1 (specs.Plan). EP x TP: tensor parallelism on the
attention, experts whole on each tp rank
(`build_expert_meshes(tp=...)`). EP x PP: EP applied to the whole model before parallelize's
pipeline split, which keeps the block modules (hooks and DTensor experts included) and runs
several micro-batches' forwards before their backwards (each forward's send/receive pair is
self-contained, the backward needs no state). Not yet: experts split over tp, a load-balancing
loss, capacity-limited routing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor

from planner.experts import is_hf_experts  # the tracer's test: what it costs is what EP shards
from planner.models.moe import GroupedExperts, local_expert_weight, sort_by_expert
from runtime.precision import build_precision
from specs import Plan, SpecError


@dataclass(frozen=True)
class ExpertMeshes:
    """The meshes EP needs, over the D data-parallel ranks: `ep` (innermost, consecutive ranks),
    `expert_dp` (the copies of one expert shard), and `dp` (all D ranks, flattened)."""

    world: DeviceMesh
    ep: DeviceMesh
    expert_dp: DeviceMesh
    dp: DeviceMesh

    @property
    def dp_size(self) -> int:
        return self.dp.size()


def validate_expert_parallel(num_experts: int, ep: int, dp: int) -> None:
    """Raise SpecError when ep cannot split `num_experts` experts over `dp` data-parallel ranks.
    Pure."""
    if ep < 1 or dp % ep:
        raise SpecError(
            f"mesh.ep: ep={ep} must divide dp={dp} (EP groups are made of data-parallel ranks)"
        )
    if num_experts % ep:
        raise SpecError(
            f"mesh.ep: ep={ep} must divide the MoE layers' num_experts={num_experts} "
            f"(each EP rank holds num_experts / ep experts)"
        )


def build_expert_meshes(
    dp: int, ep: int, tp: int = 1, pp: int = 1, device_type: str = "cpu"
) -> ExpertMeshes:
    """The (pp, expert_dp, ep, tp) mesh: the runtime's (pp, dp, tp) layout (global rank =
    (pp_i * dp + dp_i) * tp + tp_i, runtime.mesh) with dp split as dp_i = expert_dp_i * ep + ep_i;
    the views are this rank's (its pp stage's, its tp index's).

    With tp > 1 the experts are whole on each tp rank (the tokens entering an MoE layer are the same
    on the tp ranks of a dp replica, so each runs the same routing; EP groups join the ranks of one
    tp index). With pp > 1 each stage's experts are sharded over that stage's ranks."""
    if pp * dp * tp != dist.get_world_size():
        raise SpecError(
            f"mesh.ep: pp({pp}) * dp({dp}) * tp({tp}) must be the world size "
            f"{dist.get_world_size()}"
        )
    if ep < 1 or dp % ep:
        raise SpecError(f"mesh.ep: ep={ep} must divide dp={dp}")
    world = init_device_mesh(
        device_type, (pp, dp // ep, ep, tp), mesh_dim_names=("pp", "expert_dp", "ep", "tp")
    )
    return ExpertMeshes(
        world=world,
        ep=world["ep"],
        expert_dp=world["expert_dp"],
        dp=world["expert_dp", "ep"]._flatten("dp"),
    )


class _Dispatch:
    """The all-to-all around one experts module: `send` (the rows to their experts' ranks) and
    `receive` (back). State passes from one to the other on this object (one forward at a time
    per module; a recomputation under activation checkpointing repeats both). For GroupedExperts
    they run as distribute_module's input and output hooks."""

    def __init__(self, mesh: DeviceMesh, num_experts: int):
        self.group = mesh.get_group()
        self.ep = mesh.size()
        self.local = num_experts // self.ep
        self.num_experts = num_experts
        self._state: tuple[list[int], list[int], torch.Tensor] | None = None

    def dispatch(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        return self.send(*inputs)

    def combine(self, module: nn.Module, out: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        return self.receive(out)

    def send(self, routed: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows grouped by global expert (counts (E,)) -> this rank's experts' rows grouped by
        local expert, and their counts (E_l,)."""
        if counts.shape != (self.num_experts,):
            raise ValueError(
                f"expert parallel: counts of shape {tuple(counts.shape)}, "
                f"expected ({self.num_experts},)"
            )
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts.contiguous(), group=self.group)
        recv = recv.view(self.ep, self.local)  # [source rank, local expert]
        send_splits = counts.view(self.ep, self.local).sum(1).tolist()
        recv_splits = recv.sum(1).tolist()
        rows = all_to_all_single_autograd(routed.contiguous(), recv_splits, send_splits, self.group)
        order = _by_expert_order(recv, rows.device)
        self._state = (send_splits, recv_splits, order)
        return rows[order], recv.sum(0)

    def receive(self, out: torch.Tensor) -> torch.Tensor:
        """The local experts' output rows -> this rank's rows, in the order `send` took them."""
        assert self._state is not None, "receive without send"
        send_splits, recv_splits, order = self._state
        self._state = None
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return all_to_all_single_autograd(
            out[inverse].contiguous(), send_splits, recv_splits, self.group
        )


def _by_expert_order(recv: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Row indices that regroup rows laid out [source][expert] (counts `recv`, (ep, E_l)) into
    [expert][source], so each local expert's rows are contiguous."""
    ep, local = recv.shape
    sizes = recv.reshape(-1).tolist()
    starts = [0]
    for s in sizes[:-1]:
        starts.append(starts[-1] + s)
    parts = [
        torch.arange(
            starts[s * local + e], starts[s * local + e] + sizes[s * local + e], device=device
        )
        for e in range(local)
        for s in range(ep)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def _hf_experts_forward(
    mod: nn.Module,
    dispatch: _Dispatch,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """A Hugging Face experts module's forward (its eager one: SwiGLU-style act(gate) * up, then
    down, weighted, summed per token) with its rows sent to their experts' EP ranks and back."""
    k = top_k_index.shape[-1]
    routed, counts, slot = sort_by_expert(hidden, top_k_index, mod.num_experts)
    rows, local_counts = dispatch.send(routed, counts)
    gate_up = local_expert_weight(mod.gate_up_proj, mod.ep_grad_scale)
    down = local_expert_weight(mod.down_proj, mod.ep_grad_scale)
    outs = []
    for i, x in enumerate(rows.split(local_counts.tolist())):
        gate, up = F.linear(x, gate_up[i]).chunk(2, dim=-1)
        outs.append(F.linear(mod.act_fn(gate) * up, down[i]))
    y = dispatch.receive(torch.cat(outs)) * top_k_weights.reshape(-1, 1)[slot]
    return torch.zeros_like(hidden).index_add(0, slot // k, y.to(hidden.dtype))


def _shard_dim0(_name: str, m: nn.Module, mesh: DeviceMesh) -> None:
    for pname, p in list(m.named_parameters(recurse=False)):
        m.register_parameter(pname, nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))


def apply_expert_parallel(
    model: nn.Module,
    meshes: ExpertMeshes,
    *,
    reshard_after_forward: bool = True,
    mp_policy: MixedPrecisionPolicy | None = None,
    replicate_experts: bool = False,
) -> list[str]:
    """Shard every experts module of `model` (GroupedExperts; Hugging Face experts, `is_hf_experts`)
    over `meshes.ep` and give each its own FSDP2 group over `meshes.expert_dp`, with its weights'
    gradients scaled by 1/ep (module docstring). Call it before the data parallelism of the rest of
    the model, on every rank, with the model's parameters identical on all ranks (rank 0's are
    distributed). A Hugging Face experts module's forward is replaced by `_hf_experts_forward`.

    Args:
        model: the model (parameters materialised).
        meshes: from `build_expert_meshes`.
        reshard_after_forward: FSDP2's, for the experts' group (False: zero2-like).
        mp_policy: FSDP2 mixed precision for the experts (None: their own dtype).
        replicate_experts: FSDP2's `replicate` over `meshes.expert_dp` instead of `fully_shard`
            (a plan's sharding none: every copy keeps its experts whole, gradients all-reduced
            with the same mean).
    Returns:
        The names of the expert modules sharded.
    """
    ep = meshes.ep.size()
    names = []
    for name, mod in model.named_modules():
        hf = is_hf_experts(mod)
        if not (hf or isinstance(mod, GroupedExperts)):
            continue
        validate_expert_parallel(mod.num_experts, ep, meshes.dp_size)
        dispatch = _Dispatch(meshes.ep, mod.num_experts)
        if hf:
            distribute_module(mod, meshes.ep, _shard_dim0)
            mod.ep_grad_scale = 1.0 / ep
            mod.forward = functools.partial(_hf_experts_forward, mod, dispatch)
        else:
            distribute_module(
                mod, meshes.ep, _shard_dim0, input_fn=dispatch.dispatch, output_fn=dispatch.combine
            )
            mod.grad_scale = 1.0 / ep
        if replicate_experts:
            replicate(mod, mesh=meshes.expert_dp, mp_policy=mp_policy or MixedPrecisionPolicy())
        else:
            fully_shard(
                mod,
                mesh=meshes.expert_dp,
                reshard_after_forward=reshard_after_forward,
                mp_policy=mp_policy or MixedPrecisionPolicy(),
            )
        names.append(name)
    if not names:
        raise SpecError(
            f"mesh.ep: {type(model).__name__} has no experts module to shard (expert parallelism "
            f"applies to planner.models.moe.GroupedExperts and Hugging Face MoE experts)"
        )
    return names


def apply_plan_expert_parallel(model: nn.Module, plan: Plan, device: torch.device) -> list[str]:
    """A plan's expert parallelism, as runtime.parallelize applies it before anything else touches
    the model (pipeline split, tensor and data parallelism): `build_expert_meshes` over the plan's
    ranks, then `apply_expert_parallel` with the experts' group following the plan's sharding
    (module docstring). Returns the notes for the ParallelModel."""
    if any(p.is_meta for p in model.parameters()):
        raise SpecError(
            f"mesh.ep: expert parallelism (ep={plan.mesh.ep}) shards the experts from real weights; "
            f"build the model on a device (not meta), or plan with ep=1"
        )
    model.to(device)
    m = plan.mesh
    meshes = build_expert_meshes(dp=m.dp, ep=m.ep, tp=m.tp, pp=m.pp, device_type=device.type)
    precision = build_precision(plan.train.precision, fsdp=True, sharded_grads=True, device_type=device.type)
    sharding = plan.data_parallel.sharding
    names = apply_expert_parallel(model, meshes, reshard_after_forward=sharding == "zero3",
                                  mp_policy=precision.mp_policy, replicate_experts=sharding == "none")
    return [f"expert parallel: {len(names)} experts modules sharded over ep={m.ep} "
            f"({m.dp // m.ep} copies of each shard)"]

