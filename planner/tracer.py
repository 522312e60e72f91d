"""planner.tracer (`planner.trace`): a model and example inputs -> specs.ModelGraph.

Pipeline (each step in its own module):
1. Capture (here): `torch.fx.symbolic_trace`; if that fails (data-dependent control flow,
   tensor factories with traced sizes, Hugging Face models), `torch.export.export(strict=False)`
   (unlifted with `.module()`, so parameters are get_attr nodes again). If both fail, a
   SpecError names the module that failed and the construct, with the fix. `traced_by` records
   which capture was used. The model is traced in training mode (dropout active).
2. Shapes (`measure.propagate`): every node run once on fake tensors, no autograd.
3. Blocks (`blocks.build_blocks`) and layer types (`blocks.block_signature`).
4. Per layer type, ONE representative block is measured (`measure.measure_block`: FLOPs by
   FlopCounterMode, saved activations by saved-tensor hooks, materialising copies by the same
   dispatch mode) and analysed for tensor parallelism (`tp_candidates.analyse_block`); 96
   identical GPT-3 layers cost one measurement. Fused attention (`F.scaled_dot_product_attention`)
   is measured on the math path whatever the device (on a CPU device PyTorch would otherwise pick
   `_scaled_dot_product_flash_attention_for_cpu`, on meta the math path), and its saved bytes are
   split out per kernel family (planner.attention_bytes), so the cost model follows the target's
   kernels without re-tracing. Copies go to the op that makes them; a view-like
   node's copies (no OpInfo of its own) to its nearest costed producer (`_copy_owners`). At an
   example batch of 1 copies are counted at batch 2 (`_copy_values`: torch.matmul's batch fold
   is a view at batch 1 only).
5. Mixture-of-experts layers (`planner.experts`): the one op computing a layer's experts (the
   bundled `expert_mlp`; a Hugging Face experts module, which the capture replaces by the
   custom op `autoplan::hf_experts` because its routing loop cannot be traced) is a "matmul"
   with all experts' weights and FLOPs, and carries its ExpertsInfo.
6. Cut points and ties (`cut_points`), fingerprint (here).

Per-sample figures divide by the example batch (dim 0 of the first input) and are linear in
the micro-batch size; FLOPs and bytes are for the dtypes the model and inputs were traced in.
The fingerprint is a SHA-256 over block names, batch-free block signatures (node targets,
wiring, constants, leaf-module settings, parameter shapes, activation dtypes and ranks),
parameter counts and the input shapes without dim 0, and input dtypes: equal for the same model
in any process and at any batch size, different when any parameter shape, input shape beyond
the batch, dtype or structure differs. (Activation sizes follow from these for fx traces; a
torch.export trace bakes the batch into its shape constants, so there the fingerprint is only
stable at one batch size: trace at batch 1, autoplan's convention.)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import time

import torch
from torch import fx, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten

from planner.attention_bytes import fused_attention_bytes
from planner.blocks import BlockSpec, block_params, block_signature, build_blocks, node_module_path
from planner.cut_points import dataflow_graph, find_cut_points, input_dependent_nodes
from planner.experts import experts_info, hf_experts_standins
from planner.measure import FakeState, block_io, measure_block, propagate
from planner.ops import FUSED_ATTENTION_OPS, full_target, op_kind, target_name
from planner.tp_candidates import analyse_block, node_kind
from specs import Block, LayerType, ModelGraph, OpInfo, SpecError

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


class _PathTracer(fx.Tracer):
    """symbolic_trace that remembers which module it was inside when tracing failed."""

    def __init__(self, leaf_modules: tuple[str, ...] = ()):
        super().__init__()
        self.stack: list[str] = []
        self.failed_at: str | None = None
        self.leaf_names = set(leaf_modules)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or type(m).__name__ in self.leaf_names:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = self.stack[-1]  # innermost module: the first to see the error
            raise
        finally:
            self.stack.pop()


def _capture(model: nn.Module, inputs: tuple, leaf_modules: tuple[str, ...]):
    with hf_experts_standins(model):  # their data-dependent routing loop as one op
        return _capture_with(model, inputs, leaf_modules)


def _capture_with(model: nn.Module, inputs: tuple, leaf_modules: tuple[str, ...]):
    tracer = _PathTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__), "fx"
    except Exception as e:  # fx raises many types (TraceError, TypeError, ValueError, ...)
        fx_err = e
        where = tracer.failed_at or ""
    try:
        cfg = getattr(model, "config", None)
        old_cache = getattr(cfg, "use_cache", None)
        if old_cache:
            cfg.use_cache = False  # a DynamicCache in the output breaks export
        try:
            with _quiet_torch_logs():  # a failure is reported below, in one line
                ep = torch.export.export(model, tuple(inputs), strict=False)
        finally:
            if old_cache:
                cfg.use_cache = old_cache
        return ep.module(), "export"
    except Exception as e:
        ex_err = e
    mod = where or "(top level)"
    cls = type(model.get_submodule(where)).__name__ if where else type(model).__name__
    raise SpecError(
        f"cannot trace module {mod!r} ({cls}): torch.fx failed with "
        f"{type(fx_err).__name__}: {_first_line(fx_err)}; torch.export failed with "
        f"{type(ex_err).__name__}: {_first_line(ex_err)}. Fix: make control flow in {mod!r} "
        f"independent of tensor values (torch.where / torch.cond), or, if it depends only on "
        f"shapes, mark it a leaf module: trace(..., leaf_modules=({mod!r},))"
    ) from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:300]


def _needs_grad(gm: fx.GraphModule, values: dict) -> set[fx.Node]:
    out: set[fx.Node] = set()
    for n in gm.graph.nodes:
        v = values.get(n)
        if not any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tree_flatten(v)[0]):
            continue
        if n.op == "get_attr":
            if isinstance(values.get(n), torch.Tensor) and isinstance(_attr(gm, n.target), nn.Parameter):
                out.add(n)
            continue
        if n.op == "call_module" and any(p.requires_grad for p in gm.get_submodule(n.target).parameters()):
            out.add(n)
        elif any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def _attr(gm, target):
    obj = gm
    for p in str(target).split("."):
        obj = getattr(obj, p)
    return obj


def _dtype_name(dt: torch.dtype | None) -> str:
    return _DTYPE_NAMES.get(dt, str(dt).replace("torch.", "")) if dt is not None else "fp32"


def trace(
    model: nn.Module,
    example_inputs,
    *,
    name: str | None = None,
    leaf_modules: tuple[str, ...] = (),
) -> ModelGraph:
    """Trace `model` on fake tensors into a ModelGraph.

    Args:
        model: the module (on any device, meta included; weights are never read).
        example_inputs: a tensor or a tuple of positional inputs; dim 0 is the batch.
        name: graph name (default: the model's class name).
        leaf_modules: module paths or class names that fx should keep whole.
    Returns:
        The ModelGraph (blocks, layer types with FLOPs/bytes per sample, TP candidates, cuts).
    """
    t0 = time.perf_counter()
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() == 0:
        raise SpecError("trace: example_inputs must start with a tensor whose dim 0 is the batch")
    batch = int(inputs[0].shape[0])
    modes = {m: m.training for m in model.modules()}
    model.train()
    try:
        try:
            gm, traced_by = _capture(model, inputs, tuple(leaf_modules))
            return _build(model, gm, traced_by, inputs, batch, name or type(model).__name__, t0)
        except Exception as e:
            if batch != 1 or _BN_ONE_SAMPLE not in str(e):
                raise
        # BatchNorm in training mode cannot normalise one value per channel (a ResNet's last
        # 1x1 feature map at batch 1): trace two copies of the sample instead. Everything the
        # graph records is per sample, and the fingerprint does not depend on the batch.
        two = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in inputs)
        gm, traced_by = _capture(model, two, tuple(leaf_modules))
        graph = _build(model, gm, traced_by, two, 2, name or type(model).__name__, t0)
        return graph.model_copy(update={"min_micro_batch_size": 2, "input_shapes": [list(x.shape) for x in inputs]})
    finally:
        for m, training in modes.items():
            m.training = training


_BN_ONE_SAMPLE = "Expected more than 1 value per channel when training"


@contextlib.contextmanager
def _quiet_torch_logs():
    """Silence torch loggers that print tracebacks / graph dumps for failures we turn into one
    SpecError line (fake-tensor dispatch errors, export's data-dependent guard warnings)."""
    loggers = [logging.getLogger(n) for n in ("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # export prints failing graphs to stderr
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _build(model, gm, traced_by, inputs, batch, name, t0) -> ModelGraph:
    fs = FakeState(gm)
    specs, assign = build_blocks(model, gm)
    if not specs:
        raise SpecError(f"trace: {name} has no submodules to form blocks; wrap its layers in modules")
    try:
        with _quiet_torch_logs():  # its ERROR log repeats the failure below as a traceback
            values = propagate(gm, fs, inputs, specs)
    except Exception as e:
        shapes = ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" for x in inputs
                           if isinstance(x, torch.Tensor))
        hint = ("data-dependent ops cannot run without real data" if "DataDependent" in type(e).__name__
                else f"check that example_inputs ({shapes}) have the shapes and dtypes the model expects")
        raise SpecError(f"trace: running {name} on fake tensors failed: {type(e).__name__}: "
                        f"{_first_line(e)} ({hint})") from None
    g = dataflow_graph(gm, assign)
    dependent = input_dependent_nodes(g, values)
    copy_values = _copy_values(gm, fs, inputs, specs, batch, traced_by)
    needs_grad = _needs_grad(gm, values)
    reaches_out = _reaches_output(gm, values)

    modules = dict(model.named_modules())  # the TP analysis offers styles these module types take
    sig_to_type: dict[str, str] = {}
    layer_types: dict[str, LayerType] = {}
    blocks: list[Block] = []
    sigs: list[str] = []
    block_param_sets = []
    for i, b in enumerate(specs):
        sig = block_signature(b, values, gm)
        params = block_params(gm, b)
        block_param_sets.append(params)
        sigs.append(sig)
        if sig not in sig_to_type:
            lt_name = _unique(b.module_type if len(b.modules) == 1 else b.name, layer_types)
            sig_to_type[sig] = lt_name
            layer_types[lt_name] = _measure_type(
                lt_name, b, i, gm, fs, values, assign, params, dependent, needs_grad, reaches_out, batch,
                copy_values, modules=modules)
        blocks.append(Block(name=b.name, layer_type=sig_to_type[sig], index=i, modules=list(b.modules)))

    tied, tied_bytes = _ties(block_param_sets)
    cuts = find_cut_points(g, len(blocks), values, dependent, batch)
    uniq = {id(p): p for p in model.parameters()}
    first_param = next(iter(uniq.values()), None)
    act_dtype = next((t.dtype for n in specs[0].nodes for t in tree_flatten(values.get(n))[0]
                      if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
    x0 = inputs[0]
    seq_len = int(x0.shape[1]) if x0.dim() == 2 and not x0.is_floating_point() else None
    fp = hashlib.sha256()
    free_sigs: dict[str, str] = {}  # equal full signatures give equal batch-free ones
    for b, spec, full in zip(blocks, specs, sigs, strict=True):
        sig = free_sigs.get(full)
        if sig is None:
            sig = free_sigs[full] = block_signature(spec, values, gm, shapes=False)
        fp.update(f"{b.name}:{sig}:{layer_types[b.layer_type].num_params}\n".encode())
    fp.update(repr([list(x.shape[1:]) for x in inputs if isinstance(x, torch.Tensor)]).encode())
    fp.update(repr([str(x.dtype) for x in inputs if isinstance(x, torch.Tensor)]).encode())
    return ModelGraph(
        name=name,
        fingerprint=fp.hexdigest()[:32],
        traced_by=traced_by,
        param_dtype=_dtype_name(first_param.dtype if first_param is not None else None),
        activation_dtype=_dtype_name(act_dtype),
        num_params=sum(p.numel() for p in uniq.values()),
        seq_len=seq_len,
        input_shapes=[list(x.shape) for x in inputs if isinstance(x, torch.Tensor)],
        input_bytes_per_sample=sum(x.numel() * x.element_size() for x in inputs
                                   if isinstance(x, torch.Tensor)) / batch,
        blocks=blocks,
        layer_types=layer_types,
        cut_points=cuts,
        tied_blocks=tied,
        tied_param_bytes=tied_bytes,
        pipeline_split="fx" if traced_by == "fx" or _fx_with_block_leaves(model, specs) else "export",
        trace_time_s=time.perf_counter() - t0,
    )


def _fx_with_block_leaves(model: nn.Module, specs) -> bool:
    """Whether torch.fx traces `model` with every block module kept whole, as the runtime's
    pipeline split does first (runtime/pipeline_split.py `_tracer`): code inside a block that fx
    cannot trace (sliced buffers, HF masks) does not matter then, and the stages keep the original
    nn.Linear modules that tensor parallelism needs."""
    mods = dict(model.named_modules())
    leaves = {mods[m] for b in specs for m in b.modules if m in mods and mods[m] is not model}

    class _BlockTracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return m in leaves or super().is_leaf_module(m, qualname)

    try:
        with _quiet_torch_logs():
            _BlockTracer().trace(model)
    except Exception:  # fx raises many types: any of them means the export split
        return False
    return True


def _unique(base: str, taken: dict) -> str:
    if base not in taken:
        return base
    k = 1
    while f"{base}_{k}" in taken:
        k += 1
    return f"{base}_{k}"


def _reaches_output(gm: fx.GraphModule, values) -> set[fx.Node]:
    """Nodes whose value reaches the graph output through views/elementwise/loss ops only."""
    out: set[fx.Node] = set()
    ok = {None, "elementwise", "loss", "reduction", "dropout", "softmax"}
    for n in reversed(list(gm.graph.nodes)):
        if n.op in ("output", "placeholder", "get_attr"):
            continue
        for u in n.users:
            if u.op == "output" or (u in out and node_kind(u, gm) in ok):
                out.add(n)
                break
    return out


def _ties(param_sets) -> tuple[list[tuple[int, int]], float]:
    owner: dict[int, int] = {}
    pairs: set[tuple[int, int]] = set()
    tied_bytes: dict[int, float] = {}
    for i, ps in enumerate(param_sets):
        for pid, (_, p) in ps.items():
            if pid in owner and owner[pid] != i:
                pairs.add((owner[pid], i))
                tied_bytes[pid] = p.numel() * p.element_size()
            owner.setdefault(pid, i)
    return sorted(pairs), float(sum(tied_bytes.values()))


_COPY_BATCH = 2  # batch at which copies are counted when the example batch is 1


def _copy_values(gm, fs, inputs, specs, batch, traced_by):
    """Node values at batch `_COPY_BATCH` for counting copies, or None to count at the example
    batch. At batch 1 torch.matmul's fold of (batch, heads) into one bmm batch dim is a view, so
    q and v are not copied; at any larger micro-batch they are. Copies are therefore counted at
    batch 2 when the example batch is 1 (the figures then overcount the q/v copies of a micro-batch
    of exactly 1). Only for fx traces: torch.export bakes the example batch into shape constants."""
    if batch != 1 or traced_by != "fx":
        return None
    wide = tuple(x.new_empty((_COPY_BATCH, *x.shape[1:])) if isinstance(x, torch.Tensor) and x.dim() else x
                 for x in inputs)
    try:
        with _quiet_torch_logs():
            return propagate(gm, fs, wide, specs)
    except Exception:  # a model that cannot run at batch 2: count copies at batch 1
        return None


def _measure_type(lt_name, b: BlockSpec, index, gm, fs, values, assign, params, dependent,
                  needs_grad, reaches_out, batch, copy_values=None, *, modules=None) -> LayerType:
    ins, outs = block_io(b, assign, index)
    try:
        with sdpa_kernel(SDPBackend.MATH):  # device-independent figures (see the module docstring)
            m = measure_block(gm, fs, b, values, ins, outs, needs_grad=needs_grad, input_dependent=dependent)
    except Exception as e:
        raise SpecError(f"trace: measuring block {b.name!r} on fake tensors failed: "
                        f"{type(e).__name__}: {_first_line(e)}") from None
    copy_batch = batch
    if copy_values is not None:
        try:
            with _quiet_torch_logs(), sdpa_kernel(SDPBackend.MATH):
                m2 = measure_block(gm, fs, b, copy_values, ins, outs, needs_grad=needs_grad,
                                   input_dependent=dependent)
            m.fwd_copies_by_node, m.bwd_copies_by_node = m2.fwd_copies_by_node, m2.bwd_copies_by_node
            copy_batch = _COPY_BATCH
        except Exception:
            pass  # keep the copies counted at the example batch
    tp = analyse_block(b, gm, values, input_dependent=dependent, reaches_output=reaches_out, batch=batch,
                       modules=modules)
    fused = [n for n in b.nodes if target_name(n, gm) in FUSED_ATTENTION_OPS]
    fa = fused_attention_bytes(fused, b, gm, values, m, dependent) if fused else None
    skip = fa.nodes if fa is not None else frozenset()  # their core is fa.math_core
    core = replicated = total = 0.0
    for s in m.saved.values():
        total += s.nbytes
        in_core = s.producer in tp.attention_core and s.producer not in skip
        if in_core and not (s.internal and s.producer in tp.attention_scores):
            core += s.nbytes  # q @ k^T's own copies of q and k are not scores: selective recompute keeps them
        if s.producer not in b.nodes or tp.tp_split.get(s.producer) in ("sequence", "replicate", "row"):
            replicated += s.nbytes
    if fa is not None:
        core += fa.math_core  # fused attention is an attention core too
    ops = _ops(b, gm, values, m, tp, dependent, batch, copy_batch, modules=modules)
    num_params = sum(p.numel() for _, p in params.values())
    return LayerType(
        name=lt_name,
        module_type=b.module_type,
        num_params=num_params,
        param_bytes=float(sum(p.numel() * p.element_size() for _, p in params.values())),
        fwd_flops_per_sample=m.fwd_flops / batch,
        bwd_flops_per_sample=m.bwd_flops / batch,
        saved_bytes_per_sample=total / batch,
        saved_bytes_attention_core_per_sample=core / batch,
        saved_bytes_replicated_per_sample=replicated / batch,
        fused_attention=fa.per_sample(batch) if fa is not None else None,
        input_bytes_per_sample=m.input_bytes / batch,
        output_bytes_per_sample=m.output_bytes / batch,
        ops=ops,
        tp_candidates=tp.candidates,
        num_heads=tp.num_heads,
        unsplit_attention=tp.unsplit_attention,
    )


# fx targets that ARE a copy: their copies are the op itself, already charged by its bytes.
_COPY_TARGETS = frozenset("clone contiguous copy copy_ to _to_copy type_as float half bfloat16 "
                          "double type".split())


def _copy_owners(b: BlockSpec, gm, m) -> dict[fx.Node, list[tuple[int, int]]]:
    """Costed node -> [(fwd kernels, fwd bytes), (bwd kernels, bwd bytes)] of the copies it is
    charged. A costed node keeps its own copies (none when the node is itself a copy/cast, whose
    bytes already are the copy). A view-like node (op_kind None, e.g. the head merge
    `transpose().reshape()`, or a `view` whose backward reshapes a transposed gradient) has no
    OpInfo: its copies go to the nearest costed node it reads from through view-like nodes inside
    the block (its producer, so they split by tp like that op), else the nearest costed node that
    reads it, else the block's first costed node."""
    members = set(b.nodes)
    costed = [n for n in b.nodes if op_kind(target_name(n, gm)) is not None]

    def nearest(n: fx.Node) -> fx.Node | None:
        for step in (lambda x: x.all_input_nodes, lambda x: list(x.users)):
            frontier, seen = [n], {n}
            while frontier:
                nxt = []
                for x in frontier:
                    for y in step(x):
                        if y in seen or y not in members:
                            continue
                        seen.add(y)
                        if op_kind(target_name(y, gm)) is not None:
                            return y
                        nxt.append(y)
                frontier = nxt
        return costed[0] if costed else None

    owners: dict[fx.Node, list[tuple[int, int]]] = {}
    for phase, by_node in enumerate((m.fwd_copies_by_node, m.bwd_copies_by_node)):
        for n, (kernels, nbytes) in by_node.items():
            if n not in members:
                continue
            name = target_name(n, gm)
            if name in _COPY_TARGETS:
                continue
            owner = n if op_kind(name) is not None else nearest(n)
            if owner is None:
                continue
            acc = owners.setdefault(owner, [(0, 0), (0, 0)])
            k0, b0 = acc[phase]
            acc[phase] = (k0 + kernels, b0 + nbytes)
    return owners


def _ops(b: BlockSpec, gm, values, m, tp, dependent, batch, copy_batch=None, *, modules=None) -> list[OpInfo]:
    ops: list[OpInfo] = []
    copies = _copy_owners(b, gm, m)
    members = set(b.nodes)
    for n in b.nodes:
        kind = op_kind(target_name(n, gm))
        if kind is None:
            continue
        experts = experts_info(n, gm, values, batch, within=members, modules=modules) if kind == "matmul" else None
        (fk, fb), (bk, bb) = copies.get(n, [(0, 0), (0, 0)])
        act = 0
        for t in [*_tensors_of(n.all_input_nodes, values, dependent), *_tensors_of([n], values, dependent)]:
            act += t.numel() * t.element_size()
        pbytes = 0.0
        if n.op == "call_module":
            pbytes = sum(p.numel() * p.element_size() for p in gm.get_submodule(n.target).parameters())
        pbytes += sum(values[a].numel() * values[a].element_size() for a in n.all_input_nodes
                      if a.op == "get_attr" and isinstance(values.get(a), torch.Tensor))
        out = values.get(n)
        ops.append(OpInfo(
            name=node_module_path(n) if n.op == "call_module" else n.name,
            target=full_target(n, gm),
            kind=kind,
            fwd_flops_per_sample=m.fwd_flops_by_node.get(n, 0) / batch,
            bwd_flops_per_sample=m.bwd_flops_by_node.get(n, 0) / batch,
            bytes_per_sample=act / batch,
            param_bytes=pbytes,
            tp_split=tp.tp_split.get(n, "replicate"),
            # an experts op: its first GEMM over all routed rows (m rows, n = F, k = D), folded
            gemm_mnk=((experts.routed_rows_per_sample, experts.ffn_hidden, experts.hidden) if experts is not None
                      else _gemm_mnk(n, values, kind, batch)),
            gemm_batched=False if experts is not None else _gemm_batched(n, values, kind),
            output_shape=list(out.shape) if isinstance(out, torch.Tensor) else None,
            dtype=_dtype_name(out.dtype) if isinstance(out, torch.Tensor) else None,
            copy_bytes_per_sample=fb / (copy_batch or batch),
            bwd_copy_bytes_per_sample=bb / (copy_batch or batch),
            num_copies=fk,
            num_bwd_copies=bk,
            experts=experts,
        ))
    return ops


def _tensors_of(nodes, values, dependent):
    for a in nodes:
        if a in dependent:
            for t in tree_flatten(values.get(a))[0]:
                if isinstance(t, torch.Tensor):
                    yield t


def _gemm_mnk(n: fx.Node, values, kind: str, batch: int) -> tuple[int, int, int] | None:
    """(m, n, k) for one sample: m = output rows per sample (batched dims folded in), n = output
    columns, k = the contracted dimension (last dim of the first activation operand)."""
    if kind != "matmul":
        return None
    out = values.get(n)
    acts = [values[a] for a in n.all_input_nodes
            if a.op != "get_attr" and isinstance(values.get(a), torch.Tensor) and values[a].dim() >= 2]
    if not isinstance(out, torch.Tensor) or out.dim() < 2 or not acts:
        return None
    k = int(acts[0].shape[-1])
    rows = out.numel() // out.shape[-1]
    return (max(rows // batch, 1), int(out.shape[-1]), k)


def _gemm_batched(n: fx.Node, values, kind: str) -> bool | None:
    """True when a matmul op is a batch of independent GEMMs: no parameter operand and at least two
    activation operands of >= 3 dims (attention's q @ k^T, probs @ v). False for a Linear or a
    matmul with a 1-D/2-D operand, which PyTorch folds into one GEMM of (batch * rows) rows."""
    if kind != "matmul":
        return None
    if n.op == "call_module":  # Linear, Bilinear, ...: weights, folded rows
        return False
    acts = [values[a] for a in n.all_input_nodes if isinstance(values.get(a), torch.Tensor)]
    if any(a.op == "get_attr" for a in n.all_input_nodes) or len(acts) < 2:
        return False
    return all(t.dim() >= 3 for t in acts[:2])
