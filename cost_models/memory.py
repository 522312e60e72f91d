"""Memory per rank, by category: the model behind the promise "a plan predicted to fit fits".

Model states, bytes per parameter (Rajbhandari et al. 2020, ZeRO, §3.1; `bytes_per_param`):

    precision     optimizer      param  grad  optimizer states
    bf16 / fp16   adam, adamw    2      2     12  (fp32 master 4 + m 4 + v 4)
    bf16 / fp16   sgd            2      2      8  (fp32 master 4 + momentum 4)
    fp32          adam, adamw    4      4      8  (m 4 + v 4)
    fp32          sgd            4      4      4  (momentum 4)

SGD is assumed WITH momentum (torch's default is none): conservative by 4 bytes/param.
Sharding over the data-parallel group (`sharded_states`): zero1 divides optimizer states by
dp; zero2 also gradients; zero3 also parameters; hsdp divides all three by the shard-group
size. Offload moves the optimizer states (and fp32 master) to the host. Tensor parallelism
divides the split parameters by tp; a pipeline rank holds only its stages' blocks.

Activations per layer and micro-batch (`layer_activation_bytes`), from the graph's saved bytes
(the tracer measures them with saved-tensor hooks), following Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models", §4, Table 2):

    no recompute     replicated/(tp if sp else 1) + (saved - replicated)/tp
                     (GPT layer: sbh(10 + 24/t + 5as/(ht)); with SP: sbh(34 + 5as/h)/t)
    selective        the same minus the attention core/tp      (with SP: 34 sbh/t)
    full             the layer's input, /tp with SP              (2 sbh, or 2 sbh/t)

Layers without tensor-parallel candidates are not divided. Full (selective) recompute needs one
layer's full (attention-core) activations again during its backward: a transient working set.

Transient buffers (`transient_bytes` in cost_models.estimate): FSDP unsharded parameters of a
block plus the prefetched next one and one block's unsharded gradients; DDP gradient buckets:
PyTorch's Reducer keeps a flat copy of every gradient in its buckets unless
`gradient_as_bucket_view=True` (torch DistributedDataParallel docs: that flag saves "the total
gradients size"), so a full gradient copy is charged (conservative); pipeline p2p send and
receive buffers (activation and gradient, 4 boundary tensors); logits on the last stage in the
training dtype plus an fp32 copy and its fp32 gradient for the loss; foreach-Adam's temporary
(one fp32 tensor per local optimizer parameter, at the optimizer step when activations are
freed).

Margin (`margin_bytes`): PyTorch's caching allocator fragments (ZeRO paper §3.2 reports
fragmentation that leaves memory unusable; we charge 10% of the tensors, an estimate) plus a
reserve for the CUDA context, cuBLAS workspaces and NCCL buffers that `total_memory` includes
but the allocator cannot use: 5% of capacity, at most 2 GiB (estimate; nvidia-smi minus
torch.cuda.memory_reserved is ~0.5-1.5 GiB on A100/H100).
"""

from __future__ import annotations

from dataclasses import dataclass

from specs import SpecError

FRAGMENTATION_FRACTION = 0.10  # estimate, see module docstring
RESERVE_FRACTION = 0.05  # of device capacity, estimate
RESERVE_MAX_BYTES = 2 * 2**30
DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP bucket_cap_mb default (25 MiB)


@dataclass(frozen=True, slots=True)
class BytesPerParam:
    param: float
    grad: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.param + self.grad + self.optimizer


def bytes_per_param(precision: str, optimizer: str) -> BytesPerParam:
    """Bytes per parameter of parameters, gradients and optimizer states (table above)."""
    mixed = precision in ("bf16", "fp16")
    if optimizer in ("adam", "adamw"):
        return BytesPerParam(2, 2, 12) if mixed else BytesPerParam(4, 4, 8)
    if optimizer == "sgd":
        return BytesPerParam(2, 2, 8) if mixed else BytesPerParam(4, 4, 4)
    raise SpecError(f"train.optimizer: unknown optimizer {optimizer!r}; use adamw, adam or sgd")


def optimizer_step_bytes_per_param(precision: str, optimizer: str) -> float:
    """Bytes the optimizer step reads + writes per parameter (memory-bound kernel)."""
    mixed = precision in ("bf16", "fp16")
    if optimizer in ("adam", "adamw"):
        # read grad, master, m, v; write master, m, v (+ the low-precision param copy)
        return 2 + 4 * 3 + 4 * 3 + 2 if mixed else 4 * 4 + 4 * 3
    return 2 + 4 + 4 + 4 + 4 + 2 if mixed else 4 * 3 + 4 * 2


@dataclass(frozen=True, slots=True)
class StateBytes:
    param: float
    grad: float
    optimizer: float


def sharded_states(num_params: float, bpp: BytesPerParam, *, sharding: str, dp: int,
                   hsdp_shard_size: int | None, offload: str) -> StateBytes:
    """Model-state bytes on one rank holding `num_params` (after tp/pp) for a ZeRO stage."""
    p, g, o = num_params * bpp.param, num_params * bpp.grad, num_params * bpp.optimizer
    if sharding == "zero1":
        o /= dp
    elif sharding == "zero2":
        g /= dp
        o /= dp
    elif sharding == "zero3":
        p, g, o = p / dp, g / dp, o / dp
    elif sharding == "hsdp":
        n = hsdp_shard_size or dp
        p, g, o = p / n, g / n, o / n
    if offload == "cpu":
        o = 0.0
    return StateBytes(p, g, o)


@dataclass(frozen=True, slots=True)
class LayerActivation:
    stored_bytes: float  # kept per in-flight micro-batch
    working_bytes: float  # transient during this layer's backward (recompute)
    full_bytes: float  # stored bytes without any recompute (same tp/sp)


def layer_activation_bytes(saved: float, core: float, replicated: float, input_bytes: float, *,
                           tp: int, sequence_parallel: bool, recompute: str, splittable: bool) -> LayerActivation:
    """Activation bytes of one layer for one micro-batch (all arguments already x micro-batch
    size and rescaled to the training dtype). See the module docstring for the formulas."""
    t = tp if splittable else 1
    sp = t if sequence_parallel else 1
    replicated = min(replicated, saved)
    full = replicated / sp + (saved - replicated) / t
    if recompute == "none":
        return LayerActivation(full, 0.0, full)
    if recompute == "selective":
        return LayerActivation(full - min(core, saved - replicated) / t, core / t, full)
    if recompute == "full":
        return LayerActivation(input_bytes / sp, full, full)
    raise SpecError(f"recompute: unknown mode {recompute!r}; use none, selective or full")


def margin_bytes(tensor_bytes: float, capacity_bytes: float) -> float:
    """Allocator fragmentation + runtime reserve (see module docstring)."""
    return FRAGMENTATION_FRACTION * tensor_bytes + min(RESERVE_MAX_BYTES, RESERVE_FRACTION * capacity_bytes)
