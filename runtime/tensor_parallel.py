"""Tensor parallelism: the plan's per-module styles applied with DTensor `parallelize_module`.

`plan.tensor_parallel.styles` maps an fnmatch pattern over module paths (relative to the model
root) to a style. Layouts follow torchtitan's parallelize_llama (Megatron-LM column -> row pairs):

| style     | module     | without sequence parallel                | with sequence parallel            |
|-----------|------------|------------------------------------------|-----------------------------------|
| colwise   | Linear     | in Replicate -> out Shard(-1) (local)    | in Shard(1) (all-gather) -> same  |
| rowwise   | Linear     | in Shard(-1) -> out Replicate (all-red.) | out Shard(1) (reduce-scatter)     |
| vocab     | Embedding  | Rowwise: in Replicate -> out Replicate   | out Shard(1) (see below)          |
| sequence  | norm       | (needs sequence parallel)                | SequenceParallel, Shard(1)        |
| head_norm | per-head   | SequenceParallel(sequence_dim=0), local  | same                              |
| replicate | any        | left as is (plain, replicated tensors)   | same                              |

Per-head modules inside a head-split attention (`head_norm`: Qwen3's q_norm/k_norm, an RMSNorm
over head_dim applied to each rank's local heads) hold one weight shared by all heads. Left plain,
each rank's gradient covers only its heads and the ranks drift apart. As torchtitan does for
Qwen3, they run as SequenceParallel: the weight becomes a Replicate DTensor and the local input a
sharded one, so the weight's gradient is a partial sum that DTensor all-reduces over tp. The
module normalises along the last axis only, so which other axis is named sharded does not change
the numbers; dim 0 exists in every layout ((B, T, H, d) or (B, H, T, d)), and the output is
handed back as the local tensor.

A colwise module whose name matches the loss head (it has no rowwise partner: its output is
the model's output) returns vocab-sharded logits, Shard(-1) as a DTensor, when
`loss_parallel` is set (the loss then runs under `loss_parallel()`), otherwise gathered logits.

Sequence parallel and the embedding: the residual stream between blocks is Shard(1). When the
embedding is the only parameterised module of its block (Llama) it outputs Shard(1) directly
(reduce-scatter); when its block adds more (GPT adds learned positions) it outputs Replicate
and the block's output is re-laid to Shard(1) (a local slice), so `tok + pos` stays correct.

An embedding inside a merged block ("model.embed_tokens+model.rotary_emb", Hugging Face): the
model's own code between the block's parts derives position ids, rotary tables and masks from the
embedding's output length, so under sequence parallelism that output stays Replicate (whole) and
the next block's first input is re-laid to Shard(1) (a local slice, `PrepareModuleInput`).

Norms under sequence parallel: the residual stream's norms (`residual_norms`: a block's part or
its direct child, e.g. layers.3.attn_norm, head.norm) run as SequenceParallel whether or not the
plan names them. Without it a norm would see a plain local (B, T/tp, H) tensor, its weight's
gradient would be a per-rank partial sum, and attention reading T from x.shape would fold heads.

One collective per shared input (Megatron-LM's f/g operators): column-parallel siblings that read
the same tensor (q, k and v of an attention; gate and up of a gated MLP) share one Replicate
DTensor made from it, so the input's all-gather (sequence parallel) runs once in forward and its
gradient is all-reduced (reduce-scattered) once in backward, after autograd sums the siblings'
partial gradients, instead of once per module. The shared DTensor lives in a cache that the
siblings' parent module clears when its forward starts and ends (`_SharedInputColwise`; an input
read by one module only is unaffected). cost_models.blocks charges this count: one collective
per row-parallel pair in each direction.

Tied weights (GPT ties embed.tok.weight and head.lm_head.weight): vocab-parallel Embedding
and colwise Linear both shard the weight on dim 0 over the same tp mesh, so after
parallelize_module the one DTensor parameter is re-tied to every alias; placements that
differ raise a SpecError.
"""

from __future__ import annotations

import fnmatch
from functools import partial

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from specs import Plan, SpecError

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)


class _SharedInputColwise(ColwiseParallel):
    """ColwiseParallel whose input DTensor is shared with the column-parallel siblings that read
    the same tensor in one forward of their parent (see the module docstring). `cache` maps
    id(input) -> (input, its Replicate DTensor); the parent's forward hooks clear it, and an entry
    holds its input alive, so an id cannot be reused while its entry exists."""

    def __init__(self, cache: dict, **kwargs):
        super().__init__(**kwargs)
        self._cache = cache

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module, device_mesh, self._partition_linear_fn,
            partial(self._shared_input, self._cache, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )

    @staticmethod
    def _shared_input(cache, input_layouts, desired_input_layouts, mod, inputs, device_mesh):
        x = inputs[0]
        if isinstance(x, DTensor):
            return ColwiseParallel._prepare_input_fn(input_layouts, desired_input_layouts, mod, inputs, device_mesh)
        hit = cache.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        dt = ColwiseParallel._prepare_input_fn(input_layouts, desired_input_layouts, mod, inputs, device_mesh)
        cache[id(x)] = (x, dt)
        return dt


def _clear_cache_hooks(parent: nn.Module, cache: dict) -> None:
    parent.register_forward_pre_hook(lambda _m, _a: cache.clear())
    parent.register_forward_hook(lambda _m, _a, _o: cache.clear())


def resolve_styles(model: nn.Module, plan: Plan) -> dict[str, str]:
    """Module path -> style for every module the plan's patterns match (first pattern wins).

    Raises SpecError for a pattern that matches no module, a style that does not fit the module
    type, or a dimension the tp degree does not divide.
    """
    tp = plan.mesh.tp
    names = [n for n, _ in model.named_modules() if n]
    out: dict[str, str] = {}
    for pattern, style in plan.tensor_parallel.styles.items():
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            close = [n for n in names if n.split(".")[-1] == pattern.split(".")[-1]][:3]
            hint = f" (modules with that leaf name: {', '.join(close)})" if close else ""
            raise SpecError(
                f"tensor_parallel.styles: pattern {pattern!r} matches no module of the model{hint}; "
                f"module paths are relative to the model root, e.g. {', '.join(names[:4])}"
            )
        for name in hits:
            if name in out:
                continue
            mod = model.get_submodule(name)
            _check_style(name, mod, style, tp, plan.tensor_parallel.sequence_parallel)
            if style == "colwise":
                parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
                _check_heads(name, mod, parent, tp)
            out[name] = style
    return out


def _check_style(name: str, mod: nn.Module, style: str, tp: int, sp: bool) -> None:
    kind = type(mod).__name__
    if style in ("colwise", "rowwise"):
        if not isinstance(mod, nn.Linear):
            raise SpecError(f"tensor_parallel.styles[{name}]: {style} needs an nn.Linear, {name} is a {kind}")
        dim, what = (mod.out_features, "out_features") if style == "colwise" else (mod.in_features, "in_features")
        if dim % tp:
            raise SpecError(f"tensor_parallel.styles[{name}]: {style} splits {what}={dim}, which tp={tp} does not divide")
    elif style == "vocab":
        if not isinstance(mod, nn.Embedding):
            raise SpecError(f"tensor_parallel.styles[{name}]: vocab needs an nn.Embedding, {name} is a {kind}")
        if mod.num_embeddings % tp:
            raise SpecError(
                f"tensor_parallel.styles[{name}]: vocab size {mod.num_embeddings} is not divisible by tp={tp}; "
                f"pad the vocabulary to a multiple of {tp}"
            )
    elif style == "head_norm":
        params = list(mod.parameters())
        if not params or any(p.dim() != 1 for p in params):
            raise SpecError(
                f"tensor_parallel.styles[{name}]: head_norm needs a module with only 1-D (per-head) "
                f"parameters, {name} ({kind}) has {[tuple(p.shape) for p in params]}"
            )
    elif style == "sequence":
        if not sp:
            raise SpecError(f"tensor_parallel.styles[{name}]: style 'sequence' needs tensor_parallel.sequence_parallel: true")
    elif style == "conv_out":
        raise SpecError(
            f"tensor_parallel.styles[{name}]: conv_out (output-channel split of a convolution) is not "
            f"executed by this runtime yet; use replicate for {name}, or data parallelism for conv nets"
        )


def _check_heads(name: str, mod: nn.Module, parent: nn.Module, tp: int) -> None:
    """Attention projections split by whole heads: heads (out_features / head_dim) % tp == 0."""
    head_dim = getattr(getattr(parent, "cfg", None), "head_dim", None)
    if not isinstance(head_dim, int) or head_dim <= 0 or mod.out_features % head_dim:
        return
    heads = mod.out_features // head_dim
    if heads % tp:
        raise SpecError(
            f"tensor_parallel.styles[{name}]: colwise splits {heads} attention heads (head_dim {head_dim}) "
            f"over tp={tp}; tp must divide the number of (key/value) heads"
        )


def _merged_block_after(name: str, block_names: list[str]) -> str | None:
    """The block after the embedding `name` when the embedding sits in a merged block ("a+b",
    the tracer's name for sibling modules grouped into one block), else None."""
    for i, b in enumerate(block_names):
        parts = b.split("+")
        if len(parts) > 1 and any(name == p or name.startswith(p + ".") for p in parts):
            return block_names[i + 1] if i + 1 < len(block_names) else None
    return None


def _block_of(name: str, block_names: list[str]) -> str | None:
    best = None
    for b in block_names:
        if (name == b or name.startswith(b + ".")) and (best is None or len(b) > len(best)):
            best = b
    return best


def _tied_groups(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Parameters reachable under several names: [(owner module, attribute name), ...] per param."""
    seen: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in model.modules():
        for attr, p in mod.named_parameters(recurse=False):
            seen.setdefault(id(p), []).append((mod, attr))
    return [owners for owners in seen.values() if len(owners) > 1]


def apply_tensor_parallel(
    model: nn.Module, tp_mesh: DeviceMesh, plan: Plan, *, styles: dict[str, str] | None = None
) -> None:
    """Shard `model` (a whole model or one pipeline stage) over `tp_mesh` per the plan, in place.

    Args:
        model: module whose submodule paths match the plan's patterns.
        tp_mesh: the 1-D tp mesh.
        plan: the plan (styles, sequence_parallel, loss_parallel, block names).
        styles: pre-resolved styles (module path -> style); resolved here when None.
    """
    if tp_mesh.size() == 1:
        return
    tpc = plan.tensor_parallel
    sp = tpc.sequence_parallel
    styles = resolve_styles(model, plan) if styles is None else styles
    names = set(dict(model.named_modules()))
    styles = {n: s for n, s in styles.items() if n in names}
    block_names = plan.model.block_names
    if sp:
        for n in residual_norms(model, block_names):
            styles.setdefault(n, "sequence")
    tied = _tied_groups(model)
    # The output module: a colwise Linear no rowwise module follows (the LM head).
    order = [n for n, _ in model.named_modules() if n in styles]
    last_colwise = None
    for n in order:
        if styles[n] == "colwise":
            last_colwise = n
        elif styles[n] == "rowwise":
            last_colwise = None

    # column-parallel modules (not the head) with a column-parallel sibling: they may share an input
    siblings: dict[str, list[str]] = {}
    for n in order:
        if styles[n] == "colwise" and n != last_colwise:
            siblings.setdefault(n.rpartition(".")[0], []).append(n)
    shared_parent = {n: par for par, ns in siblings.items() if len(ns) > 1 for n in ns}
    caches: dict[str, dict] = {}

    plan_map: dict[str, object] = {}
    block_relayout: set[str] = set()
    for name in order:
        style = styles[name]
        if style == "colwise":
            if name == last_colwise:
                plan_map[name] = ColwiseParallel(
                    input_layouts=Shard(1) if sp else Replicate(),
                    output_layouts=Shard(-1) if tpc.loss_parallel else Replicate(),
                    use_local_output=not tpc.loss_parallel,
                )
            elif name in shared_parent:
                cache = caches.setdefault(shared_parent[name], {})
                plan_map[name] = _SharedInputColwise(cache, input_layouts=Shard(1) if sp else Replicate())
            else:
                plan_map[name] = ColwiseParallel(input_layouts=Shard(1)) if sp else ColwiseParallel()
        elif style == "rowwise":
            plan_map[name] = RowwiseParallel(output_layouts=Shard(1)) if sp else RowwiseParallel()
        elif style == "vocab":
            merged = _merged_block_after(name, block_names) if sp else None
            if merged is not None:
                # The embedding shares a merged block ("model.embed_tokens+model.rotary_emb"): code
                # between the parts reads the sequence length from its output (HF derives position
                # ids and rotary tables from it), so it stays whole; the next block takes it Shard(1).
                if merged not in names:
                    raise SpecError(
                        f"tensor_parallel.styles[{name}]: with sequence parallel the block after the "
                        f"embedding's ({merged}) must be in the same pipeline stage"
                    )
                plan_map[name] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
                plan_map[merged] = PrepareModuleInput(
                    input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True
                )
                continue
            direct = sp and _embedding_alone(model, name, _block_of(name, block_names))
            plan_map[name] = RowwiseParallel(
                input_layouts=Replicate(), output_layouts=Shard(1) if direct else Replicate()
            )
            if sp and not direct:
                block = _block_of(name, block_names)
                if block is None:
                    raise SpecError(
                        f"tensor_parallel.styles[{name}]: with sequence parallel the embedding's block must be "
                        f"listed in model.block_names"
                    )
                block_relayout.add(block)
        elif style == "sequence":
            plan_map[name] = SequenceParallel()
        elif style == "head_norm":
            plan_map[name] = SequenceParallel(sequence_dim=0, use_local_output=True)
    for block in block_relayout:
        plan_map[block] = PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=Shard(1), use_local_output=True
        )
    parallelize_module(model, tp_mesh, plan_map)
    for par, cache in caches.items():
        _clear_cache_hooks(model.get_submodule(par) if par else model, cache)
    _retie(tied)


def _is_norm(mod: nn.Module) -> bool:
    """A normalisation over the hidden features: nn.LayerNorm / nn.RMSNorm, or a module whose class
    name ends in "Norm" (RMSNorm, LlamaRMSNorm, ...) with only 1-D parameters."""
    if isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
        return True
    if isinstance(mod, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):  # channel norms of conv nets
        return False
    params = list(mod.parameters())
    return type(mod).__name__.endswith("Norm") and bool(params) and all(p.dim() == 1 for p in params)


def residual_norms(model: nn.Module, block_names: list[str]) -> list[str]:
    """Norm modules on the residual stream: a block's part ("head.norm" of "head", HF's
    "model.norm" of "model.norm+lm_head") or a direct child of one ("layers.3.attn_norm").
    Under sequence parallelism the stream there is Shard(1) (token-split), so these run as
    SequenceParallel (their weight's gradient is then summed over tp) even when the plan names
    no style for them: the planner marks only norms the tracer sees as one op (nn.LayerNorm),
    not a hand-written RMSNorm decomposed into pow/mean/rsqrt. Norms deeper inside a block
    (e.g. a q/k norm inside attention, on head-split tensors) are not touched."""
    mods = dict(model.named_modules())
    parts = [p for b in block_names for p in b.split("+") if p in mods]
    out = []
    for p in parts:
        cands = [(p, mods[p])] + [(f"{p}.{c}" if p else c, m) for c, m in mods[p].named_children()]
        out += [n for n, m in cands if n and _is_norm(m) and n not in out]
    return out


def _embedding_alone(model: nn.Module, name: str, block: str | None) -> bool:
    if block is None:
        return True
    emb = set(id(p) for p in model.get_submodule(name).parameters())
    return all(id(p) in emb for p in model.get_submodule(block).parameters())


def _retie(groups: list[list[tuple[nn.Module, str]]]) -> None:
    for owners in groups:
        params = [getattr(m, a) for m, a in owners]
        dt = [p for p in params if isinstance(p, DTensor)]
        if not dt:
            continue
        keep = dt[0]
        for p in dt[1:]:
            if p.placements != keep.placements:
                raise SpecError(
                    f"tensor_parallel.styles: a tied weight is sharded two ways ({keep.placements} vs "
                    f"{p.placements}); give the tied modules matching styles (vocab + colwise) or untie them"
                )
        for m, a in owners:
            setattr(m, a, keep)
