"""ModelGraph: the traced model as plain data (the IR between the tracer and the cost models).

`planner.trace(model, example_inputs)` produces it; `cost_models` consumes it. It lives in
specs/ because both sides need it and it is pure data (it round-trips JSON, so a trace can be
cached or shipped with a plan).

Scaling with micro-batch size: every field named `*_per_sample` is linear in the number of
samples (dim 0 of the example inputs) and is given for ONE sample; multiply by the micro-batch
size. Parameter figures (`num_params`, `param_bytes`) do not depend on the batch.
FLOPs are counted by PyTorch's FLOP counter on fake tensors for the example inputs; byte counts
use the dtype the model was traced in (`param_dtype`/`activation_dtype`). Cost models rescale
bytes to the training precision by `bytes * new_itemsize / traced_itemsize`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from specs._base import Frozen

OpKindName = Literal[
    "matmul", "attention", "conv", "embedding", "norm", "elementwise", "softmax", "dropout",
    "reduction", "loss", "other",
]
# How an op is split when its block is tensor-parallel (Megatron style):
#   column/row      - Linear output/input features (column->row pairs)
#   head            - attention core, split by heads
#   vocab           - embedding / output head split over the vocabulary
#   conv_out        - conv output channels (operator-wise split)
#   sequence        - norm/dropout/elementwise that sequence parallelism can split along tokens
#   replicate       - computed in full on every tp rank
TPSplit = Literal["column", "row", "head", "vocab", "conv_out", "sequence", "replicate"]


class ExpertsInfo(Frozen):
    """A mixture-of-experts layer's experts, on the op that computes them (one op per MoE layer:
    the bundled models' `planner.models.moe.expert_mlp`, a Hugging Face experts module). What
    expert parallelism and its cost terms read (cost_models.experts):

        routed rows per sample = tokens_per_sample * top_k      (dropless: every token meets k experts)
        all-to-all bytes per sample, each way = routed rows * hidden * activation itemsize
        one expert's GEMM at r rows = 2 * r * hidden * ffn_hidden FLOPs (gemms of them per row block)

    The op's own fwd/bwd FLOPs, bytes and param_bytes cover all experts, as one process computes
    them; its kind is "matmul"."""

    num_experts: int = Field(gt=0, description="Experts in the layer (E).")
    top_k: int = Field(gt=0, description="Experts each token is routed to (k).")
    hidden: int = Field(gt=0, description="Width of a routed row (the model's hidden size).")
    ffn_hidden: int = Field(gt=0, description="Each expert's inner width.")
    gemms: int = Field(default=2, gt=0, description="GEMMs per expert in forward (2: GELU MLP, 3: SwiGLU).")
    tokens_per_sample: int = Field(gt=0, description="Tokens entering the layer per sample (routed rows / k).")
    num_params: int = Field(ge=0, description="Parameters of all E experts (what expert parallelism shards).")
    param_bytes: float = Field(ge=0, description="Their bytes at the traced dtype.")

    @property
    def routed_rows_per_sample(self) -> int:
        return self.tokens_per_sample * self.top_k


class OpInfo(Frozen):
    name: str = Field(description="Node name in the traced graph (module path for module calls).")
    target: str = Field(description="What the node calls, e.g. 'aten.mm' or 'Linear'.")
    kind: OpKindName = Field(description="Op family, selects the efficiency curve.")
    fwd_flops_per_sample: float = Field(ge=0, description="Forward FLOPs for one sample.")
    bwd_flops_per_sample: float = Field(ge=0, description="Backward FLOPs for one sample (input + weight grads).")
    bytes_per_sample: float = Field(ge=0, description="Activation bytes read + written in forward, one sample.")
    param_bytes: float = Field(default=0, ge=0, description="Bytes of parameters the op reads.")
    tp_split: TPSplit = Field(default="replicate", description="How tensor parallelism splits this op.")
    gemm_mnk: tuple[int, int, int] | None = Field(
        default=None, description="(m, n, k) of the op's matmul for one sample (m grows with batch)."
    )
    output_shape: list[int] | None = Field(
        default=None, description="Shape of the op's output at the traced example batch."
    )
    dtype: str | None = Field(default=None, description="dtype of the op's output (fp32, bf16, ...).")
    gemm_batched: bool | None = Field(
        default=None,
        description="For matmuls: True when the op is a batch of independent GEMMs (activation x "
        "activation, both operands >= 3-D, e.g. attention's q @ k^T), each of 2*out[-2]*out[-1]*k "
        "FLOPs; False when PyTorch folds it into one GEMM (a Linear on a 3-D input). None: not "
        "recorded (cost models then decide from param_bytes and output_shape).",
    )
    copy_bytes_per_sample: float = Field(
        default=0, ge=0,
        description="Bytes read + written, one sample, by materialising copies the forward makes "
        "for this op beyond its own kernel (e.g. torch.matmul cloning a transposed q into bmm "
        "layout, or a following reshape of its non-contiguous output); separate kernels.",
    )
    bwd_copy_bytes_per_sample: float = Field(
        default=0, ge=0,
        description="The same for the op's backward (reshapes of gradients that arrive transposed).",
    )
    num_copies: int = Field(default=0, ge=0, description="Copy kernels behind copy_bytes_per_sample.")
    num_bwd_copies: int = Field(default=0, ge=0, description="Copy kernels behind bwd_copy_bytes_per_sample.")
    experts: ExpertsInfo | None = Field(
        default=None, description="Set on the op computing a mixture-of-experts layer's experts."
    )


class TPCandidate(Frozen):
    kind: Literal["mlp", "gated_mlp", "attention", "vocab_embedding", "output_head", "conv"] = Field(
        description="Pattern the split follows."
    )
    modules: dict[str, Literal["colwise", "rowwise", "vocab", "conv_out", "replicate", "head_norm"]] = Field(
        description="Module path inside the block -> parallel style (head_norm: a per-head module inside "
        "a head-split attention, replicated with its gradient summed over tp)."
    )
    divisor: int = Field(gt=0, description="tp must divide this (heads, kv heads, features, channels).")


class FusedAttentionSaved(Frozen):
    """What a layer's fused attention calls (`F.scaled_dot_product_attention`) save for backward,
    by the kernel that runs them, one sample. The tracer measures the math path (it forces it, so
    the figures do not depend on the device traced on); flash-family kernels (CUDA flash,
    memory-efficient, cuDNN) keep q, k, v, the output and an fp32 log-sum-exp instead. Cost models
    pick by `HardwareSpec.attention_kernel`:

        flash saved = saved_bytes_per_sample - math_bytes + flash_bytes (+ flash_fp32_bytes)
        flash core  = saved_bytes_attention_core_per_sample - math_core_bytes + flash_core_bytes
                      (+ flash_fp32_bytes)

    All but `flash_fp32_bytes_per_sample` are at the traced activation dtype (rescaled like every
    other activation); the log-sum-exp is fp32 whatever the training precision."""

    math_bytes_per_sample: float = Field(
        ge=0, description="Part of saved_bytes_per_sample that the math path keeps for these calls: its "
        "own tensors (bmm-layout copies of q, k, v; the a*s^2 probabilities and dropout mask) and the "
        "output as its consumers keep it.",
    )
    math_core_bytes_per_sample: float = Field(
        ge=0, description="The score part: of math_bytes, what selective recompute drops on the math path "
        "(its own tensors less q, k, v, which the recompute keeps: the a*s^2 probabilities and dropout "
        "mask). Included in saved_bytes_attention_core_per_sample.",
    )
    flash_bytes_per_sample: float = Field(
        ge=0, description="What flash kernels keep in place of math_bytes: q, k, v (where nothing else "
        "keeps them already) and the output (which its consumers' views share).",
    )
    flash_fp32_bytes_per_sample: float = Field(
        ge=0, description="The fp32 log-sum-exp flash kernels keep (batch x heads x queries x 4 bytes).",
    )
    flash_core_bytes_per_sample: float = Field(
        ge=0, description="Of flash_bytes, what selective recompute drops (the output where no consumer "
        "keeps it); the log-sum-exp is dropped too.",
    )
    kv_bytes_per_sample: float = Field(
        default=0, ge=0, description="Bytes of the calls' key and value arguments (at the traced activation "
        "dtype): what context parallelism all-gathers over its group, and keeps gathered for backward.",
    )
    context_parallel: bool = Field(
        default=False, description="Every call is causal or unmasked (no attn_mask tensor): torch's "
        "context_parallel can split it along the sequence.",
    )


class LayerType(Frozen):
    name: str = Field(description="Layer-type key; repeated blocks share one.")
    module_type: str = Field(description="Python class of the block module.")
    num_params: int = Field(ge=0)
    param_bytes: float = Field(ge=0, description="Parameter bytes at the traced dtype.")
    fwd_flops_per_sample: float = Field(ge=0)
    bwd_flops_per_sample: float = Field(ge=0)
    saved_bytes_per_sample: float = Field(
        ge=0, description="Activation bytes saved for backward (saved-tensor hooks), one sample."
    )
    saved_bytes_attention_core_per_sample: float = Field(
        default=0, ge=0,
        description="Part of saved bytes inside the attention core (scores, softmax, dropout mask); "
        "selective recompute drops it.",
    )
    saved_bytes_replicated_per_sample: float = Field(
        default=0, ge=0,
        description="Part of saved bytes that tensor parallelism does not split (norm inputs, "
        "residuals); sequence parallelism does.",
    )
    fused_attention: FusedAttentionSaved | None = Field(
        default=None, description="Saved bytes of fused attention calls by kernel family (None: no fused "
        "attention in this layer; its saved bytes are the same on every device).",
    )
    input_bytes_per_sample: float = Field(ge=0, description="Bytes entering the block (kept by full recompute).")
    output_bytes_per_sample: float = Field(ge=0, description="Bytes leaving the block (pipeline p2p).")
    ops: list[OpInfo] = Field(default_factory=list)
    tp_candidates: list[TPCandidate] = Field(default_factory=list)
    num_heads: int | None = Field(default=None, description="Attention heads, where the block has attention.")
    unsplit_attention: str | None = Field(
        default=None,
        description="Why the block's attention is not split by heads under tensor parallelism (it then "
        "runs whole on every tp rank, so sequence parallelism, which splits the tokens it mixes, is not "
        "offered); None when it is split or the block has none.",
    )


class Block(Frozen):
    name: str = Field(description="Module path of the block (e.g. 'layers.3'), or a synthetic name.")
    layer_type: str = Field(description="Key into ModelGraph.layer_types.")
    index: int = Field(ge=0)
    modules: list[str] = Field(
        default_factory=list,
        description="Module paths the block consists of, in execution order (several when small "
        "leaf modules were merged, e.g. a ResNet stem conv1+bn1+relu+maxpool).",
    )


class CutPoint(Frozen):
    after_block: int = Field(ge=0, description="A pipeline stage may end after this block.")
    bytes_per_sample: float = Field(ge=0, description="Activation bytes crossing the cut, one sample.")


class ModelGraph(Frozen):
    name: str
    fingerprint: str = Field(description="Hash of structure, shapes and parameter counts.")
    traced_by: Literal["fx", "export", "manual"]
    param_dtype: str = Field(default="fp32", description="dtype of parameters when traced.")
    activation_dtype: str = Field(default="fp32", description="dtype of activations when traced.")
    num_params: int = Field(ge=0, description="Unique parameters (tied ones counted once).")
    seq_len: int | None = Field(default=None, description="Tokens per sample, for language models.")
    input_shapes: list[list[int]] = Field(default_factory=list, description="Example input shapes.")
    pipeline_split: Literal["fx", "export"] | None = Field(
        default=None,
        description="How a pipeline splits this model (runtime/pipeline_split.py): 'fx' when torch.fx "
        "traces it with its blocks kept whole (stages keep the original modules), 'export' otherwise "
        "(stage modules hold no nn.Linear for tensor parallelism); None: as traced_by.",
    )
    min_micro_batch_size: int = Field(
        default=1, ge=1,
        description="Smallest micro-batch the model trains at: 2 when a BatchNorm in training mode "
        "would see one value per channel at one sample (PyTorch refuses to normalise it).",
    )
    input_bytes_per_sample: float = Field(default=0, ge=0)
    blocks: list[Block]
    layer_types: dict[str, LayerType]
    cut_points: list[CutPoint] = Field(default_factory=list)
    tied_blocks: list[tuple[int, int]] = Field(
        default_factory=list, description="Pairs of blocks sharing parameters (e.g. tied embedding/head)."
    )
    tied_param_bytes: float = Field(default=0, ge=0, description="Bytes of each tied parameter group.")
    trace_time_s: float = Field(default=0, ge=0)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def layer(self, block_index: int) -> LayerType:
        return self.layer_types[self.blocks[block_index].layer_type]

    @property
    def fwd_flops_per_sample(self) -> float:
        return sum(self.layer(i).fwd_flops_per_sample for i in range(self.num_blocks))

    @property
    def bwd_flops_per_sample(self) -> float:
        return sum(self.layer(i).bwd_flops_per_sample for i in range(self.num_blocks))

    @property
    def tokens_per_sample(self) -> int:
        return self.seq_len or 1

    def to_file(self, path: str) -> None:
        from specs.io import dump_data

        dump_data(self.model_dump(mode="json"), path)
