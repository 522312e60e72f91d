"""Measurement on fake tensors: shapes of every node, and FLOPs / saved bytes / copies of one block.

Nothing here allocates weights or activations: parameters, buffers and inputs are converted to
FakeTensors (`FakeTensorMode.from_tensor`; meta tensors stay meta) and every node is run under
that mode.

- `propagate(...)`: one forward pass over the whole graph, without autograd, gives each node's
  fake value (shapes, dtypes) for block boundaries, cut points and layer-type signatures.
- `measure_block(...)`: one block's nodes run on fresh leaf fake inputs, with autograd:
  * FLOPs: PyTorch's own counter (`torch.utils.flop_counter.FlopCounterMode`), one for the
    forward, one for the backward (gradients of all float inputs and parameters, seeded with
    ones at the block outputs). Each counted aten op is also attributed to an fx node: in the
    forward, the node being run; in the backward, the node whose forward created the autograd
    Node that is executing (`torch._C._current_autograd_node()`).
  * Copies: the same dispatch modes count the materialising copies (`aten.clone`, `aten.copy_`,
    `aten.copy`, `aten._to_copy`; `.contiguous()` and a `reshape` that cannot be a view reach
    dispatch as `clone`) per fx node, forward and backward apart, as kernels and bytes (source
    read + output written). They are what eager PyTorch does around view-heavy code: the head
    split `view().transpose()` fed to `torch.matmul` (which folds batch dims with a reshape, so
    q, k^T and v are cloned into bmm layout), the head merge `transpose().reshape()`, and in
    backward the same reshapes of gradients that arrive transposed. Forward copies of
    parameters or of batch-independent tensors are left out (not per-sample); backward copies
    made by AccumulateGrad (a leaf's .grad) are left out. Copies inside a kernel (below
    dispatch, e.g. addmm's bias broadcast into its output on CPU, or masked_fill's clone) are not
    seen: they are part of the op's own cost. `cat`/`stack` are fx ops of their own, not copies.
  * Saved activations: `torch.autograd.graph.saved_tensors_hooks` during the forward. Tensors
    are deduplicated by storage (views and tensors saved twice count once, at the storage's
    size); parameter storages are not activations; tensors that do not depend on the model
    inputs (masks or tables built from buffers) are constant in the batch and are left out of
    the per-sample figures. Each saved storage is attributed to the node that produced it (the
    node whose output it is, else the node during whose run it was first seen).
All "per sample" figures divide by the example batch (dim 0 of the inputs): they are linear in
the micro-batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode

from planner.blocks import BlockSpec, _get_attr

# Materialising copies counted per node (see the module docstring). `contiguous` and `reshape`
# are CompositeImplicit: they reach dispatch as `clone`. `cat`/`stack` are not counted: they are
# fx ops of their own (kind "elementwise", charged by their bytes), not hidden copies.
COPY_OPS = frozenset({torch.ops.aten.clone, torch.ops.aten.copy_, torch.ops.aten.copy,
                      torch.ops.aten._to_copy})


class _NodeFlopCounter(FlopCounterMode):
    """FlopCounterMode that also attributes every counted op to the fx node `owner()` returns,
    and counts the bytes of materialising copies (COPY_OPS) per node: source bytes read +
    output bytes written, where `keep_copy(source)` says the copy is of batch-dependent data."""

    def __init__(self, owner, keep_copy=None):
        super().__init__(display=False)
        self.owner = owner
        self.keep_copy = keep_copy or (lambda src: True)
        self.by_node: dict[object, float] = {}
        self.copies_by_node: dict[object, tuple[int, int]] = {}  # node -> (kernels, bytes)

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry:
            n = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            key = self.owner()
            self.by_node[key] = self.by_node.get(key, 0) + n
        elif func_packet in COPY_OPS:
            src = args[1] if func_packet is torch.ops.aten.copy_ or func_packet is torch.ops.aten.copy else args[0]
            if isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and self.keep_copy(src):
                key = self.owner()
                if key is not None:
                    k, b = self.copies_by_node.get(key, (0, 0))
                    self.copies_by_node[key] = (k + 1, b + tensor_bytes(src) + tensor_bytes(out))
        return super()._count_flops(func_packet, out, args, kwargs)


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class FakeState:
    """Fake copies of a module's parameters/buffers (memoised, so tied tensors stay tied)."""

    def __init__(self, gm: nn.Module):
        self.gm = gm
        self.mode = FakeTensorMode(allow_non_fake_inputs=False)
        self._memo: dict[int, torch.Tensor] = {}

    def fake(self, t: torch.Tensor) -> torch.Tensor:
        key = id(t)
        if key not in self._memo:
            f = self.mode.from_tensor(t)
            if isinstance(t, nn.Parameter) and t.requires_grad:
                f.requires_grad_(True)
            self._memo[key] = f
        return self._memo[key]

    def attr(self, target: str):
        v = _get_attr(self.gm, target)
        return self.fake(v) if isinstance(v, torch.Tensor) else v

    def run_node(self, n: fx.Node, args, kwargs):
        if n.op == "call_module":
            mod = self.gm.get_submodule(n.target)
            state = {k: self.fake(v) for k, v in mod.named_parameters(remove_duplicate=False)}
            state.update({k: self.fake(v) for k, v in mod.named_buffers(remove_duplicate=False)
                          if v is not None})
            return torch.func.functional_call(mod, state, tuple(args), dict(kwargs), strict=False,
                                              tie_weights=False)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, n.target)(*rest, **kwargs)
        if n.op == "get_attr":
            return self.attr(n.target)
        raise AssertionError(n.op)

    def is_param_storage(self) -> set[int]:
        return {storage_key(f) for f in self._memo.values() if isinstance(f, torch.Tensor)}


def _load(a, env):
    return tree_map(lambda x: env[x] if isinstance(x, fx.Node) else x, a)


def propagate(
    gm: fx.GraphModule, fs: FakeState, inputs: tuple, blocks: list[BlockSpec] | None = None
) -> dict[fx.Node, object]:
    """Fake value of every node (forward only, no autograd).

    With `blocks`, a block whose pre-signature (targets, wiring, input shapes, module settings;
    `blocks.block_signature(outputs=False)`) equals an earlier block's is not run again: its
    nodes take the earlier block's values (same shapes and dtypes). 96 GPT-3 layers run once."""
    from planner.blocks import block_signature

    env: dict[fx.Node, object] = {}
    fake_inputs = [fs.fake(x) if isinstance(x, torch.Tensor) else x for x in inputs]
    it = iter(fake_inputs)
    first_of = {b.nodes[0]: b for b in (blocks or []) if b.nodes}
    seen: dict[str, BlockSpec] = {}
    with fs.mode, torch.no_grad():
        for n in gm.graph.nodes:
            if n in env:
                continue
            b = first_of.get(n)
            if b is not None and _inputs_ready(b, env):
                key = block_signature(b, env, gm, outputs=False)
                rep = seen.get(key)
                if rep is not None:
                    for mine, theirs in zip(b.nodes, rep.nodes, strict=True):
                        env[mine] = env[theirs]
                    continue
                seen[key] = b
            if n.op == "placeholder":
                env[n] = next(it, None)
            elif n.op == "output":
                continue
            elif n.op == "call_module" and str(n.target) == "_guards_fn":
                env[n] = None  # torch.export's input guards; checked by export already
            else:
                env[n] = fs.run_node(n, _load(n.args, env), _load(n.kwargs, env))
    return env


def _inputs_ready(b: BlockSpec, env) -> bool:
    members = set(b.nodes)
    return all(a in env or a in members or a.op == "get_attr" for n in b.nodes for a in n.all_input_nodes)


@dataclass
class SavedTensor:
    nbytes: int
    producer: fx.Node | None  # a node of the block, or the block input it came from
    internal: bool  # not a node's output (e.g. LayerNorm's mean/rstd, dropout mask)


@dataclass
class BlockMeasurement:
    fwd_flops: float
    bwd_flops: float
    fwd_flops_by_node: dict[fx.Node, float]
    bwd_flops_by_node: dict[fx.Node, float]
    saved: dict[int, SavedTensor]
    input_bytes: int
    output_bytes: int
    outputs: list[fx.Node] = field(default_factory=list)
    # node -> (number of copy kernels, bytes read + written), forward / backward (COPY_OPS)
    fwd_copies_by_node: dict[fx.Node, tuple[int, int]] = field(default_factory=dict)
    bwd_copies_by_node: dict[fx.Node, tuple[int, int]] = field(default_factory=dict)


def block_io(block: BlockSpec, assign: dict[fx.Node, int], index: int) -> tuple[list[fx.Node], list[fx.Node]]:
    """External inputs (non-get_attr nodes of other blocks/placeholders) and outputs of a block."""
    members = set(block.nodes)
    ins: list[fx.Node] = []
    outs: list[fx.Node] = []
    for n in block.nodes:
        for a in n.all_input_nodes:
            if a not in members and a.op != "get_attr" and a not in ins:
                ins.append(a)
        if any(u not in members for u in n.users):
            outs.append(n)
    return ins, outs


def measure_block(
    gm: fx.GraphModule,
    fs: FakeState,
    block: BlockSpec,
    env: dict[fx.Node, object],
    ins: list[fx.Node],
    outs: list[fx.Node],
    *,
    needs_grad: set[fx.Node],
    input_dependent: set[fx.Node],
) -> BlockMeasurement:
    """Run one block forward+backward on fake leaf inputs; count FLOPs, copies and saved tensors."""
    current: list[object] = [None]
    grad_owner: dict[object, fx.Node] = {}
    local: dict[fx.Node, object] = {}
    producer: dict[int, fx.Node] = {}
    saved: dict[int, SavedTensor] = {}
    keep_alive: list[torch.Tensor] = []
    param_keys: set[int] = set()

    def fwd_copy(src: torch.Tensor) -> bool:
        # batch-dependent data only: not a parameter, not a constant (mask/table from buffers)
        key = storage_key(src)
        return key not in param_keys and producer.get(key, current[0]) in input_dependent

    def bwd_owner():
        node = torch._C._current_autograd_node()
        return grad_owner.get(node)

    def bwd_copy(src: torch.Tensor) -> bool:
        # AccumulateGrad may clone a gradient into a leaf's .grad: parameter bookkeeping (and
        # absent in real training after the first micro-batch), not part of the block's backward.
        node = torch._C._current_autograd_node()
        return node is None or "AccumulateGrad" not in node.name()

    fwd = _NodeFlopCounter(lambda: current[0], fwd_copy)
    bwd = _NodeFlopCounter(bwd_owner, bwd_copy)

    def pack(t: torch.Tensor):
        key = storage_key(t)
        if key not in param_keys and key not in saved:
            node = current[0]
            internal = key not in producer
            prod = producer.get(key, node)
            dep = prod in input_dependent
            if dep:
                saved[key] = SavedTensor(t.untyped_storage().nbytes(), prod, internal)
                keep_alive.append(t)
        return t

    with fs.mode:
        for a in ins:
            v = env[a]
            if isinstance(v, torch.Tensor):
                leaf = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
                if a in needs_grad and leaf.is_floating_point():
                    leaf.requires_grad_(True)
                local[a] = leaf
                producer[storage_key(leaf)] = a
            else:
                local[a] = v
        for n in block.nodes:
            for a in n.all_input_nodes:
                if a.op == "get_attr" and a not in local:
                    local[a] = fs.attr(a.target)
            if n.op == "call_module":
                for p in gm.get_submodule(n.target).parameters():
                    fs.fake(p)
        param_keys.update(fs.is_param_storage())
        seen_autograd: set[object] = set()
        with fwd, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            for n in block.nodes:
                current[0] = n
                if n.op == "call_module" and str(n.target) == "_guards_fn":
                    local[n] = None
                    continue
                out = fs.run_node(n, _load(n.args, local), _load(n.kwargs, local))
                local[n] = out
                flat, _ = tree_flatten(out)
                for t in flat:
                    if isinstance(t, torch.Tensor):
                        producer.setdefault(storage_key(t), n)
                        _claim_autograd(t.grad_fn, n, grad_owner, seen_autograd)
        current[0] = None
        roots, grads = [], []
        for o in outs:
            for t in tree_flatten(local[o])[0]:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    roots.append(t)
                    grads.append(torch.ones_like(t))
        if roots:
            with bwd:
                torch.autograd.backward(roots, grads)

    def io_bytes(nodes):
        total = 0
        for a in nodes:
            if a in input_dependent:
                total += sum(tensor_bytes(t) for t in tree_flatten(env[a])[0] if isinstance(t, torch.Tensor))
        return total

    return BlockMeasurement(
        fwd_flops=float(fwd.get_total_flops()),
        bwd_flops=float(bwd.get_total_flops()),
        fwd_flops_by_node=fwd.by_node,
        bwd_flops_by_node=bwd.by_node,
        saved=saved,
        fwd_copies_by_node=fwd.copies_by_node,
        bwd_copies_by_node=bwd.copies_by_node,
        input_bytes=io_bytes(ins),
        output_bytes=io_bytes(outs),
        outputs=outs,
    )


def _claim_autograd(fn, owner: fx.Node, grad_owner: dict, seen: set) -> None:
    stack = [fn]
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        grad_owner[f] = owner
        stack.extend(nf for nf, _ in f.next_functions)
