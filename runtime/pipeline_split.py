"""Split a model into a Plan's pipeline stages by its torch.fx graph (no communication here).

The model is traced once with torch.fx, with every block of `plan.model.block_names` (a module
path such as "embed", "layers.3" or "layer2.1", or modules joined by "+" as planner.trace names a
run of small ones: "conv1+bn1+relu+maxpool", "avgpool+fc") kept as a leaf, so the stage
modules hold the model's ORIGINAL block modules (real nn.Linear, nn.Embedding, ...): tensor parallelism,
activation checkpointing and FSDP can be applied to them afterwards exactly as to the model.

Node -> stage: walking the graph in execution order, the stage changes at the call of the first
block of each stage (the split point sits at the BEGINNING of that block, as
torch.distributed.pipelining's `SplitPoint.BEGINNING` would put it); every other node (functions,
non-block modules such as a ResNet's `bn1`, `relu`, or `torch.flatten` before `fc`) belongs to
the stage of the block call before it. Stage s is a GraphModule built on the original model
(`GraphModule(model, graph)`), so its parameter names are the model's own ("layers.3.attn.q_proj
.weight"). Its inputs are the values crossing the cut before it, its outputs those crossing the
cut after it: every value produced up to stage s and used after it. A value that skips a stage
(a long skip connection, a model input used late) is passed through the stages in between, so
each stage talks only to its neighbours, as PipelineStage requires.

Tied parameters (GPT ties `embed.tok.weight` and `head.lm_head.weight`): a Parameter used by
several stages stays in the first stage that uses it; each later stage gets its own copy
(`nn.Parameter(p.detach().clone())`) installed on its module, recorded in `TiedParam`. The
runtime sums the copies' gradients after backward (runtime.pipeline), so they stay equal.

The model is modified in place (the later stages' copies replace the tied attribute), as
`parallelize_module` and `fully_shard` modify theirs.

Fallback: a model torch.fx cannot trace (Hugging Face transformers 5.x, data-dependent control
flow) is split by torch.distributed.pipelining.pipeline() (torch.export, same split points, shapes
fixed at the micro-batch size; torch copies shared parameters per stage, listed the same way).
Its stage modules are InterpreterModules: checkpointing and FSDP apply, module-type-based tensor
parallelism does not. torch's split feeds a value read by several later stages (HF models compute
the rotary cos/sin tables and the causal mask once, before the first layer) straight from its
producer to each reader; `_thread_skipping_values` rewires the stages so that such a value is
passed through the stages in between, as in the fx split, and `_check_neighbour_inputs` verifies
the result.
"""

from __future__ import annotations

import difflib
import operator
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from specs import Plan, SpecError

__all__ = ["SplitModel", "TiedParam", "block_parts", "clean_param_name", "split_model", "validate_split"]

# Name atoms that wrappers insert (checkpoint_wrapper, FSDP1, torch.compile); DDP adds a leading
# "module.".
_WRAPPER_ATOMS = frozenset({"_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_orig_mod"})


def clean_param_name(name: str) -> str:
    """The model's own name of a parameter seen through wrappers ("module.layers.0.x" -> "layers.0.x")."""
    name = name.removeprefix("module.")
    return ".".join(a for a in name.split(".") if a not in _WRAPPER_ATOMS)


@dataclass(frozen=True)
class TiedParam:
    """One parameter used by several stages: the name it has in each stage, by stage index."""

    names: dict[int, str]
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class SplitModel:
    """The model cut into stage modules (all of them; a rank keeps only its own)."""

    stage_modules: list[torch.fx.GraphModule]
    tied: list[TiedParam] = field(default_factory=list)


def validate_split(model: nn.Module, plan: Plan) -> None:
    """Raise SpecError if the plan's pipeline does not fit this model. Pure: no communication.

    Checks that stages cover blocks 0..num_blocks-1 once and in order (again: a Plan made with
    `model_construct` skips its validator), that block_names are given, one per block, and that
    each names a module of the model.
    """
    names = plan.model.block_names
    num_blocks = plan.model.num_blocks
    if not names:
        raise SpecError(
            "model.block_names: empty; the pipeline splits the model at module paths, so the plan "
            "must name each block's module (e.g. 'embed', 'layers.0', ..., 'head')"
        )
    if len(names) != num_blocks:
        raise SpecError(f"model.block_names: {len(names)} names for {num_blocks} blocks (model.num_blocks)")
    stages = plan.pipeline.stages
    want = plan.mesh.pp * plan.pipeline.virtual_stages
    if len(stages) != want:
        raise SpecError(
            f"pipeline.stages: pp({plan.mesh.pp}) * virtual_stages({plan.pipeline.virtual_stages}) = "
            f"{want} stages expected, got {len(stages)}"
        )
    nxt = 0
    for i, st in enumerate(stages):
        if st.first != nxt or st.last < st.first:
            raise SpecError(
                f"pipeline.stages.{i}: covers blocks {st.first}..{st.last} but block {nxt} is next; "
                f"stages must cover blocks 0..{num_blocks - 1} once, in order"
            )
        nxt = st.last + 1
    if nxt != num_blocks:
        raise SpecError(
            f"pipeline.stages: cover blocks 0..{nxt - 1}, but the model has {num_blocks} blocks "
            f"(0..{num_blocks - 1}); the last stage must end at block {num_blocks - 1}"
        )
    modules = dict(model.named_modules())
    for i, name in enumerate(names):
        for part in block_parts(name):
            if part not in modules or part == "":
                close = difflib.get_close_matches(part, list(modules), n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise SpecError(
                    f"model.block_names.{i}: {part!r} is not a module of {type(model).__name__}{hint} "
                    f"(a pipeline stage begins at a block's module, so each block must name its "
                    f"module(s): 'layers.3', or 'conv1+bn1+relu' for a run of modules)"
                )


def block_parts(name: str) -> list[str]:
    """Module paths of a block name: 'layers.3' -> ['layers.3']; 'avgpool+fc' -> ['avgpool', 'fc']
    (planner.trace names a run of small modules, such as a ResNet's stem or head, that way)."""
    return name.split("+")


def _tracer(block_modules: set[nn.Module]) -> torch.fx.Tracer:
    class _BlockTracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return m in block_modules or super().is_leaf_module(m, qualname)

    return _BlockTracer()


def split_model(model: nn.Module, plan: Plan, example_inputs: tuple | None = None) -> SplitModel:
    """Cut `model` into the plan's pp * virtual_stages stage modules (see the module docstring).

    A model torch.fx cannot trace (e.g. Hugging Face models) is split by torch.export instead
    (`_split_with_export`), which needs `example_inputs`.

    Raises SpecError for a plan that does not fit the model, a model neither tracer can capture,
    or a stage whose first block is never called in forward.
    """
    validate_split(model, plan)
    try:
        return _split_with_fx(model, plan)
    except _FxTraceError as fx_error:
        if example_inputs is None:
            raise SpecError(f"{fx_error}; or pass example_inputs so that torch.export can split it") from None
        return _split_with_export(model, plan, example_inputs, str(fx_error))


class _FxTraceError(SpecError):
    pass


def _split_with_export(model: nn.Module, plan: Plan, example_inputs: tuple, fx_error: str) -> SplitModel:
    """torch.distributed.pipelining.pipeline(): torch.export, split at SplitPoint.BEGINNING of each
    stage's first block. Stage modules are InterpreterModules under the model's own names (no
    nn.Linear left for tensor parallelism); a parameter several stages use is copied per stage
    by torch (`Pipe.replicated_params`). Shapes are fixed at export: the example inputs are cut
    to the plan's micro-batch size."""
    from torch.distributed.pipelining import SplitPoint, pipeline
    from torch.distributed.pipelining._IR import get_submod_name

    mb = plan.pipeline.micro_batch_size
    # export bakes the batch into the stages' shapes: the example cut (or, fewer samples, repeated:
    # autoplan's convention is a batch-1 example) to the micro-batch size
    inputs = tuple(_at_batch(x, mb) if isinstance(x, torch.Tensor) and x.dim() else x for x in example_inputs)
    names = plan.model.block_names
    spec = {block_parts(names[st.first])[0]: SplitPoint.BEGINNING for st in plan.pipeline.stages[1:]}
    patched = [model.get_submodule(n) for n in spec]
    try:
        pipe = pipeline(model, inputs, split_spec=spec)
    except Exception as e:
        raise SpecError(
            f"pipeline: neither torch.fx ({fx_error}) nor torch.export ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}) can trace {type(model).__name__}"
        ) from None
    finally:  # annotate_split_points patched these modules' forward in place
        for mod in patched:
            mod.__dict__.pop("forward", None)
            mod.__dict__.pop("_orig_forward", None)
    num_stages = len(plan.pipeline.stages)
    if pipe.num_stages != num_stages:
        raise SpecError(
            f"pipeline.stages: torch.export split {type(model).__name__} into {pipe.num_stages} stages, "
            f"the plan has {num_stages}; a stage's first block is not called where block_names say"
        )
    index = {get_submod_name(i): i for i in range(num_stages)}
    _thread_skipping_values(pipe.split_gm, index, type(model).__name__)
    _check_neighbour_inputs(pipe.split_gm.graph, index, type(model).__name__)
    tied = []
    for mapping in pipe.replicated_params:
        by_stage = {index[sub]: name for sub, name in mapping.items()}
        first = pipe.get_stage_module(min(by_stage)).get_parameter(by_stage[min(by_stage)])
        tied.append(TiedParam(names=dict(sorted(by_stage.items())), shape=tuple(first.shape), dtype=first.dtype))
    stage_modules = [pipe.get_stage_module(i) for i in range(num_stages)]
    for mod in stage_modules:
        _drop_unused_parameters(mod)
    return SplitModel(stage_modules, tied)


def _thread_skipping_values(split_gm: torch.fx.GraphModule, index: dict[str, int], model_name: str) -> None:
    """Make each export stage talk only to its neighbours, as the fx split does.

    torch's split graph calls stage s with values from any earlier stage (HF models compute the
    rotary cos/sin tables, the causal mask and the position ids once, before the first layer,
    and every layer reads them). Let L[c] be the values crossing cut c (produced at stage <= c,
    read by a stage > c), in graph order, and L[-1] the model inputs. Stage s is rewritten to take
    exactly L[s-1] as inputs (a value it does not read is an unused placeholder) and return
    exactly L[s] (a value it only carries is its own input, returned as is); the last stage keeps
    its output. The split graph is rebuilt to call the stages that way, so it still computes the
    model (also through torch's Pipe) and `_check_neighbour_inputs` can verify the contract on
    it. Edits the graphs in place."""
    graph = split_gm.graph
    calls: list[torch.fx.Node] = sorted(
        (n for n in graph.nodes if n.op == "call_module" and n.target in index), key=lambda n: index[n.target])
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    out_node = next(n for n in graph.nodes if n.op == "output")

    def refuse(why: str) -> SpecError:
        return SpecError(f"pipeline: torch.export's split of {model_name} {why}; the pipeline cannot carry it "
                         f"stage to stage (make the model fx-traceable, or use fewer stages)")

    # Every value between stages is a model input, a stage call (one output) or getitem(stage, i).
    producer: dict[torch.fx.Node, int] = {n: -1 for n in inputs}
    for n in graph.nodes:
        if n.op == "call_module" and n.target in index:
            producer[n] = index[n.target]
            if n.kwargs or len(n.all_input_nodes) != len(n.args):
                raise refuse(f"calls stage {index[n.target]} with keyword or constant arguments")
        elif n.op == "call_function" and n.target is operator.getitem and n.args[0] in calls:
            producer[n] = index[n.args[0].target]
        elif n.op not in ("placeholder", "output"):
            raise refuse(f"computes {n.name!r} ({n.op} {n.target}) between stages")
    num_stages = len(calls)
    last_use: dict[torch.fx.Node, int] = {}
    for s, call in enumerate(calls):
        for v in call.all_input_nodes:
            last_use[v] = max(last_use.get(v, -1), s)
    for v in out_node.all_input_nodes:
        if producer[v] != num_stages - 1:
            raise refuse(f"returns {v.name!r} from stage {producer[v]}, not from the last stage")
    order = {n: i for i, n in enumerate(graph.nodes)}
    crossing = [inputs] + [
        sorted((v for v, last in last_use.items() if producer[v] <= c < last), key=order.__getitem__)
        for c in range(num_stages - 1)
    ]  # crossing[s]: the inputs of stage s

    for s, call in enumerate(calls):
        _rewire_stage(getattr(split_gm, call.target), call, crossing[s],
                      crossing[s + 1] if s + 1 < num_stages else None, producer, refuse)

    new = torch.fx.Graph()
    env = {v: new.placeholder(v.target) for v in inputs}  # value -> its node after the latest stage
    for s, call in enumerate(calls):
        node = new.call_module(call.target, tuple(env[v] for v in crossing[s]))
        if s + 1 < num_stages:
            outs = crossing[s + 1]
            env.update({outs[0]: node} if len(outs) == 1 else
                       {v: new.call_function(operator.getitem, (node, k)) for k, v in enumerate(outs)})
        else:  # the last stage's output is unchanged: map its own getitems
            env[call] = node
            for user in call.users:
                if user in producer:
                    env[user] = new.call_function(operator.getitem, (node, user.args[1]))
    new.output(torch.fx.graph.map_arg(out_node.args[0], env.__getitem__))
    # Replace the nodes, not the Graph object: torch's Pipe runs split_gm through an Interpreter
    # that holds the graph it was built with.
    for n in reversed(list(graph.nodes)):
        graph.erase_node(n)
    graph.output(graph.graph_copy(new, {}))
    graph.lint()
    split_gm.recompile()


def _rewire_stage(stage: torch.fx.GraphModule, call: torch.fx.Node, ins: list[torch.fx.Node],
                  outs: list[torch.fx.Node] | None, producer: dict[torch.fx.Node, int], refuse) -> None:
    """Stage `call` of the split graph: make its placeholders `ins` and its output `outs` (values
    of the split graph; None keeps the output), see `_thread_skipping_values`."""
    if not isinstance(stage, torch.fx.GraphModule):
        raise refuse(f"made {call.target} a {type(stage).__name__}, not a GraphModule")
    g = stage.graph
    old = [n for n in g.nodes if n.op == "placeholder"]
    if len(old) != len(call.args):
        raise refuse(f"calls {call.target} with {len(call.args)} values for {len(old)} inputs")
    first = next(iter(g.nodes))
    local: dict[torch.fx.Node, torch.fx.Node] = {}  # split-graph value -> node in this stage
    with g.inserting_before(first):  # in order, before everything: placeholder order is arg order
        for v in ins:
            local[v] = g.placeholder(v.name)  # the target is the argument's name: unique per stage
    for ph, v in zip(old, call.args, strict=True):
        ph.replace_all_uses_with(local[v])
        g.erase_node(ph)
    if outs is not None:
        out_node = next(n for n in g.nodes if n.op == "output")
        result = out_node.args[0]
        here = producer[call]
        with g.inserting_before(out_node):
            for v in outs:
                if producer[v] != here:
                    continue  # carried: local[v] is its placeholder
                if v is call:
                    if isinstance(result, (tuple, list)):
                        raise refuse(f"passes the whole output tuple of {call.target} on as one value")
                    local[v] = result
                elif isinstance(result, (tuple, list)):
                    local[v] = result[v.args[1]]
                else:
                    local[v] = g.call_function(operator.getitem, (result, v.args[1]))
        new_out = [local[v] for v in outs]
        out_node.args = (new_out[0] if len(new_out) == 1 else tuple(new_out),)
    g.lint()
    stage.recompile()


def _at_batch(x: torch.Tensor, n: int) -> torch.Tensor:
    """`x` with exactly n samples on dim 0: its first n, or its samples repeated."""
    if x.shape[0] >= n:
        return x[:n]
    reps = -(-n // x.shape[0])
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n]


def _drop_unused_parameters(stage: nn.Module) -> None:
    """torch's export split leaves a stale, never-read copy of a tied parameter in the stage that
    does not use that name (stage 0 holds an unused `lm_head.weight`). Remove parameters no graph
    of the stage reads, so that the optimizer and the checks see only real ones."""
    used = set()
    for path, sub in stage.named_modules():
        graph = getattr(sub, "graph", None)
        if isinstance(graph, torch.fx.Graph):
            used |= {f"{path}.{n.target}" if path else n.target for n in graph.nodes if n.op == "get_attr"}
    for name, _ in list(stage.named_parameters(remove_duplicate=False)):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(stage.get_submodule(owner), attr)


def _check_neighbour_inputs(graph: torch.fx.Graph, index: dict[str, int], model_name: str) -> None:
    """PipelineStage only receives from the previous stage: check that the split graph feeds each
    stage s > 0 with stage s-1's outputs only (`_thread_skipping_values` arranges it)."""
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in index:
            continue
        here = index[node.target]
        for arg in node.all_input_nodes:
            src = arg.args[0] if arg.op == "call_function" and arg.all_input_nodes else arg
            came = index.get(src.target) if src.op == "call_module" else (0 if src.op == "placeholder" else None)
            if src.op == "placeholder" and here == 0:
                continue
            if came != here - 1:
                raise SpecError(
                    f"pipeline: torch.export's split of {model_name} feeds stage {here} with {arg.name!r} "
                    f"from {'the model input' if src.op == 'placeholder' else f'stage {came}'}, not from "
                    f"stage {here - 1}; PipelineStage only receives from its neighbour. Use fewer stages, "
                    f"or make the model fx-traceable (the fx split passes such values along)"
                )


def _split_with_fx(model: nn.Module, plan: Plan) -> SplitModel:
    names = plan.model.block_names
    # Every module of a stage's first block marks the stage's start (the first one called wins).
    start_of = {part: s for s, st in enumerate(plan.pipeline.stages) for part in block_parts(names[st.first])}
    num_stages = len(plan.pipeline.stages)
    blocks = {model.get_submodule(part) for n in names for part in block_parts(n)}
    try:
        graph = _tracer(blocks).trace(model)
    except Exception as e:  # fx raises many types; the user needs to know it was the trace
        raise _FxTraceError(
            f"pipeline: torch.fx cannot trace {type(model).__name__} with its blocks as leaves "
            f"({type(e).__name__}: {e}); make forward fx-traceable (torch.fx.wrap helpers that "
            f"build tensors from traced sizes) or change the block boundaries"
        ) from None

    stage_of: dict[torch.fx.Node, int] = {}
    cur, seen_starts = 0, [0]
    for node in graph.nodes:
        if node.op == "call_module" and node.target in start_of:
            s = start_of[node.target]
            if s < cur:
                raise SpecError(
                    f"pipeline.stages.{s}: module {node.target!r} of its first block is called again in "
                    f"stage {cur}; a stage cannot begin at a module the model reuses later"
                )
            if s > cur + 1:
                raise SpecError(
                    f"pipeline.stages.{s}: block {node.target!r} runs right after stage {cur}'s blocks but "
                    f"the plan puts it at stage {s}; block_names must be in execution order"
                )
            if s == cur + 1:
                cur = s
                seen_starts.append(s)
        stage_of[node] = 0 if node.op == "placeholder" else cur
    missing = [s for s in range(1, num_stages) if s not in seen_starts]
    if missing:
        s = missing[0]
        raise SpecError(
            f"pipeline.stages.{s}: its first block {names[plan.pipeline.stages[s].first]!r} is never "
            f"called in {type(model).__name__}.forward, so there is no point to split at"
        )

    # A value produced at stage a (placeholders at 0) and last used at stage b crosses cuts a..b-1.
    # get_attr nodes are not values: each stage that uses one re-reads the attribute.
    last_use: dict[torch.fx.Node, int] = {}
    for node in graph.nodes:
        for inp in node.all_input_nodes:
            if inp.op != "get_attr":
                last_use[inp] = max(last_use.get(inp, 0), stage_of[node] if node.op != "output" else num_stages - 1)
    order = {n: i for i, n in enumerate(graph.nodes)}
    crossing = [
        sorted((n for n, last in last_use.items() if stage_of[n] <= s < last), key=order.__getitem__)
        for s in range(num_stages - 1)
    ]

    stage_modules = []
    for s in range(num_stages):
        g = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        inputs = [n for n in graph.nodes if n.op == "placeholder"] if s == 0 else crossing[s - 1]
        for n in inputs:
            env[n] = g.node_copy(n) if s == 0 else g.placeholder(n.name)
        for node in graph.nodes:
            if node.op == "placeholder" or node.op == "output" or stage_of[node] != s and node.op != "get_attr":
                continue
            if node.op == "get_attr" and not any(stage_of[u] == s for u in node.users if u.op != "output"):
                continue
            env[node] = g.node_copy(node, env.__getitem__)
        if s == num_stages - 1:
            out = next(n for n in graph.nodes if n.op == "output")
            g.output(torch.fx.graph.map_arg(out.args[0], env.__getitem__))
        else:
            outs = [env[n] for n in crossing[s]]
            g.output(outs[0] if len(outs) == 1 else tuple(outs))
        g.lint()
        stage_modules.append(torch.fx.GraphModule(model, g, class_name=f"Stage{s}"))
    return SplitModel(stage_modules, _untie(stage_modules))


def _untie(stage_modules: list[torch.fx.GraphModule]) -> list[TiedParam]:
    """Give each later stage its own copy of a Parameter an earlier stage also uses."""
    first_seen: dict[int, tuple[int, str]] = {}
    groups: dict[int, dict[int, str]] = {}
    module_stage: dict[int, int] = {}
    for s, mod in enumerate(stage_modules):
        for sub in mod.modules():
            module_stage.setdefault(id(sub), s)
    for s, mod in enumerate(stage_modules):
        replaced: dict[int, nn.Parameter] = {}  # one copy per stage, even if used twice in it
        for name, p in list(mod.named_parameters(remove_duplicate=False)):
            key = id(p)
            if key in replaced or (key in first_seen and first_seen[key][0] != s):
                owner_path, _, attr = name.rpartition(".")
                owner = mod.get_submodule(owner_path)
                if module_stage[id(owner)] != s:
                    raise SpecError(
                        f"pipeline.stages.{s}: module {owner_path!r} is called in stage "
                        f"{module_stage[id(owner)]} and again in stage {s}; stages cannot share a module "
                        f"(tie parameters, not modules, or keep both calls in one stage)"
                    )
                if key not in replaced:
                    replaced[key] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                    groups.setdefault(key, {first_seen[key][0]: first_seen[key][1]})[s] = name
                setattr(owner, attr, replaced[key])
            else:
                first_seen.setdefault(key, (s, name))
    tied = []
    for names in groups.values():
        stage, name = min(names.items())
        ref = stage_modules[stage].get_parameter(name)
        tied.append(TiedParam(names=dict(sorted(names.items())), shape=tuple(ref.shape), dtype=ref.dtype))
    return tied
