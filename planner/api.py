"""autoplan(): trace, search, and return a Plan; plan_from_knobs(): score one given configuration.

autoplan(model, hw) = trace the model (planner.trace, on the meta device for bundled models,
unless `graph=` is given) -> planner.search.Search over the hybrid space with the cost models ->
the best configuration as a specs.Plan with its prediction, the ranked alternatives (each with why
it lost), every pruned region with its reason, and the search statistics. The primer's two
baselines are scored as well and recorded among the rejections with their numbers: layer-wise
model parallelism (pipeline over all devices, one micro-batch) and single-process
nn.DataParallel over one node's devices.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from planner.build_plan import build_plan, loss_note
from planner.capabilities import knob_problem, pipeline_tp_problem, sequence_parallel_problem
from planner.partition import even_partition
from planner.scoring import Backend, CostModelBackend
from planner.search import GiB, Scored, Search, SearchResult
from specs import (
    Alternative,
    Constraints,
    HardwareSpec,
    Knobs,
    ModelGraph,
    Plan,
    Rejection,
    SearchStats,
    SpecError,
    TrainSpec,
)
from specs._base import format_validation_error


def autoplan(
    model: Any,
    hw_spec: HardwareSpec | str,
    *,
    example_inputs: Sequence[Any] | None = None,
    train: TrainSpec | None = None,
    constraints: Constraints | None = None,
    graph: ModelGraph | None = None,
    backend: Backend | None = None,
) -> Plan:
    """Plan the parallel training of `model` on `hw_spec`.

    Args:
        model: an nn.Module, a bundled model name (planner.models.list_models()) or
            `package.module:factory`; ignored when `graph` is given.
        hw_spec: a HardwareSpec, or a preset string / file path (HardwareSpec.load).
        example_inputs: inputs for tracing (dim 0 = batch); bundled models supply their own.
        train: what is trained and how (global batch, precision, what the planner may use).
        constraints: pins and bounds on the knobs (specs.Constraints).
        graph: an already traced ModelGraph (skips tracing).
        backend: the cost backend (defaults to the cost models; tests pass stand-ins).

    Returns:
        The best Plan, with `predicted`, `alternatives`, `rejected` and `search` filled in.

    Raises:
        SpecError: for invalid inputs, or when no configuration fits memory (the message gives
            the smallest per-device memory any plan needs and the closest configuration).
    """
    hw = HardwareSpec.load(hw_spec)
    train = train or TrainSpec()
    trace_s = 0.0
    if graph is None:
        t0 = time.perf_counter()
        graph = trace_model(model, example_inputs)
        trace_s = time.perf_counter() - t0
    backend = backend or CostModelBackend(graph, hw, train)
    search = Search(graph, hw, train, constraints, backend)
    res = search.run()
    extra = primer_points(search, res)
    best = res.best
    top_k = search.c.top_k
    alternatives = [_alternative(s, best, train) for s in res.ranked[1 : top_k + 1]]
    stats = SearchStats(
        candidates_scored=search.scored, candidates_pruned=search.pruned,
        search_time_s=res.time_s,
        trace_time_s=trace_s or graph.trace_time_s,
    )
    return build_plan(
        graph, hw, train, best.knobs, best.stages, predicted=best.estimate.to_prediction(),
        alternatives=alternatives, rejected=[*res.rejected, *extra], search=stats,
    )


def _alternative(s: Scored, best: Scored, train: TrainSpec) -> Alternative:
    return Alternative(
        knobs=s.knobs, step_time_s=s.step_time_s,
        samples_per_s=train.global_batch_size / s.step_time_s if s.step_time_s > 0 else 0.0,
        peak_memory_bytes=s.peak_memory_bytes, fits=s.fits,
        note=loss_note(s.step_time_s, dict(s.estimate.time_breakdown_s), best.step_time_s,
                       dict(best.estimate.time_breakdown_s)),
    )


def primer_points(search: Search, res: SearchResult) -> list[Rejection]:
    """Score the textbook baselines and say, with numbers, why they lose to the chosen plan."""
    out = []
    best = res.best
    n, batch = search.num_devices, search.train.global_batch_size

    def versus(t: float) -> str:
        return f"{t:.4g} s/step vs {best.step_time_s:.4g} s for the chosen plan ({(t / best.step_time_s - 1) * 100:+.0f}%)"

    # Layer-wise model parallelism: every device a pipeline stage, one micro-batch.
    region = f"layer-wise model parallelism (pp={n}, one micro-batch)"
    if n == 1:
        pass
    elif n > len(search.ends):
        out.append(Rejection(region=region, reason=f"needs {n} stages but the graph has "
                             f"{len(search.ends)} places to end a stage", count=1))
    else:
        k = Knobs(pp=n, dp=1, tp=1, micro_batch_size=batch, num_micro_batches=1, schedule="gpipe",
                  recompute=search.modes[0] if len(search.modes) == 1 else "none")
        got = search.evaluate(k)
        if isinstance(got, str):
            out.append(Rejection(region=region, reason=f"does not fit: {got}", count=1))
        else:
            bubble = getattr(got.estimate, "bubble_fraction", None)
            extra = f"; bubble {bubble:.0%}: one micro-batch keeps one stage busy at a time" if bubble is not None else ""
            out.append(Rejection(region=region, reason=versus(got.step_time_s) + extra, count=1))
    # Single-process nn.DataParallel: one process drives one node's devices.
    devs = min(n, search.hw.devices_per_node)
    region = f"single-process nn.DataParallel ({devs} devices of one node)"
    est = search.backend.data_parallel_single_process(devs) if devs > 1 else None
    if est is not None:
        search.scored += 1
        peak = float(est.peak_memory_bytes)
        fits = bool(est.fits) and peak <= search.budget_bytes
        node = f"; it can use only one node of {search.hw.num_nodes}" if search.hw.num_nodes > 1 else ""
        why = "replicates parameters to every device and gathers outputs on device 0 each step, one Python thread"
        if fits:
            reason = f"{versus(float(est.step_time_s))}: {why}{node}"
        else:
            reason = (f"does not fit: device 0 needs {peak / GiB:.1f} GiB > {search.budget_bytes / GiB:.1f} GiB; "
                      f"{why}{node}")
        out.append(Rejection(region=region, reason=reason, count=1))
    return out


def plan_from_knobs(
    graph: ModelGraph, hw: HardwareSpec, train: TrainSpec, knobs: Knobs,
    stages: Sequence[tuple[int, int, str]] | None = None, *, backend: Backend | None = None,
) -> Plan:
    """Score one configuration and return it as a Plan (no search).

    `stages`: (first, last, recompute) per virtual stage; when None, blocks are split into
    pp * virtual_stages stages of (nearly) equal block counts at the graph's cut points, all with
    knobs.recompute. Raises SpecError if the knobs are not a valid plan for this graph/hardware, or
    one the runtime would refuse (planner.capabilities: the rules the search applies).
    """
    hw = HardwareSpec.load(hw)
    why = knob_problem(sharding=knobs.sharding, offload=knobs.offload, pp=knobs.pp, dp=knobs.dp, tp=knobs.tp,
                       precision=train.precision, schedule=knobs.schedule)
    if why is None and knobs.sequence_parallel and knobs.tp > 1:
        why = sequence_parallel_problem(graph)
    if why is None:
        why = pipeline_tp_problem(graph, pp=knobs.pp, tp=knobs.tp)
    if why is None and knobs.micro_batch_size < graph.min_micro_batch_size:
        why = (f"micro_batch_size {knobs.micro_batch_size} < {graph.min_micro_batch_size}: a BatchNorm would "
               f"normalise one value per channel, which PyTorch refuses in training")
    if why:
        raise SpecError(f"knobs: the runtime cannot run {knobs}: {why}")
    num = knobs.pp * knobs.virtual_stages
    if stages is None:
        if knobs.recompute == "mixed":
            raise SpecError("knobs.recompute: 'mixed' needs explicit stages (first, last, recompute)")
        search = Search(graph, hw, train, None, backend or _NoBackend())
        try:
            ranges = even_partition(graph.num_blocks, num, search.ends)
        except ValueError as e:
            raise SpecError(f"pipeline: pp({knobs.pp}) * virtual_stages({knobs.virtual_stages}): {e}") from None
        stages = [(a, b, knobs.recompute) for a, b in ranges]
    stages = [tuple(s) for s in stages]
    knobs = Search.with_recompute(knobs, stages)
    try:
        build_plan(graph, hw, train, knobs, stages)  # validates the arithmetic before scoring
    except ValidationError as err:
        raise SpecError(format_validation_error(err, "plan")) from None
    backend = backend or CostModelBackend(graph, hw, train)
    est = backend.score(knobs, stages)
    return build_plan(graph, hw, train, knobs, stages, predicted=est.to_prediction())


class _NoBackend:
    """Placeholder for Search when only its cut-point bookkeeping is used."""

    def profile(self, *a, **k):  # pragma: no cover - never called
        raise AssertionError("no backend")


def trace_model(model: Any, example_inputs: Sequence[Any] | None) -> ModelGraph:
    """Trace a module, bundled name or factory reference into a ModelGraph (on meta where we can)."""
    from planner.tracer import trace  # the tracer; imported late (it pulls in torch.fx)

    name = None
    if isinstance(model, str):
        from planner.models import build_model

        built = build_model(model, device="meta")
        name = built.name
        module = built.module
        example_inputs = example_inputs if example_inputs is not None else built.example_inputs
    else:
        module = model
        if example_inputs is None:
            example_inputs = _bundled_inputs(module)
    if example_inputs is None:
        raise SpecError(
            f"example_inputs: needed to trace {type(module).__name__} (not a bundled model); pass "
            f"autoplan(model, hw, example_inputs=(x,)) with a batch of 1 at the real input shapes"
        )
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    return trace(module, tuple(example_inputs), name=name) if name else trace(module, tuple(example_inputs))


def _bundled_inputs(module: Any) -> tuple | None:
    """Example inputs for a bundled model class (batch 1), on the module's device."""
    import torch

    from planner.models import MLP, Transformer

    try:
        dev = next(module.parameters()).device
    except StopIteration:
        dev = torch.device("cpu")
    if isinstance(module, Transformer):
        return (torch.zeros(1, module.cfg.seq_len, dtype=torch.long, device=dev),)
    if isinstance(module, MLP):
        return (torch.zeros(1, module.cfg.in_features, device=dev),)
    return None
