"""What the runtime can execute: the planner never returns a plan that runtime/ would refuse.

The cost models can score configurations that PyTorch's engines, as composed by runtime/, do not
run. Each rule below restates one refusal of the runtime (the file and check are cited), so the
search records the point as rejected, with the runtime's reason, instead of returning it:

- `zero1` with tp > 1 or pp > 1 (dp > 1): runtime/data_parallel.py `validate_data_parallel`
  ("zero1 (ZeroRedundancyOptimizer over DDP) works with neither tensor-parallel DTensor
  parameters nor pipeline schedules"); zero2 (FSDP2 without resharding) shards the optimizer
  states and gradients there instead.
- cpu offload with sharding none or zero1: runtime/data_parallel.py `validate_data_parallel`
  ("cpu offload runs through FSDP2; it needs sharding zero2, zero3 or hsdp").
- fp16 with pp > 1: runtime/parallelize.py `parallelize` ("fp16 loss scaling is not supported
  with a pipeline (pp > 1); use bf16").
- tensor-parallel style `conv_out`: runtime/tensor_parallel.py `_check_style` ("conv_out ... is
  not executed by this runtime yet"); conv candidates are dropped, so a conv block is replicated
  under tp.

- schedule `zero_bubble` with sharding zero3 or hsdp (pp > 1, dp > 1): runtime/pipeline.py
  `validate_pipeline` ("zero_bubble splits each backward into input and weight parts, and FSDP2
  resharding parameters between them trains to wrong numbers"). Measured: pp=2 x dp=2 zero3 drifted
  from one process by 5e-2 in the loss in three steps (tests/coverage_cases.py); zero2 (FSDP2
  without resharding after forward) and DDP match, and so do gpipe/1f1b with zero3.
- sequence parallelism where an attention stays whole under tp (LayerType.unsplit_attention: a
  fused q/k/v projection split along its features, a hard-coded head count, a module the runtime
  cannot split): the whole attention would see only its rank's tokens; or where a parameterised op
  no style covers would get the token-split stream (Mixtral's router and experts: "aten.mm.default
  got mixed torch.Tensor and DTensor", benchmarks/planned_runnable.py). `sequence_parallel_problem`.

- pp > 1 with tp > 1 on a model torch.fx cannot trace even with its blocks kept whole
  (ModelGraph.pipeline_split "export", e.g. Hugging Face transformers 5.x): runtime/pipeline_split.py splits such a model with
  torch.distributed.pipelining's export split, whose stage modules are InterpreterModules with no
  nn.Linear left, so parallelize_module fails ("RowwiseParallel currently only support nn.Linear
  and nn.Embedding"). `pipeline_tp_problem`.

Not a refusal: sharding `none` with tp > 1 or pp > 1 runs as FSDP2 `replicate` instead of DDP
(`cost_models.engines.data_parallel_engine`, applied by runtime/data_parallel.py), which
all-reduces the same gradients: same cost, allowed.

`knob_problem` is the one place the search asks; `executable_candidate` is the one place
planner.build_plan and the tp-degree checks ask.
"""

from __future__ import annotations

from specs import TPCandidate

NOT_EXECUTABLE_STYLES = frozenset({"conv_out"})


RESHARDING = ("zero3", "hsdp")  # FSDP2 with reshard_after_forward=True (runtime/data_parallel.py)


def knob_problem(*, sharding: str, offload: str, pp: int, dp: int, tp: int, precision: str,
                 schedule: str | None = None) -> str | None:
    """Why the runtime refuses these knobs (one sentence naming the rule), or None if it runs them.
    `schedule` None: the rules that do not depend on it."""
    why = schedule_problem(schedule=schedule, sharding=sharding, pp=pp, dp=dp)
    if why:
        return why
    if sharding == "zero1" and dp > 1 and (tp > 1 or pp > 1):
        return (f"zero1 with tp={tp}, pp={pp}: the runtime's ZeroRedundancyOptimizer composes only with "
                f"plain DDP (runtime/data_parallel.py); zero2 shards optimizer states and gradients there")
    if offload == "cpu" and sharding not in ("zero2", "zero3", "hsdp"):
        return f"offload=cpu with {sharding}: the runtime offloads through FSDP2 only (zero2, zero3, hsdp)"
    if precision == "fp16" and pp > 1:
        return f"fp16 with pp={pp}: the runtime has no loss scaling inside a pipeline (runtime/parallelize.py); use bf16"
    return None


def executable_candidate(cand: TPCandidate) -> bool:
    """True when the runtime can apply every style of this tensor-parallel candidate."""
    return not any(style in NOT_EXECUTABLE_STYLES for style in cand.modules.values())


def schedule_problem(*, schedule: str | None, sharding: str, pp: int, dp: int) -> str | None:
    """Why the runtime refuses this pipeline schedule with this sharding, or None."""
    if schedule == "zero_bubble" and pp > 1 and dp > 1 and sharding in RESHARDING:
        return (f"zero_bubble with {sharding}: the split input/weight backward and FSDP2's resharding "
                f"train to wrong numbers (runtime/pipeline.py); use zero2, 1f1b or interleaved_1f1b")
    return None


def sequence_parallel_problem(graph) -> str | None:
    """Why sequence parallelism cannot run on this traced graph (an attention left whole under tp
    would mix only its rank's tokens), or None."""
    for name in sorted(graph.layer_types):
        why = graph.layer_types[name].unsplit_attention
        if why:
            return f"sequence parallelism needs every attention split by heads; {name}'s is not: {why}"
    for b in graph.blocks[1:-1]:
        lt = graph.layer(b.index)
        if lt.output_bytes_per_sample == 0 and not lt.tp_candidates:
            # a block that reads the token stream and passes on only side values (a rotary table
            # computed from the hidden states' shape, then shared by every layer): under sequence
            # parallelism it sees its rank's tokens only (a crash on the shapes, or wrong values)
            return (f"sequence parallelism splits the token stream between blocks; block {b.name!r} reads "
                    f"it and passes on only values computed from it (shared by later blocks), which "
                    f"would cover its rank's tokens only")
    for name in sorted(graph.layer_types):
        for op in graph.layer_types[name].ops:
            # a parameterised op no tp style covers (a MoE router, experts held as 3-D weights): its
            # module would get the token-split stream, mixing DTensor and plain tensors (a crash) or
            # summing only its rank's tokens into its gradient; embeddings are re-laid by the runtime
            if op.param_bytes > 0 and op.tp_split == "replicate" and op.kind != "embedding":
                return (f"sequence parallelism needs every parameterised op split by tp or token-wise; "
                        f"{name}'s {op.name} ({op.target}) keeps whole parameters")
    return None


def pipeline_tp_problem(graph, *, pp: int, tp: int) -> str | None:
    """Why pp x tp cannot run on this traced graph (stages of an export split hold no nn.Linear
    for tensor parallelism), or None."""
    if pp > 1 and tp > 1 and (graph.pipeline_split or graph.traced_by) == "export":
        return (f"pp={pp} with tp={tp}: {graph.name} is split into pipeline stages by torch.export (torch.fx "
                f"cannot trace it even with its blocks kept whole), and those stages hold no nn.Linear modules "
                f"for tensor-parallel styles; use pp or tp alone")
    return None
