"""Block discovery: module-level units of a traced model, in execution order, and layer types.

Algorithm (generic, no per-model tables):
1. Repeated runs. In every module, a run is >= 2 consecutive children with identical structure
   (class, parameter and buffer shapes/dtypes, recursively) that hold parameters. Runs holding
   >= `RUN_PARAM_FRACTION` of the model's parameters are *significant*. We do not look for runs
   inside the elements of a run (an MoE layer's experts stay inside their layer).
2. Units. Starting at the root, a child is expanded into its own children when it is a pure
   container (ModuleList/Sequential/ModuleDict) or an ancestor of a significant run; otherwise
   it is a unit. Run elements are always units. So GPT gives `embed`, `layers.i`, `head`; ResNet
   gives conv1, bn1, relu, maxpool, each Bottleneck, avgpool, fc; ViT descends into `encoder`.
3. Order and merging. Units are ordered by their first node in the graph (execution order,
   not definition order). Consecutive *leaf* units (no children) outside runs merge into one
   block (ResNet's stem conv1+bn1+relu+maxpool, the pooling+fc head, HF wte+wpe+drop).
4. Node assignment. A node belongs to the unit whose path prefixes its module path (from
   `nn_module_stack`, or the target for call_module). Free nodes (ops written in a container's
   forward) go to the latest block among their producers, else to the previous block.
   get_attr nodes are state, not ops: they belong to no block (see `block_params`).
5. Layer types. Blocks whose node sequences are identical (targets, argument wiring, output
   shapes/dtypes, parameter shapes) share a layer type; see `block_signature`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from planner.ops import target_name

RUN_PARAM_FRACTION = 0.10
_PROXY_NAME = re.compile(r"Proxy\([\w.]+\)")
_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


@dataclass
class BlockSpec:
    name: str
    modules: list[str]
    nodes: list[fx.Node] = field(default_factory=list)
    module_type: str = ""
    in_run: bool = False


def _num_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def module_signature(m: nn.Module, memo: dict[int, str]) -> str:
    """Structural hash of a module: class, parameter/buffer shapes and dtypes, children."""
    key = id(m)
    if key in memo:
        return memo[key]
    parts = [type(m).__qualname__]
    for n, p in m.named_parameters(recurse=False):
        parts.append(f"p:{n}:{tuple(p.shape)}:{p.dtype}")
    for n, b in m.named_buffers(recurse=False):
        if b is not None:
            parts.append(f"b:{n}:{tuple(b.shape)}:{b.dtype}")
    for n, c in m.named_children():
        parts.append(f"c:{n}:{module_signature(c, memo)}")
    sig = hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]
    memo[key] = sig
    return sig


def _find_runs(m: nn.Module, prefix: str, memo: dict[int, str], out: list[tuple[str, list[str], int]]):
    children = list(m.named_children())
    in_run: set[str] = set()
    i = 0
    while i < len(children):
        j = i
        sig = module_signature(children[i][1], memo)
        while j + 1 < len(children) and module_signature(children[j + 1][1], memo) == sig:
            j += 1
        if j > i and _num_params(children[i][1]) > 0:
            names = [prefix + children[k][0] for k in range(i, j + 1)]
            out.append((prefix.rstrip("."), names, sum(_num_params(children[k][1]) for k in range(i, j + 1))))
            in_run.update(names)
        i = j + 1
    for name, c in children:
        if prefix + name not in in_run:
            _find_runs(c, prefix + name + ".", memo, out)


def discover_units(model: nn.Module) -> tuple[list[str], set[str]]:
    """Unit module paths (definition order) and the set of paths that are run elements."""
    memo: dict[int, str] = {}
    runs: list[tuple[str, list[str], int]] = []
    _find_runs(model, "", memo, runs)
    total = max(_num_params(model), 1)
    significant = [r for r in runs if r[2] >= RUN_PARAM_FRACTION * total]
    run_elements = {n for r in runs for n in r[1]}
    expand: set[str] = set()
    for parent, _, _ in significant:
        parts = parent.split(".") if parent else []
        for k in range(len(parts) + 1):
            expand.add(".".join(parts[:k]))

    units: list[str] = []

    def walk(mod: nn.Module, path: str) -> None:
        for name, child in mod.named_children():
            p = f"{path}.{name}" if path else name
            if p not in run_elements and (p in expand or isinstance(child, _CONTAINERS)):
                if len(list(child.children())) == 0:
                    continue  # empty container
                walk(child, p)
            else:
                units.append(p)

    walk(model, "")
    return units, run_elements


def node_module_path(node: fx.Node) -> str | None:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return _clean_path(path)


def _clean_path(path: str) -> str:
    # torch.export sometimes spells paths as L['self'].layers[0] or L__self___layers_0
    path = path.replace("L['self'].", "").replace("L['self']", "")
    if "[" in path:
        path = path.replace("[", ".").replace("]", "").replace("'", "")
    return path


def _unit_of(path: str | None, unit_set: set[str], cache: dict[str, str | None]) -> str | None:
    if path is None:
        return None
    if path in cache:
        return cache[path]
    p = path
    found = None
    while True:
        if p in unit_set:
            found = p
            break
        if "." not in p:
            break
        p = p.rsplit(".", 1)[0]
    cache[path] = found
    return found


def build_blocks(model: nn.Module, gm: fx.GraphModule) -> tuple[list[BlockSpec], dict[fx.Node, int]]:
    """Blocks in execution order and the block index of every op node (placeholders: -1)."""
    units, run_elements = discover_units(model)
    unit_set = set(units)
    cache: dict[str, str | None] = {}
    nodes = list(gm.graph.nodes)
    first_seen: dict[str, int] = {}
    node_unit: dict[fx.Node, str | None] = {}
    for i, n in enumerate(nodes):
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        u = _unit_of(node_module_path(n), unit_set, cache)
        node_unit[n] = u
        if u is not None and u not in first_seen:
            first_seen[u] = i
    ordered = sorted(first_seen, key=first_seen.__getitem__)

    def is_leaf(path: str) -> bool:
        return len(list(model.get_submodule(path).children())) == 0

    blocks: list[BlockSpec] = []
    unit_block: dict[str, int] = {}
    for u in ordered:
        mergeable = u not in run_elements and is_leaf(u)
        prev = blocks[-1] if blocks else None
        if mergeable and prev is not None and not prev.in_run and all(is_leaf(m) for m in prev.modules):
            prev.modules.append(u)
            prev.name = "+".join(prev.modules)
        else:
            blocks.append(BlockSpec(name=u, modules=[u], in_run=u in run_elements,
                                    module_type=type(model.get_submodule(u)).__name__))
        unit_block[u] = len(blocks) - 1
    for b in blocks:
        if len(b.modules) > 1:
            b.module_type = "+".join(type(model.get_submodule(m)).__name__ for m in b.modules)

    assign: dict[fx.Node, int] = {}
    last = 0
    for n in nodes:
        if n.op == "placeholder":
            assign[n] = -1
            continue
        if n.op in ("output", "get_attr"):
            continue
        u = node_unit.get(n)
        if u is not None:
            bi = unit_block[u]
        else:
            prods = [assign[a] for a in n.all_input_nodes if a in assign and assign[a] >= 0]
            bi = max(prods) if prods else last
        assign[n] = bi
        last = max(last, bi) if u is None else bi
        if blocks:
            blocks[bi].nodes.append(n)
    return blocks, assign


def block_params(gm: fx.GraphModule, block: BlockSpec) -> dict[int, tuple[str, torch.Tensor]]:
    """Parameters a block reads (id -> (qualified name, tensor)), via call_module or get_attr."""
    out: dict[int, tuple[str, torch.Tensor]] = {}
    for n in block.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            for pn, p in mod.named_parameters():
                out.setdefault(id(p), (f"{n.target}.{pn}", p))
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                t = _get_attr(gm, a.target)
                if isinstance(t, nn.Parameter):
                    out.setdefault(id(t), (str(a.target), t))
    return out


def _get_attr(gm: nn.Module, target: str):
    obj = gm
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return obj


def block_signature(
    block: BlockSpec, values: dict[fx.Node, object], gm: fx.GraphModule, *, outputs: bool = True,
    shapes: bool = True,
) -> str:
    """Hash of the block's node sequence: targets, argument wiring (inside the block by position,
    outside by shape), leaf-module settings (extra_repr) and parameter shapes, and (with
    `outputs`) output metadata. Equal hash -> same layer type. Without outputs it is known before
    the block runs; ops on fake tensors are functions of exactly these, so equal pre-signatures
    give equal outputs (used to skip re-running repeated blocks). With `shapes=False` activations
    are described by dtype and rank only, so the hash does not depend on the batch size (the
    model fingerprint; parameter shapes stay in)."""
    desc = meta_desc if shapes else meta_rank_desc
    index = {n: i for i, n in enumerate(block.nodes)}
    parts: list[str] = []

    def arg_desc(a) -> str:
        if isinstance(a, fx.Node):
            if a in index:
                return f"#{index[a]}"
            if a.op == "get_attr":
                t = _get_attr(gm, a.target)
                return f"attr{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            return f"ext{desc(values.get(a))}"
        if isinstance(a, (list, tuple)):
            return "(" + ",".join(arg_desc(x) for x in a) + ")"
        if isinstance(a, dict):
            return "{" + ",".join(f"{k}:{arg_desc(v)}" for k, v in a.items()) + "}"
        if isinstance(a, str):
            return repr(_PROXY_NAME.sub("Proxy", a))  # messages embed per-layer node names
        if isinstance(a, (int, float, bool, type(None))):
            return repr(a)
        return type(a).__name__

    for n in block.nodes:
        extra = ""
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            extra = ";".join(f"{k}{tuple(p.shape)}{p.dtype}" for k, p in mod.named_parameters())
            extra += f";train={mod.training};{mod.extra_repr()}"
        out = desc(values.get(n)) if outputs else ""
        parts.append(f"{n.op}:{target_name(n, gm)}({arg_desc(n.args)},{arg_desc(n.kwargs)})"
                     f"->{out}[{extra}]")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def meta_rank_desc(v) -> str:
    """meta_desc without sizes: dtype and number of dims (batch-size independent). Numbers
    computed by the graph (x.size(0), x.shape) are sizes too, so only their type is kept."""
    if isinstance(v, torch.Tensor):
        return f"T{v.dim()}d{str(v.dtype).replace('torch.', '')}"
    if isinstance(v, (list, tuple)):
        return "(" + ",".join(meta_rank_desc(x) for x in v) + ")"
    if isinstance(v, (bool, type(None))):
        return repr(v)
    return type(v).__name__


def meta_desc(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"T{tuple(v.shape)}{str(v.dtype).replace('torch.', '')}"
    if isinstance(v, (list, tuple)):
        return "(" + ",".join(meta_desc(x) for x in v) + ")"
    if isinstance(v, (int, float, bool, type(None))):
        return repr(v)
    return type(v).__name__
