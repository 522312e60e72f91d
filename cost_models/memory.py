"""Memory per rank, by category: the model behind the promise "a plan predicted to fit fits".

Model states, bytes per parameter (`bytes_per_param`), in two conventions:

"torch" (the default; what this project's runtime runs): PyTorch-native mixed precision keeps
the parameters in fp32 and they ARE the master weights: `torch.autocast` over fp32 parameters
(DDP, ZeroRedundancyOptimizer, TP) or FSDP2 `MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)` over fp32 sharded parameters. Gradients of fp32 parameters are fp32.
The bf16 compute copy of the weights (autocast's cast cache, saved for backward; FSDP2's
unsharded bf16 parameters) is a transient of `compute` bytes per parameter.

    precision     optimizer      param  grad  optimizer states        compute copy
    bf16 / fp16   adam, adamw    4      4      8 (m, v)               2
    bf16 / fp16   sgd            4      4      4 (momentum)           2
    fp32          adam, adamw    4      4      8 (m, v)               - (computes on the params)
    fp32          sgd            4      4      4 (momentum)           -

"megatron" (Rajbhandari et al. 2020, ZeRO §3.1; Megatron-LM/DeepSpeed): bf16 parameters and
gradients, fp32 master + m + v in the optimizer: 2 + 2 + 12 for mixed-precision Adam
(2 + 2 + 8 for SGD). Both conventions total 16 bytes/param for Adam; they differ in what each
ZeRO stage divides.

SGD is assumed WITH momentum (torch's default is none): conservative by 4 bytes/param.
Sharding over the data-parallel group (`sharded_states`): zero1 divides optimizer states by
dp; zero2 also gradients (and, in the torch convention, the stored fp32 parameters: the
runtime's zero2 is FSDP2 without resharding after forward, which keeps unsharded bf16 copies
as a transient instead); zero3 divides all three; hsdp divides all three by the shard-group
size. Offload moves the optimizer states to the host (params and grads are still counted on
the device: conservative). Tensor parallelism divides the split parameters by tp; a pipeline
rank holds only its stages' blocks.

Activations per layer and micro-batch (`layer_activation_bytes`), from the graph's saved bytes
(the tracer measures them with saved-tensor hooks), following Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models", §4, Table 2):

    no recompute     replicated/(tp if sp else 1) + (saved - replicated)/tp
                     (GPT layer: sbh(10 + 24/t + 5as/(ht)); with SP: sbh(34 + 5as/h)/t)
    selective        the same minus the attention core/tp      (with SP: 34 sbh/t)
    full             the layer's input, /tp with SP              (2 sbh, or 2 sbh/t)

Layers without tensor-parallel candidates are not divided.

Fused attention follows the target's kernels (`layer_saved_bytes`): the tracer measures
`F.scaled_dot_product_attention` on the math path, which keeps the a*s^2 probabilities (and
dropout mask); on a target whose `attention_kernel` is "flash" (GPU presets: CUDA flash,
memory-efficient and cuDNN kernels; Dao et al. 2022, FlashAttention, §3.1) the call keeps q, k,
v, the output and an fp32 log-sum-exp instead (specs.FusedAttentionSaved): Korthikanti's 5as/h
term is absent and selective recompute of the fused call drops only the log-sum-exp: a GPT layer
keeps ~34 sbh plus the log-sum-exp (4 a s b bytes), with or without selective recompute. On
"math" targets (the cpu preset) the measured figures stand, and selective drops the 5as/h term. Full (selective) recompute needs one
layer's full (attention-core) activations again during its backward: a transient working set.

Transient buffers (cost_models.estimate): the bf16 compute copy of the rank's weights (non-FSDP
mixed precision); FSDP unsharded bf16 parameters of a block plus the prefetched next one and one
block's unsharded fp32 gradients (zero3/hsdp), or of ALL local blocks plus unsharded gradients
accumulated over micro-batches (zero2: no resharding after forward, no gradient sync until the
last micro-batch); DDP gradient buckets: PyTorch's Reducer keeps a flat copy of every gradient in
its buckets unless `gradient_as_bucket_view=True` (torch DistributedDataParallel docs: that flag
saves "the total gradients size"), so a full gradient copy is charged (conservative); pipeline
p2p send and receive buffers (activation and gradient, 4 boundary tensors); logits on the last
stage in the training dtype plus an fp32 copy and its fp32 gradient for the loss; foreach-Adam's
temporary (one fp32 tensor per local optimizer parameter, at the optimizer step when
activations are freed).

Margin (`margin_bytes`): PyTorch's caching allocator fragments (ZeRO paper §3.2 reports
fragmentation that leaves memory unusable; we charge 10% of the tensors, an estimate) plus a
reserve for the CUDA context, cuBLAS workspaces and NCCL buffers that `total_memory` includes
but the allocator cannot use: 5% of capacity, at most 2 GiB (estimate; nvidia-smi minus
torch.cuda.memory_reserved is ~0.5-1.5 GiB on A100/H100).
"""

from __future__ import annotations

from dataclasses import dataclass

from specs import LayerType, SpecError

FRAGMENTATION_FRACTION = 0.10  # estimate, see module docstring
RESERVE_FRACTION = 0.05  # of device capacity, estimate
RESERVE_MAX_BYTES = 2 * 2**30
DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP bucket_cap_mb default (25 MiB)


DEFAULT_CONVENTION = "torch"


@dataclass(frozen=True, slots=True)
class BytesPerParam:
    param: float  # stored parameter
    grad: float  # stored gradient
    optimizer: float  # optimizer states (incl. a separate fp32 master in the megatron convention)
    compute: float  # bytes per parameter of the copy matmuls read (bf16 under mixed precision)
    working: float  # extra bytes of that copy held as a transient (0 when it is the parameter)
    convention: str = DEFAULT_CONVENTION

    @property
    def total(self) -> float:
        return self.param + self.grad + self.optimizer


def bytes_per_param(precision: str, optimizer: str, convention: str = DEFAULT_CONVENTION) -> BytesPerParam:
    """Bytes per parameter of parameters, gradients and optimizer states (tables above)."""
    mixed = precision in ("bf16", "fp16")
    if optimizer not in ("adam", "adamw", "sgd"):
        raise SpecError(f"train.optimizer: unknown optimizer {optimizer!r}; use adamw, adam or sgd")
    state = 8 if optimizer in ("adam", "adamw") else 4
    if convention == "torch":
        return BytesPerParam(4, 4, state, 2 if mixed else 4, 2 if mixed else 0, convention)
    if convention == "megatron":
        if mixed:
            return BytesPerParam(2, 2, 4 + state, 2, 0, convention)
        return BytesPerParam(4, 4, state, 4, 0, convention)
    raise ValueError(f"convention: {convention!r}; use 'torch' or 'megatron'")


def optimizer_step_bytes_per_param(bpp: BytesPerParam, optimizer: str = "adamw") -> float:
    """Bytes the optimizer step reads + writes per parameter, pass by pass, as torch's default
    (foreach, non-fused) implementation runs it: every `_foreach_*` op is one elementwise pass.

    Adam (torch/optim/adam.py `_multi_tensor_adam`; AdamW is the same with decoupled decay), with
    s = 4 bytes per fp32 moment, g = gradient, p = the updated (master) parameter:
      [AdamW only: p.mul_(1 - lr wd): 2p]  m.lerp_(g): 2s + g   v.mul_(b2): 2s   v.addcmul_(g, g): 2s + g
      t = sqrt(v): 2s   t.div_(bc2): 2s   t.add_(eps): 2s   p.addcdiv_(m, t): 2p + 2s
    = 2g + 14s + 2p (+ 2p for AdamW): 72 bytes/param in fp32 (80 for AdamW), not the 28 of a
    single fused read/write pass. SGD with momentum: buf.mul_: 2s, buf.add_(g): 2s + g,
    p.add_(buf): 2p + s = g + 5s + 2p. Megatron convention: the update runs on the fp32 master
    (p = 4) and writes the low-precision copy once more (+ bpp.param).
    """
    s = 4.0
    p = bpp.param if bpp.convention == "torch" else 4.0
    extra = 0.0 if bpp.convention == "torch" else bpp.param
    if optimizer == "sgd":
        return bpp.grad + 5 * s + 2 * p + extra
    decay = 2 * p if optimizer == "adamw" else 0.0
    return 2 * bpp.grad + 14 * s + 2 * p + decay + extra


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
        if bpp.convention == "torch":
            p /= dp  # FSDP2 stores the fp32 parameters sharded
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
class SavedBytes:
    """One layer's saved activation bytes per sample on a target: `saved`, `core` and `replicated`
    at the traced activation dtype (rescale as usual), plus fp32 bytes that no precision rescales
    (flash's log-sum-exp), in the total and in the core alike."""

    saved: float
    core: float
    replicated: float
    fp32: float = 0.0


def layer_saved_bytes(lt: LayerType, attention_kernel: str | None) -> SavedBytes:
    """Saved bytes of `lt` per sample when its fused attention runs on `attention_kernel`
    ("flash" or "math"; see the module docstring and specs.FusedAttentionSaved)."""
    fa = lt.fused_attention
    saved, core, repl = (lt.saved_bytes_per_sample, lt.saved_bytes_attention_core_per_sample,
                         lt.saved_bytes_replicated_per_sample)
    if fa is None or attention_kernel != "flash":
        return SavedBytes(saved, core, repl)
    saved = saved - fa.math_bytes_per_sample + fa.flash_bytes_per_sample
    core = max(0.0, core - fa.math_core_bytes_per_sample) + fa.flash_core_bytes_per_sample
    return SavedBytes(saved, core, repl, fa.flash_fp32_bytes_per_sample)


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
