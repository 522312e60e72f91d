"""Tier 1: a new cost term is added in one place and reaches everything that reads the cost model.

The demonstration issue 16 asks for: a test-only "fake collective" is charged in ONE place, the
per-block terms (cost_models.blocks._layer_cost: here, an extra exposed tensor-parallel
collective of FAKE_S seconds per block and micro-batch in forward, the way a new collective of
a parallelism axis would be added). Nothing else changes, and the term shows up

- in the estimate: the step time grows by m x blocks x FAKE_S on a one-stage plan, and the
  breakdown's `tp_comm_s` and the tp axis' exposed time carry exactly that;
- in the search's bound (CostModel.lower_bound): it grows by the same amount;
- in the plan the planner returns and in what `autoplan explain` shows (explain_data's
  breakdown row "exposed comm (tp)").

How few places change: the stage terms (cost_models.stages) sum block terms by name, the rank
terms (cost_models.ranks) sum stage terms by name, the estimate and the bound read those, and
the explainer reads the Prediction: one edit.
"""

from __future__ import annotations

import dataclasses

import pytest

from cost_models import CostModel, blocks
from planner.api import autoplan
from planner.explain.report import explain_data
from specs import Constraints, HardwareSpec, Knobs, TrainSpec
from tests.graphs import gpt_graph

pytestmark = pytest.mark.tier1

FAKE_S = 1e-3


GRAPH = gpt_graph(vocab=1024, hidden=512, layers=4, heads=8, seq_len=256)
HW = HardwareSpec.preset("dgx-a100-80gb", devices=8)
TRAIN = TrainSpec(global_batch_size=32)
KNOBS = Knobs(pp=1, dp=4, tp=2, sharding="none", micro_batch_size=2, num_micro_batches=4)
STAGES = [(0, GRAPH.num_blocks - 1, "none")]


def _measure():
    cm = CostModel(GRAPH, HW, TRAIN)
    est = cm.estimate(KNOBS, STAGES)
    plan = autoplan(None, HW, graph=GRAPH, train=TRAIN, constraints=Constraints(
        pp=1, dp=4, tp=2, sharding="none", micro_batch_size=2, recompute="none", sequence_parallel=False))
    shown = {row["term"]: row["seconds"] for row in explain_data(plan)["predicted"]["breakdown"]}
    return est, cm.lower_bound(KNOBS, STAGES), plan, shown


def test_a_term_added_in_one_place_flows_everywhere(monkeypatch):
    base_est, base_bound, base_plan, base_shown = _measure()
    with monkeypatch.context() as m:
        original = blocks._layer_cost

        def with_fake(model, lt, tp, sp, mb, recompute, ep, cp):
            cost = original(model, lt, tp, sp, mb, recompute, ep, cp)
            return dataclasses.replace(cost, tp_forward_s=cost.tp_forward_s + FAKE_S)

        m.setattr(blocks, "_layer_cost", with_fake)
        est, bound, plan, shown = _measure()
    added = KNOBS.num_micro_batches * GRAPH.num_blocks * FAKE_S
    # the estimate: step, breakdown row and the tp axis
    assert est.step_time_s == pytest.approx(base_est.step_time_s + added, rel=1e-9)
    assert est.time_breakdown_s["tp_comm_s"] == pytest.approx(base_est.time_breakdown_s["tp_comm_s"] + added)
    assert est.comm["tp"].exposed_s == pytest.approx(base_est.comm["tp"].exposed_s + added)
    for term in ("compute_forward_s", "compute_backward_s", "dp_comm_s", "optimizer_s"):
        assert est.time_breakdown_s[term] == base_est.time_breakdown_s[term]
    # the bound the search prunes by
    assert bound == pytest.approx(base_bound + added, rel=1e-9)
    # the plan the planner returns (same knobs, pinned) and what the explainer shows
    assert plan.knobs() == base_plan.knobs()
    assert plan.predicted.time_breakdown_s["tp_comm_s"] == pytest.approx(
        base_plan.predicted.time_breakdown_s["tp_comm_s"] + added)
    assert shown["tp_comm_s"] == pytest.approx(base_shown["tp_comm_s"] + added)
