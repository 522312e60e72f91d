"""Op classification for traced graphs: which family (OpKindName) an fx node belongs to.

One table serves both tracers: torch.fx symbolic tracing (call_module nodes for torch.nn leaf
modules, call_function/call_method nodes for Python/torch functions) and torch.export (aten
overloads such as `aten.linear.default`). A node's target is normalised to a short name
(`linear`, `LayerNorm`, `softmax`, ...) and looked up; names not listed are `other`.

`VIEW_OPS` are zero-cost re-labellings (views, getitem, shape queries, asserts): they carry
dataflow but are not listed as ops of a block.
"""

from __future__ import annotations

from torch import fx, nn

_KIND_BY_NAME: dict[str, str] = {}


def _register(kind: str, names: str) -> None:
    for n in names.split():
        _KIND_BY_NAME[n] = kind


_register("matmul", "linear addmm mm bmm matmul baddbmm einsum mv addmv addbmm Linear Bilinear "
          "LazyLinear NonDynamicallyQuantizableLinear")
# A mixture-of-experts layer's experts, all E of them in one op (planner.experts): GEMMs.
_register("matmul", "expert_mlp hf_experts")
_register("attention", "scaled_dot_product_attention _scaled_dot_product_attention_math "
          "_scaled_dot_product_flash_attention _scaled_dot_product_flash_attention_for_cpu "
          "_scaled_dot_product_efficient_attention _scaled_dot_product_cudnn_attention "
          "MultiheadAttention")
# Fused attention: one call whose saved tensors depend on the kernel that runs it (the math path
# keeps the s x s probabilities; flash-family kernels do not). `_scaled_dot_product_attention_math`
# is the math path by name: the same on every device, so not listed.
FUSED_ATTENTION_OPS = frozenset(
    "scaled_dot_product_attention _scaled_dot_product_flash_attention "
    "_scaled_dot_product_flash_attention_for_cpu _scaled_dot_product_efficient_attention "
    "_scaled_dot_product_cudnn_attention".split()
)
_register("conv", "conv1d conv2d conv3d convolution _convolution conv_transpose1d conv_transpose2d "
          "conv_transpose3d Conv1d Conv2d Conv3d ConvTranspose1d ConvTranspose2d ConvTranspose3d")
_register("embedding", "embedding Embedding EmbeddingBag embedding_bag")
_register("norm", "layer_norm native_layer_norm batch_norm native_batch_norm _native_batch_norm_legit "
          "_native_batch_norm_legit_no_training group_norm native_group_norm rms_norm _fused_rms_norm "
          "instance_norm LayerNorm BatchNorm1d BatchNorm2d BatchNorm3d GroupNorm RMSNorm "
          "InstanceNorm1d InstanceNorm2d LocalResponseNorm")
_register("softmax", "softmax _softmax log_softmax _log_softmax Softmax LogSoftmax")
_register("dropout", "dropout native_dropout feature_dropout alpha_dropout Dropout Dropout1d "
          "Dropout2d Dropout3d AlphaDropout")
_register("loss", "cross_entropy nll_loss mse_loss l1_loss binary_cross_entropy "
          "binary_cross_entropy_with_logits CrossEntropyLoss MSELoss NLLLoss L1Loss")
_register("reduction", "sum mean amax amin max min var std logsumexp cumsum prod norm "
          "adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool2d "
          "avg_pool1d avg_pool2d avg_pool3d max_pool1d max_pool2d max_pool3d "
          "max_pool2d_with_indices AdaptiveAvgPool1d AdaptiveAvgPool2d AdaptiveAvgPool3d "
          "AvgPool1d AvgPool2d AvgPool3d MaxPool1d MaxPool2d MaxPool3d")
_register("elementwise", "add sub mul div truediv floordiv neg pow rsqrt sqrt exp log tanh sigmoid "
          "gelu silu relu relu_ leaky_relu hardtanh hardswish mish elu softplus clamp clamp_min "
          "clamp_max masked_fill where cat stack type_as float half bfloat16 to _to_copy clone "
          "contiguous copy copy_ repeat repeat_interleave abs erf sin cos reciprocal iadd imul "
          "add_ mul_ __and__ __or__ and_ or_ invert __invert__ bitwise_not logical_not eq ne lt "
          "le gt ge triu tril roll flip pad constant_pad_nd lerp addcmul addcdiv "
          "GELU ReLU SiLU Tanh Sigmoid Hardswish LeakyReLU Mish ELU Softplus Identity "
          "NewGELUActivation GELUActivation SiLUActivation PytorchGELUTanh")

# Zero-cost re-labellings: views, shape queries, container access, asserts.
VIEW_OPS = frozenset(
    "view _unsafe_view reshape transpose t permute expand expand_as unsqueeze squeeze flatten "
    "unflatten getitem getattr size sym_size dim split split_with_sizes chunk slice select "
    "as_strided detach alias unbind narrow numel _leading _assert_tensor_metadata "
    "_assert_scalar sym_constrain_range_for_size _guards_fn lift_fresh_copy movedim "
    "swapaxes view_as diagonal".split()
)


def target_name(node: fx.Node, root: nn.Module | None = None) -> str:
    """Short, process-independent name of what a node calls (no memory addresses)."""
    t = node.target
    if node.op == "call_module":
        if root is not None:
            try:
                return type(root.get_submodule(t)).__name__
            except AttributeError:
                pass
        return str(t)
    if node.op == "call_method":
        return str(t)
    if node.op == "call_function":
        name = getattr(t, "_opname", None)  # OpOverload: aten.linear.default -> linear
        if name is None:
            overload = getattr(t, "_overloadpacket", None)
            name = getattr(overload, "__name__", None)
        if name is None:
            name = getattr(t, "__name__", None) or type(t).__name__
        return name.rsplit(".", 1)[-1]
    return node.op


def op_kind(name: str) -> str | None:
    """Op family for a normalised target name; None for zero-cost view-like ops."""
    if name in VIEW_OPS:
        return None
    if name in _KIND_BY_NAME:
        return _KIND_BY_NAME[name]
    low = name.lower()
    if "norm" in low and not low.startswith("normal"):
        return "norm"
    if "dropout" in low:
        return "dropout"
    if "attention" in low:
        return "attention"
    if low.endswith("loss"):
        return "loss"
    return "other"


def full_target(node: fx.Node, root: nn.Module | None = None) -> str:
    """Readable target for OpInfo.target: 'aten.linear', 'Linear', 'matmul', ..."""
    t = node.target
    if node.op == "call_function" and hasattr(t, "_overloadpacket"):
        return str(t._overloadpacket)
    return target_name(node, root)
