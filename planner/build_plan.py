"""From knobs to a Plan: mesh, sharding, pipeline stages, tensor-parallel styles, records.

Tensor-parallel styles (plan.tensor_parallel.styles, fnmatch patterns over module paths relative
to the model root). For each block, its layer type's TPCandidates name module paths relative to
the block's base module (planner.tp_candidates.relative_path): the block's own module when it is
one module (`layers.3`), the common parent of its modules when the tracer merged several
(`transformer.ln_f+lm_head` -> the root). The pattern is `<base>.<relative path>`, with the
base's numeric parts replaced by `*` when the layer type repeats (`layers.3` -> `layers.*`), so
one entry covers all layers: `layers.*.attn.q_proj: colwise`, `layers.*.attn.o_proj: rowwise`,
`embed.tok: vocab`, `head.lm_head: colwise`; an empty relative path is the base module itself
(the MLP's `head` Linear). With sequence parallelism, the norm modules (ops the tracer marks
`tp_split="sequence"` of kind norm, named by module path in the layer type's first block) get
`sequence`, relative to that block's base. A block without candidates is `replicate`.
Conv candidates carry `conv_out` (operator-wise split of output channels); the runtime cannot
execute that yet, so the planner does not split conv blocks (planner.capabilities).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from planner.capabilities import executable_candidate
from specs import (
    Alternative,
    Block,
    DataParallel,
    HardwareSpec,
    Knobs,
    Mesh,
    ModelGraph,
    ModelRef,
    Pipeline,
    Plan,
    Rejection,
    SearchStats,
    Stage,
    TensorParallel,
    TrainSpec,
)

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)")


def block_base(block: Block) -> str:
    """The module path a block's candidate paths are relative to (see the module docstring)."""
    mods = block.modules or [block.name]
    if len(mods) == 1:
        return mods[0]
    parents = [m.rsplit(".", 1)[0] if "." in m else "" for m in mods]
    base = parents[0]
    for p in parents[1:]:
        while base and not (p == base or p.startswith(base + ".")):
            base = base.rsplit(".", 1)[0] if "." in base else ""
    return base


def block_pattern(graph: ModelGraph, index: int, repeated: bool) -> str:
    """fnmatch pattern of block `index`'s base module (numeric parts -> `*` when repeated)."""
    base = block_base(graph.blocks[index])
    return _INDEX.sub("*", base) if repeated else base


def _join(base: str, rel: str) -> str:
    return f"{base}.{rel}" if base and rel else base or rel


def _module_relative(op_name: str, blocks: Sequence[Block]) -> str | None:
    """An op's module path relative to the base of the block of this layer type it was recorded
    in, or None when it is not a module inside one of them (a functional op's node name)."""
    for b in blocks:
        base = block_base(b)
        if base and op_name.startswith(base + "."):
            return op_name[len(base) + 1 :]
        if not base and op_name.split(".", 1)[0] in {m.split(".", 1)[0] for m in b.modules}:
            return op_name
    return None


def tp_styles(graph: ModelGraph, tp: int, sequence_parallel: bool) -> dict[str, str]:
    """Module-path pattern -> style for every block (empty when tp == 1)."""
    if tp == 1:
        return {}
    counts = Counter(b.layer_type for b in graph.blocks)
    by_type: dict[str, list[Block]] = {}
    for b in graph.blocks:
        by_type.setdefault(b.layer_type, []).append(b)
    styles: dict[str, str] = {}
    for i, block in enumerate(graph.blocks):
        lt = graph.layer_types[block.layer_type]
        pat = block_pattern(graph, i, counts[block.layer_type] > 1)
        cands = [c for c in lt.tp_candidates if executable_candidate(c)]
        if not cands:
            if pat:
                styles.setdefault(pat, "replicate")
            continue
        for cand in cands:
            for mod, style in cand.modules.items():
                styles.setdefault(_join(pat, mod), style)
        if sequence_parallel:
            for op in lt.ops:
                if op.tp_split == "sequence" and op.kind == "norm":
                    rel = _module_relative(op.name, by_type[block.layer_type])
                    if rel and not rel.startswith(("_", "%")):
                        styles.setdefault(_join(pat, rel), "sequence")
    return dict(sorted(styles.items()))


def has_output_head(graph: ModelGraph) -> bool:
    return any(c.kind == "output_head" for lt in graph.layer_types.values() for c in lt.tp_candidates)


def model_ref(graph: ModelGraph) -> ModelRef:
    return ModelRef(
        name=graph.name, fingerprint=graph.fingerprint, num_blocks=graph.num_blocks,
        num_params=graph.num_params, block_names=[b.name for b in graph.blocks],
    )


def build_plan(
    graph: ModelGraph, hw: HardwareSpec, train: TrainSpec, knobs: Knobs,
    stages: Sequence[tuple[int, int, str]], *, predicted=None,
    alternatives: Sequence[Alternative] = (), rejected: Sequence[Rejection] = (),
    search: SearchStats | None = None,
) -> Plan:
    """A validated Plan from the knobs and the stage partition (Plan's validator checks them)."""
    k = knobs
    return Plan(
        model=model_ref(graph),
        hardware=hw,
        train=train,
        mesh=Mesh(pp=k.pp, dp=k.dp, tp=k.tp, ep=k.ep, cp=k.cp),
        data_parallel=DataParallel(sharding=k.sharding, hsdp_shard_size=k.hsdp_shard_size, offload=k.offload),
        tensor_parallel=TensorParallel(
            sequence_parallel=k.sequence_parallel,
            loss_parallel=k.tp > 1 and has_output_head(graph),
            styles=tp_styles(graph, k.tp, k.sequence_parallel),
        ),
        pipeline=Pipeline(
            schedule=k.schedule, virtual_stages=k.virtual_stages, micro_batch_size=k.micro_batch_size,
            num_micro_batches=k.num_micro_batches,
            stages=[Stage(first=a, last=b, recompute=m) for a, b, m in stages],
        ),
        predicted=predicted,
        alternatives=list(alternatives),
        rejected=list(rejected),
        search=search,
    )


def loss_note(alt_time_s: float, alt_breakdown: dict[str, float], best_time_s: float,
              best_breakdown: dict[str, float]) -> str:
    """Why an alternative lost, in words: the step-time gap and the term that grew most."""
    if best_time_s <= 0:
        return ""
    pct = (alt_time_s / best_time_s - 1) * 100
    if alt_time_s <= best_time_s * (1 + 1e-9):
        return "ties the chosen plan (order of preference picked the other)"
    deltas = {
        t: alt_breakdown.get(t, 0.0) - best_breakdown.get(t, 0.0)
        for t in sorted(set(alt_breakdown) | set(best_breakdown))
    }
    term, grow = max(deltas.items(), key=lambda kv: (kv[1], kv[0]))
    words = term.removesuffix("_s").replace("_", " ")
    head = f"+{pct:.1f}% step time" if pct < 10 else f"+{pct:.0f}% step time"
    if grow <= 0:
        return head
    return f"{head}: more {words} (+{grow:.3g} s)"
