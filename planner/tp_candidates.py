"""Tensor-parallel candidates of a block, found from its dataflow (not from module names).

Parametrised ops are found by their parameter operand (call_module Linear/Embedding/Conv, or a
call_function whose argument is, through views, a get_attr Parameter):
- Column -> row pairs (Megatron-LM, Shoeybi et al. 2019): from each Linear not already a row,
  walk forward through *passable* ops only (views, elementwise, dropout, softmax,
  activation x activation matmuls, attention kernels) until Linears are reached: the start is
  column-parallel, the reached ones row-parallel. Columns sharing a row form one candidate.
- Kind: `attention` when the region between them holds the matmul -> softmax -> matmul pattern
  (or an attention kernel); else `gated_mlp` with >= 2 columns, `mlp` with one.
- Divisor: attention gcd(num_heads, num_kv_heads); heads are read from the q operand of
  q @ k^T (the view/reshape before it: shape (B, H, T, d) or (B*H, T, d)); kv heads =
  out_features(k projection) / d, where the k projection is the column reaching the second
  operand (a fused qkv projection reaches both: MHA). MLPs: the width of the column output.
- Vocab-parallel embedding: an Embedding whose indices depend on the model inputs (token ids,
  not positions from a buffer); divisor = vocab. Output head: a Linear outside any pair whose
  output reaches the graph output through passable/loss ops; divisor = out_features.
- Conv: every Conv is an operator-wise candidate over output channels.
- Fixed head count: an attention whose q/k/v output is viewed as (.., -1, num_heads, head_dim),
  the -1 off the head axis (OPT), gets no candidate: a colwise split would fold the missing heads
  into another axis instead of giving each rank its local heads (`_fixed_head_view`).
- Fused projections: a column reaching more than one of the attention's q/k/v operands (one
  Linear making q, k and v) gets a head split only when its output is first viewed per head with
  the head axis inferred (`view(B, T, -1, 3 * d)` then split inside each head: Megatron-LM's and
  GPT-NeoX's layout, where a colwise split keeps whole heads). Split along the feature axis
  (`.chunk(3)`, `.split([h, kv, kv])`: nanoGPT, GPT-2, Phi-3) a colwise split would hand each
  rank a slice of q|k|v instead of its heads (silently wrong for chunk, a crash for split sizes),
  so the attention stays whole (`_fused_problem`).
- Parameters inside a head-split region (Qwen3's q_norm/k_norm over head_dim): a module whose
  parameters are all 1-D of the per-head width gets style `head_norm` (replicated weights whose
  gradient is summed over tp; runtime.tensor_parallel); any other parameter there, or a module
  the runtime cannot split (colwise/rowwise need an nn.Linear, vocab an nn.Embedding; GPT-2's
  Conv1D is neither), leaves the attention or MLP whole.
- An attention left whole under tp is recorded with the reason (`TPAnalysis.unsplit_attention`,
  LayerType.unsplit_attention): sequence parallelism, which splits the tokens it mixes, is then
  not offered (planner.capabilities).
- MultiheadAttention leaf modules (fx keeps them whole): one attention candidate with the
  module's own num_heads.

`tp_split` of every node follows: column/row/vocab/conv_out for the parametrised ops, `head`
for all nodes inside an attention region, `column` inside an MLP region, `sequence` for
norm/dropout/elementwise ops elsewhere (sequence parallelism splits them by tokens), else
`replicate`. `attention_core` is the set of nodes from q @ k^T up to (not including) probs @ v.

Module paths in candidates are relative to the block: inside a one-module block, relative to
it (`attn.q_proj` in `layers.3`); otherwise relative to the common parent of the block's
modules (`lm_head` in `transformer.ln_f+lm_head`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from planner.blocks import BlockSpec, _get_attr, node_module_path
from planner.ops import op_kind, target_name
from specs import TPCandidate

_PASSABLE = {None, "elementwise", "dropout", "softmax", "attention", "matmul"}  # matmul: act x act only


@dataclass
class ParamOp:
    node: fx.Node
    kind: str  # linear | embedding | conv
    path: str  # module path owning the weight
    weight: torch.Tensor
    out_features: int


@dataclass
class TPAnalysis:
    candidates: list[TPCandidate] = field(default_factory=list)
    tp_split: dict[fx.Node, str] = field(default_factory=dict)
    attention_core: set[fx.Node] = field(default_factory=set)
    attention_scores: set[fx.Node] = field(default_factory=set)  # the q @ k^T nodes
    num_heads: int | None = None
    num_kv_heads: int | None = None
    unsplit_attention: str | None = None  # why an attention stays whole under tp


def node_kind(n: fx.Node, gm: nn.Module) -> str | None:
    if n.op in ("placeholder", "output", "get_attr"):
        return None
    return op_kind(target_name(n, gm))


def _param_source(a, gm: nn.Module) -> tuple[str, torch.Tensor] | None:
    """(qualified name, Parameter) when `a` is, through views, a get_attr Parameter."""
    seen = 0
    while isinstance(a, fx.Node) and seen < 8:
        if a.op == "get_attr":
            t = _get_attr(gm, a.target)
            return (str(a.target), t) if isinstance(t, nn.Parameter) else None
        if node_kind(a, gm) is not None or not a.args:
            return None
        a = a.args[0]
        seen += 1
    return None


def param_op(n: fx.Node, gm: nn.Module, values: dict) -> ParamOp | None:
    kind = node_kind(n, gm)
    if kind not in ("matmul", "embedding", "conv"):
        return None
    pk = {"matmul": "linear", "embedding": "embedding", "conv": "conv"}[kind]
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor):
            return None
        path, weight = str(n.target), w
    else:
        src = None
        for a in n.args:
            src = _param_source(a, gm)
            if src is not None and src[1].dim() >= 2:
                break
            src = None
        if src is None:
            return None
        path, weight = src[0].rsplit(".", 1)[0] if "." in src[0] else "", src[1]
        owner = node_module_path(n)  # prefer the module the op ran in, when it owns the weight
        if owner is not None:
            try:
                mod = gm.get_submodule(owner)
                if any(p is weight for p in mod.parameters(recurse=False)):
                    path = owner
            except AttributeError:
                pass
    out = values.get(n)
    if pk == "embedding":
        width = weight.shape[0]
    elif pk == "conv":
        width = weight.shape[0]
    else:
        width = out.shape[-1] if isinstance(out, torch.Tensor) else weight.shape[0]
    return ParamOp(n, pk, path, weight, int(width))


def relative_path(block: BlockSpec, path: str) -> str:
    mods = block.modules
    if len(mods) == 1 and path == mods[0]:
        return ""  # the block is the module itself (the MLP's `head` Linear)
    if len(mods) == 1 and path.startswith(mods[0] + "."):
        return path[len(mods[0]) + 1:]
    parents = [m.rsplit(".", 1)[0] if "." in m else "" for m in mods]
    base = parents[0]
    for p in parents[1:]:
        while base and not (p == base or p.startswith(base + ".")):
            base = base.rsplit(".", 1)[0] if "." in base else ""
    return path[len(base) + 1:] if base and path.startswith(base + ".") else path


def analyse_block(
    block: BlockSpec,
    gm: nn.Module,
    values: dict,
    *,
    input_dependent: set[fx.Node],
    reaches_output: set[fx.Node],
    batch: int,
    modules: dict[str, nn.Module] | None = None,
) -> TPAnalysis:
    """TP candidates and per-node splits of one block. `modules` (module path -> module of the
    original model) lets the analysis offer only styles the runtime can apply to those modules;
    without it the module types are not checked."""
    members = set(block.nodes)
    res = TPAnalysis()
    pops = {n: p for n in block.nodes if (p := param_op(n, gm, values)) is not None}
    linears = [n for n in block.nodes if n in pops and pops[n].kind == "linear"]

    def passable(n: fx.Node) -> bool:
        return n in members and n not in pops and node_kind(n, gm) in _PASSABLE

    rows: set[fx.Node] = set()
    reach: dict[fx.Node, tuple[set[fx.Node], set[fx.Node]]] = {}
    for lin in linears:
        if lin in rows:
            continue
        visited: set[fx.Node] = set()
        targets: set[fx.Node] = set()
        stack = [lin]
        while stack:
            u = stack.pop()
            for v in u.users:
                if v in pops and pops[v].kind == "linear" and v in members:
                    targets.add(v)
                elif passable(v) and v not in visited:
                    visited.add(v)
                    stack.append(v)
        if targets:
            reach[lin] = (visited, targets)
            rows |= targets

    # group columns that share a row target
    groups: list[tuple[list[fx.Node], set[fx.Node]]] = []
    for col, (_, tg) in reach.items():
        for g in groups:
            if g[1] & tg:
                g[0].append(col)
                g[1].update(tg)
                break
        else:
            groups.append(([col], set(tg)))

    for cols, rws in groups:
        region = _region(cols, rws, reach)
        attn = _attention_pattern(region, gm)
        if attn is not None:
            m1, m2, core = attn
            q_val = values.get(m1.args[0]) if isinstance(m1.args[0], fx.Node) else None
            heads = _heads_from(q_val, batch)
            kv = heads
            hd = q_val.shape[-1] if isinstance(q_val, torch.Tensor) else None
            k_arg = m1.args[1] if len(m1.args) > 1 else None
            for c in cols:
                vis = reach[c][0]
                if k_arg in vis and m1.args[0] not in vis and hd:
                    kv = pops[c].out_features // hd
            res.attention_core |= core
            res.attention_scores.add(m1)
            if heads:
                res.num_heads, res.num_kv_heads = heads, kv
            why = None
            if _fixed_head_view(cols, reach, gm, values):
                why = "its q/k/v view hard-codes the head count"
            if why is None:
                why = _fused_problem(cols, reach, _operands(m1, m2, core), gm, values)
            head_mods, problem = _head_params(region, gm, values)
            why = why or problem or _module_problem(cols, rws, pops, modules)
            if why is not None:
                # No head split offered; the projections and the attention between them stay
                # replicated (whole on every tp rank).
                for n in region | set(cols) | set(rws):
                    res.tp_split[n] = "replicate"
                res.unsplit_attention = res.unsplit_attention or f"{_where(block, cols, pops)}: {why}"
                continue
            divisor = math.gcd(heads, kv) if heads and kv else 1
            kind = "attention"
            split = "head"
        else:
            kind = "gated_mlp" if len(cols) >= 2 else "mlp"
            divisor = math.gcd(*[pops[c].out_features for c in cols])
            split = "column"
            head_mods = []
            if _module_problem(cols, rws, pops, modules) is not None:
                continue  # left replicated: the runtime cannot split these modules
        for n in region:
            res.tp_split[n] = split
        for c in cols:
            res.tp_split[c] = "column"
        for r in rws:
            res.tp_split[r] = "row"
        mods = {relative_path(block, pops[c].path): "colwise" for c in cols}
        mods.update({relative_path(block, pops[r].path): "rowwise" for r in sorted(rws, key=block.nodes.index)})
        mods.update({relative_path(block, m): "head_norm" for m in head_mods})
        res.candidates.append(TPCandidate(kind=kind, modules=mods, divisor=max(divisor, 1)))

    paired = set(reach) | rows
    for n in block.nodes:
        p = pops.get(n)
        if p is None or n in paired:
            continue
        if p.kind != "conv" and _module_problem([n], [], pops, modules, vocab=p.kind == "embedding"):
            continue  # a style the runtime cannot apply to this module: left replicated
        if p.kind == "embedding" and any(a in input_dependent for a in n.all_input_nodes):
            res.tp_split[n] = "vocab"
            res.candidates.append(TPCandidate(kind="vocab_embedding", divisor=p.out_features,
                                              modules={relative_path(block, p.path): "vocab"}))
        elif p.kind == "linear" and n in reaches_output:
            res.tp_split[n] = "vocab"
            # The op is vocab-split; the module style is colwise (a Linear's output features),
            # which is what runtime.tensor_parallel applies to an output head ("vocab" is its
            # style for an nn.Embedding and is refused on a Linear).
            res.candidates.append(TPCandidate(kind="output_head", divisor=p.out_features,
                                              modules={relative_path(block, p.path): "colwise"}))
        elif p.kind == "conv":
            res.tp_split[n] = "conv_out"
            res.candidates.append(TPCandidate(kind="conv", divisor=p.out_features,
                                              modules={relative_path(block, p.path): "conv_out"}))
    for n in block.nodes:
        if n.op == "call_module" and type(gm.get_submodule(n.target)).__name__ == "MultiheadAttention":
            mod = gm.get_submodule(n.target)
            res.num_heads = res.num_kv_heads = int(mod.num_heads)
            res.tp_split[n] = "head"
            path = relative_path(block, str(n.target))
            res.candidates.append(TPCandidate(kind="attention", divisor=int(mod.num_heads),
                                              modules={path: "colwise", f"{path}.out_proj": "rowwise"}))
    for n in block.nodes:
        if n not in res.tp_split:
            k = node_kind(n, gm)
            res.tp_split[n] = "sequence" if k in ("norm", "dropout", "elementwise") else "replicate"
    return res


_VIEWS = {"view", "reshape", "_unsafe_view"}
_SPLITS = {"chunk", "split", "split_with_sizes", "tensor_split", "unbind", "narrow", "getitem",
           "unsafe_split", "unsafe_chunk", "slice", "select"}


def _operands(m1: fx.Node, m2: fx.Node, core: set[fx.Node]) -> list[fx.Node]:
    """The attention's q, k and v operands: q @ k^T's two inputs and probs @ v's input that is not
    the probabilities (or a fused kernel's first three arguments)."""
    if m1 is m2:
        return [a for a in m1.args[:3] if isinstance(a, fx.Node)]
    ops = [a for a in m1.args[:2] if isinstance(a, fx.Node)]
    ops += [a for a in m2.args[:2] if isinstance(a, fx.Node) and a not in core]
    return ops


def _fused_problem(cols, reach, operands: list[fx.Node], gm, values: dict) -> str | None:
    """Why a fused q/k/v projection cannot be split colwise (see the module docstring), or None."""
    for c in cols:
        visited = reach[c][0]
        if sum(1 for op in operands if op in visited) < 2:
            continue  # one projection per operand (or a fused k/v pair handled below alike)
        out = values.get(c)
        width = out.dim() if isinstance(out, torch.Tensor) else None
        head_view = False
        for n in visited:
            name = target_name(n, gm) if n.op in ("call_function", "call_method") else ""
            src = values.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
            if not isinstance(src, torch.Tensor):
                continue
            if name in _SPLITS and width is not None and src.dim() <= width:
                return (f"one projection makes q, k and v and is split along its features "
                        f"({name}); a colwise split would give each rank a slice of q|k|v, not its heads")
            if name in _VIEWS:
                shape = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else n.args[1:]
                shape = list(shape)
                res = values.get(n)
                if (isinstance(res, torch.Tensor) and res.dim() == src.dim() + 1 and len(shape) == res.dim()
                        and isinstance(shape[-2], int) and shape[-2] == -1):
                    head_view = True
        if not head_view:
            return "one projection makes q, k and v without a per-head view whose head axis is inferred"
    return None


def _head_params(region: set[fx.Node], gm, values: dict) -> tuple[list[str], str | None]:
    """Modules owning parameters inside a head-split region: ([module path], None) when each is
    a per-head module the runtime replicates with a tp-summed gradient (`head_norm`: all its
    parameters 1-D of the per-head width, e.g. Qwen3's q_norm over head_dim), else ([], why)."""
    found: list[str] = []
    for n in region:
        for a in n.all_input_nodes:
            if a.op != "get_attr" or not isinstance(_get_attr(gm, a.target), nn.Parameter):
                continue  # buffers (causal masks, rotary tables) are not trained
            t = values.get(a)
            if not isinstance(t, torch.Tensor):
                continue
            out = values.get(n)
            width = out.shape[-1] if isinstance(out, torch.Tensor) and out.dim() else None
            path = str(a.target).rsplit(".", 1)[0] if "." in str(a.target) else ""
            if t.dim() != 1 or width is None or t.shape[0] != width or not path:
                return [], (f"parameter {a.target} {tuple(t.shape)} acts on the head-split tensors and is "
                            f"not a per-head norm weight")
            if path not in found:
                found.append(path)
    return sorted(found), None


def _module_problem(cols, rows, pops: dict, modules: dict | None, *, vocab: bool = False) -> str | None:
    """Why the runtime cannot apply colwise/rowwise (nn.Linear) or vocab (nn.Embedding) to these
    ops' modules, or None (also when the module types are unknown)."""
    if modules is None:
        return None
    want = nn.Embedding if vocab else nn.Linear
    for n in [*cols, *rows]:
        mod = modules.get(pops[n].path)  # None: a path the tracer names differently; not judged
        if mod is not None and not isinstance(mod, want):
            return (f"{pops[n].path} is a {type(mod).__name__}; the runtime's tensor-parallel styles "
                    f"split only {want.__name__} modules")
    return None


def _where(block: BlockSpec, cols, pops: dict) -> str:
    return f"{block.name} ({', '.join(relative_path(block, pops[c].path) or block.name for c in cols)})"


def _fixed_head_view(cols, reach, gm, values: dict) -> bool:
    """True when a q/k/v projection's output is split into (heads, head_dim) by a view/reshape
    whose target shape puts -1 anywhere but the head axis, e.g. OPT's
    `view(bsz, -1, num_heads, head_dim)` (transformers opt/modeling_opt.py): the head count is
    then a constant, so under a colwise split (local heads) the -1 absorbs the missing heads into
    another axis (the sequence) instead of giving each rank its heads. `view(B, T, -1, hd)`
    (the head axis inferred) is what head-parallel attention needs. A view with no -1 at all is
    not flagged (traced sizes are constants, whatever the source code computed them from)."""
    for c in cols:
        for n in reach[c][0]:
            if n.op not in ("call_function", "call_method") or target_name(n, gm) not in _VIEWS or not n.args:
                continue
            src, out = values.get(n.args[0]), values.get(n)
            if not (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor)):
                continue
            # a split of the last (feature) axis into (heads, head_dim)
            if out.dim() != src.dim() + 1 or out.shape[-2] * out.shape[-1] != src.shape[-1] or out.shape[-2] < 2:
                continue
            shape = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else n.args[1:]
            shape = list(shape)
            if len(shape) != out.dim():
                continue
            if any(isinstance(v, int) and v == -1 and i != len(shape) - 2 for i, v in enumerate(shape)):
                return True
    return False


def _region(cols, rows, reach) -> set[fx.Node]:
    """Nodes on paths from the columns to the rows (the visited nodes that lead to a row)."""
    visited = set().union(*(reach[c][0] for c in cols))
    region: set[fx.Node] = set()
    stack = list(rows)
    while stack:
        v = stack.pop()
        for a in v.all_input_nodes:
            if a in visited and a not in region:
                region.add(a)
                stack.append(a)
    return region


def _attention_pattern(region: set[fx.Node], gm) -> tuple[fx.Node, fx.Node, set[fx.Node]] | None:
    """(q@k^T node, probs@v node, core nodes) if the region holds matmul -> softmax -> matmul."""
    for s in region:
        if node_kind(s, gm) != "softmax":
            continue
        up = _walk(s, region, gm, backwards=True)
        down = _walk(s, region, gm, backwards=False)
        if up is None or down is None:
            continue
        m1, path_up = up
        m2, path_down = down
        return m1, m2, {m1, s} | path_up | path_down
    for n in region:
        if node_kind(n, gm) == "attention":
            return n, n, {n}
    return None


def _walk(start: fx.Node, region: set[fx.Node], gm, backwards: bool):
    """Nearest activation x activation matmul from `start` within the region, and the nodes between."""
    frontier = [(start, frozenset())]
    seen = {start}
    while frontier:
        u, path = frontier.pop(0)
        nxt = u.all_input_nodes if backwards else list(u.users)
        for v in nxt:
            if v not in region or v in seen:
                continue
            seen.add(v)
            if node_kind(v, gm) == "matmul":
                return v, set(path)
            frontier.append((v, path | {v}))
    return None


def _heads_from(q, batch: int) -> int | None:
    if not isinstance(q, torch.Tensor):
        return None
    if q.dim() == 4:
        return int(q.shape[1])
    if q.dim() == 3 and batch and q.shape[0] % batch == 0:
        return int(q.shape[0] // batch)
    return None
