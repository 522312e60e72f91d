""" "Why not X?": the cost of a different choice, term by term, against the plan.

`why_not(plan, overrides=..., other=...)` takes either knob changes (`tp=4 zero=3`) or a whole
other plan. The changed point is completed so it keeps the world size and global batch
(`knobs.complete_knobs`), then scored by the planner's own model, `planner.plan_from_knobs`
(the same `cost_models.estimate_step` the search used; nothing here estimates). Scoring needs the
traced model: a bundled one by the plan's name, any other only from the user's `--model`
(`build_graph`; a file never names code to import). A whole plan
file that carries its own prediction is compared as recorded.

The answer is one of:
- `invalid`: the point breaks a rule before it can be scored (degrees do not divide the
  devices, batch arithmetic, a validation error), with the message;
- `does_not_fit`: scored, but the worst rank needs more memory than it has (with the numbers);
- `slower` / `faster` / `same`: scored and fits; the per-term deltas say where the time goes.
Where the search itself recorded this point (as an alternative) or pruned its region (as a
rejection), its note is quoted.
"""

from __future__ import annotations

from typing import Any

from planner.api import plan_from_knobs, trace_model
from planner.explain.knobs import complete_knobs, parse_assignment
from planner.explain.report import fmt_bytes, fmt_s, term_label
from planner.models import is_bundled
from specs import Knobs, Plan, Prediction, SpecError


class ModelRefused(SpecError):
    """No model to score on: the plan names one autoplan may not import (the user must pass
    --model), or the one passed is not the plan's. An error, never a verdict."""


def build_graph(plan: Plan, model: str | None = None):
    """Trace the model a new point is scored on, with the planner's tracer.

    A plan file is data: the model it names is built only when it is a bundled model (a lookup
    in planner.models, no import). Any other model comes from `model`, which only the user's own
    command line (`--model package.module:factory`) or code may give; it must trace to the
    plan's fingerprint.
    """
    if model is None and not is_bundled(plan.model.name):
        raise ModelRefused(
            f"the plan's model {plan.model.name[:80]!r} is not a bundled model, and autoplan never "
            f"imports code a file names; to score a new point, pass the model yourself with "
            f"--model package.module:factory (code you trust)"
        )
    graph = trace_model(model or plan.model.name, None)
    want = plan.model.fingerprint
    if model is not None and want != "*" and graph.fingerprint != want:
        raise ModelRefused(
            f"--model {model}: traces to a different model (fingerprint {graph.fingerprint}) than the "
            f"plan's {plan.model.name[:80]!r} ({want}); pass the model the plan was made for"
        )
    return graph


def score_knobs(plan: Plan, knobs: Knobs, graph=None) -> Plan:
    """The planner's own Plan for `knobs` on the plan's model, hardware and training spec.

    Without `graph`, the plan's model is traced if it is bundled (`build_graph`)."""
    if graph is None:
        graph = build_graph(plan)
    return plan_from_knobs(graph, plan.hardware, plan.train, knobs)


def _region_matches(region: str, knobs: Knobs) -> bool:
    """True when every `name=value` token of a rejection's region holds for `knobs`."""
    toks = [t for t in region.replace(",", " ").split() if "=" in t]
    if not toks:
        return False
    for t in toks:
        try:
            name, value = parse_assignment(t)
        except SpecError:
            return False
        if getattr(knobs, name, None) != value:
            return False
    return True


def search_records(plan: Plan, knobs: Knobs) -> list[str]:
    """What the search recorded about this point: a matching alternative or pruned region."""
    out = []
    for i, alt in enumerate(plan.alternatives, start=1):
        if alt.knobs == knobs:
            fit = "" if alt.fits else ", does not fit"
            out.append(
                f"the search ranked it alternative #{i} ({fmt_s(alt.step_time_s)}/step with its own "
                f"stage split{fit}): {alt.note or 'no note'}"
            )
    for r in plan.rejected:
        if _region_matches(r.region, knobs):
            out.append(f"the search pruned region {r.region} ({r.count} candidates): {r.reason}")
    return out


def compare_terms(plan: Plan, other: Plan) -> list[dict[str, Any]]:
    base_prediction, other_prediction = plan.predicted, other.predicted
    assert base_prediction is not None and other_prediction is not None
    base_terms, other_terms = base_prediction.time_breakdown_s, other_prediction.time_breakdown_s
    keys = list(base_terms) + [key for key in other_terms if key not in base_terms]
    rows = []
    for key in keys:
        base_s, other_s = base_terms.get(key, 0.0), other_terms.get(key, 0.0)
        rows.append(
            {
                "term": key,
                "label": term_label(key),
                "plan_s": base_s,
                "other_s": other_s,
                "delta_s": other_s - base_s,
            }
        )
    base_s, other_s = base_prediction.step_time_s, other_prediction.step_time_s
    rows.append(
        {
            "term": "step_time",
            "label": "step time",
            "plan_s": base_s,
            "other_s": other_s,
            "delta_s": other_s - base_s,
        }
    )
    return rows


def _headline(prediction: Prediction) -> dict[str, Any]:
    """The figures of a prediction a verdict shows, side by side for the plan and the other."""
    return {
        "step_time_s": prediction.step_time_s,
        "mfu": prediction.mfu,
        "samples_per_s": prediction.samples_per_s,
        "peak_memory_bytes": prediction.peak_memory_bytes,
        "memory_capacity_bytes": prediction.memory_capacity_bytes,
        "fits": prediction.fits,
        "memory_bytes": dict(prediction.memory_bytes),
    }


def _fit_reason(other: Plan) -> str:
    prediction = other.predicted
    assert prediction is not None
    over = prediction.peak_memory_bytes - prediction.memory_capacity_bytes
    largest = (
        max(prediction.memory_bytes.items(), key=lambda kv: kv[1])
        if prediction.memory_bytes
        else ("?", 0.0)
    )
    return (
        f"memory: the worst rank (pp stage {prediction.worst_rank_stage}) needs "
        f"{fmt_bytes(prediction.peak_memory_bytes)} but has "
        f"{fmt_bytes(prediction.memory_capacity_bytes)} (over by {fmt_bytes(over)}); "
        f"its largest category is {largest[0]} at {fmt_bytes(largest[1])}"
    )


def why_not(
    plan: Plan,
    overrides: dict[str, object] | None = None,
    other: Plan | None = None,
    graph=None,
    model: str | None = None,
) -> dict[str, Any]:
    """The counterfactual as data (see the module docstring for the verdicts).

    Args:
        graph: the traced model to score new points on; default: traced by `build_graph`.
        model: a model reference from the user's own command line (`--model`), used instead of
            the plan's model name, which is only ever looked up among the bundled models.
    """
    if plan.predicted is None:
        raise SpecError(
            "the plan carries no prediction to compare against; re-plan it with `autoplan plan`"
        )
    base = plan.knobs()
    out: dict[str, Any] = {
        "plan": str(plan),
        "asked": None,
        "knobs": None,
        "verdict": None,
        "reason": "",
        "terms": [],
        "records": [],
    }
    if other is None:
        overrides = overrides or {}
        out["asked"] = " ".join(f"{k}={v}" for k, v in overrides.items())
        try:
            knobs = complete_knobs(
                base, overrides, plan.hardware.num_devices, plan.train.global_batch_size
            )
        except SpecError as e:
            out.update(verdict="invalid", reason=str(e))
            return out
        out["knobs"] = str(knobs)
        out["records"] = search_records(plan, knobs)
        if knobs == base:
            out.update(verdict="same", reason="that is the plan's own choice")
            return out
        if graph is None and model is not None:  # the user's own --model: its errors are errors
            graph = build_graph(plan, model)
        try:
            other = score_knobs(plan, knobs, graph)
        except SpecError as e:
            if isinstance(e, ModelRefused):
                raise
            out.update(verdict="invalid", reason=str(e))
            return out
    else:
        out["asked"] = f"plan file ({other})"
        out["knobs"] = str(other.knobs())
        out["records"] = search_records(plan, other.knobs())
        if other.predicted is None:
            if graph is None and model is not None:
                graph = build_graph(plan, model)
            other = score_knobs(plan, other.knobs(), graph)
    base_prediction, other_prediction = plan.predicted, other.predicted
    assert base_prediction is not None and other_prediction is not None
    out["terms"] = compare_terms(plan, other)
    out["other"] = {**_headline(other_prediction), "notes": list(other_prediction.notes)}
    out["base"] = _headline(base_prediction)
    if (
        not other_prediction.fits
        or other_prediction.peak_memory_bytes > other_prediction.memory_capacity_bytes
    ):
        out.update(verdict="does_not_fit", reason=_fit_reason(other))
        return out
    base_s, other_s = base_prediction.step_time_s, other_prediction.step_time_s
    delta = other_s - base_s
    biggest = max((r for r in out["terms"][:-1]), key=lambda r: abs(r["delta_s"]), default=None)
    if abs(delta) <= 1e-9 * max(1.0, base_s):
        out.update(verdict="same", reason="the same predicted step time")
    else:
        verdict = "slower" if delta > 0 else "faster"
        why = (
            f"; the largest change is {biggest['label']} ({biggest['delta_s']:+.4g} s)"
            if biggest
            else ""
        )
        out.update(
            verdict=verdict,
            reason=(f"{fmt_s(other_s)} vs {fmt_s(base_s)} per step ({delta / base_s:+.1%}){why}"),
        )
        if verdict == "faster":
            out["reason"] += (
                " — faster than the plan by this model; if the plan was searched with the "
                "same model, check its constraints (pins, memory headroom)"
            )
    return out
