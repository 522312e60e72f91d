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
) -> TPAnalysis:
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
            if _fixed_head_view(cols, reach, gm, values):
                # No head split offered: the module hard-codes its head count (see _fixed_head_view);
                # the projections and the attention between them stay replicated.
                for n in region | set(cols) | set(rws):
                    res.tp_split[n] = "replicate"
                continue
            divisor = math.gcd(heads, kv) if heads and kv else 1
            kind = "attention"
            split = "head"
        else:
            kind = "gated_mlp" if len(cols) >= 2 else "mlp"
            divisor = math.gcd(*[pops[c].out_features for c in cols])
            split = "column"
        for n in region:
            res.tp_split[n] = split
        for c in cols:
            res.tp_split[c] = "column"
        for r in rws:
            res.tp_split[r] = "row"
        mods = {relative_path(block, pops[c].path): "colwise" for c in cols}
        mods.update({relative_path(block, pops[r].path): "rowwise" for r in sorted(rws, key=block.nodes.index)})
        res.candidates.append(TPCandidate(kind=kind, modules=mods, divisor=max(divisor, 1)))

    paired = set(reach) | rows
    for n in block.nodes:
        p = pops.get(n)
        if p is None or n in paired:
            continue
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
