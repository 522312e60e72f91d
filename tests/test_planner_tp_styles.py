"""Tier 1: the tensor-parallel style patterns the planner emits name real modules, agree with the
runtime's conventions (tests/runtime_plans.py), and pass the runtime's pure validation."""

from __future__ import annotations

import fnmatch

import pytest

from planner.api import autoplan, trace_model
from planner.build_plan import tp_styles
from planner.models import build_model
from runtime.parallelize import validate_model
from specs import Constraints, HardwareSpec, TrainSpec
from tests import runtime_plans

FAMILIES = [("gpt-tiny", "gpt"), ("llama-tiny", "llama"), ("mlp-tiny", "mlp")]


@pytest.fixture(scope="module")
def traced():
    out = {}
    for name, _ in FAMILIES:
        out[name] = (trace_model(name, None), [n for n, _ in build_model(name, device="meta").module.named_modules() if n])
    return out


@pytest.mark.tier1
@pytest.mark.parametrize("name", [n for n, _ in FAMILIES])
@pytest.mark.parametrize("sp", [False, True])
def test_every_emitted_pattern_matches_a_module(traced, name, sp):
    graph, modules = traced[name]
    styles = tp_styles(graph, 2, sp)
    assert styles
    dead = [p for p in styles if not any(fnmatch.fnmatchcase(m, p) for m in modules)]
    assert not dead, f"{name} sp={sp}: patterns matching no module: {dead}"


@pytest.mark.tier1
@pytest.mark.parametrize(("name", "kind", "sp"), [("gpt-tiny", "gpt", False), ("gpt-tiny", "gpt", True),
                                                  ("llama-tiny", "llama", False), ("mlp-tiny", "mlp", False)])
def test_patterns_follow_the_runtime_conventions(traced, name, kind, sp):
    """Every entry of the runtime's own style table for the family is emitted, with the same style."""
    graph, _ = traced[name]
    styles = tp_styles(graph, 2, sp)
    want = runtime_plans.tp_styles(kind, sp)
    assert {p: styles.get(p) for p in want} == want


@pytest.mark.tier1
def test_gpt_tiny_sequence_parallel_norms_are_relative_to_the_layer():
    graph = trace_model("gpt-tiny", None)
    styles = tp_styles(graph, 2, True)
    assert styles["layers.*.attn_norm"] == "sequence" and styles["head.norm"] == "sequence"
    assert not any(p.startswith("layers.*.layers.") for p in styles)


@pytest.mark.tier1
@pytest.mark.parametrize("sp", [False, True])
def test_planner_tp2_plan_passes_runtime_validation(sp):
    """A plan autoplan made (tp pinned to 2) is accepted by runtime.parallelize.validate_model:
    block names, every style resolved on the real module, and the fingerprint, no processes."""
    hw = HardwareSpec.preset("cpu", devices=2)
    plan = autoplan("gpt-tiny", hw, train=TrainSpec(global_batch_size=4),
                    constraints=Constraints(tp=2, pp=1, sequence_parallel=sp))
    assert plan.mesh.tp == 2 and plan.tensor_parallel.sequence_parallel is sp
    built = build_model("gpt-tiny", batch=3)  # another batch than the planner's trace
    notes = validate_model(built.module, plan, built.example_inputs)
    assert not any("fingerprint" in n for n in notes)
