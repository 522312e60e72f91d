"""Tier 1: the simulator's paths (plain-tuple schedules, the timing pass without a timeline,
`compile_schedule` + `play` as a CostModel runs them) give exactly what the reference path
(Action schedules, timeline pass) gives; CostModel.simulate memoises by the stage times' id."""

from __future__ import annotations

import random

import pytest

from cost_models import build_schedule, simulate
from cost_models.schedules import build_schedule_plain
from cost_models.simulator import _compile, compile_schedule, play

SHAPES = [("gpipe", 3, 5, 1), ("1f1b", 4, 9, 1), ("1f1b", 4, 2, 1), ("interleaved_1f1b", 4, 8, 2),
          ("interleaved_1f1b", 2, 6, 4), ("zero_bubble", 4, 8, 1), ("zero_bubble", 5, 3, 1), ("1f1b", 1, 3, 1)]


@pytest.mark.tier1
@pytest.mark.parametrize(("name", "pp", "m", "v"), SHAPES)
def test_plain_schedule_equals_actions(name, pp, m, v):
    ref, fast = build_schedule(name, pp, m, v), build_schedule_plain(name, pp, m, v)
    assert fast.actions == ref.actions and fast.stage_rank == ref.stage_rank
    assert _compile(fast) == _compile(ref)


@pytest.mark.tier1
@pytest.mark.parametrize(("name", "pp", "m", "v"), SHAPES)
def test_fast_pass_equals_timeline_pass(name, pp, m, v):
    rng = random.Random(7)
    for _ in range(5):
        times = tuple((rng.uniform(0.1, 2), rng.uniform(0.1, 3), rng.uniform(0, 1), rng.uniform(0, 0.3))
                      for _ in range(pp * v))
        ref = simulate(build_schedule(name, pp, m, v), times, timeline=True)
        got = simulate(build_schedule(name, pp, m, v), times, timeline=False)
        assert got.step_time_s == ref.step_time_s  # exactly: same additions in the same order
        assert got.busy_s == ref.busy_s and got.peak_in_flight_per_stage == ref.peak_in_flight_per_stage
        played = play(compile_schedule(name, pp, m, v), times, name == "zero_bubble")
        assert played == got


def test_memo_by_times_id_is_the_memo_by_value():
    """CostModel.simulate memoises by the caller's id for the stage times (the layout's times_id):
    the same result as played by value, and one id never answers for another's times."""
    from cost_models import CostModel
    from specs import HardwareSpec, TrainSpec
    from tests.graphs import gpt_graph

    cm = CostModel(gpt_graph(vocab=512, hidden=64, layers=4, heads=4, seq_len=32), HardwareSpec.preset("dgx-a100-80gb", 1), TrainSpec(global_batch_size=8))
    rng = random.Random(3)
    for name, pp, m, v in (("1f1b", 4, 16, 1), ("zero_bubble", 4, 12, 1), ("interleaved_1f1b", 2, 8, 2)):
        a = tuple((rng.uniform(0.1, 2), rng.uniform(0.1, 3), rng.uniform(0, 1), 0.01) for _ in range(pp * v))
        b = tuple((f * 2, bb, w, c) for f, bb, w, c in a)
        ia, ib = cm.new_id(), cm.new_id()
        got_a, got_b = cm.simulate(name, pp, m, v, a, ia), cm.simulate(name, pp, m, v, b, ib)
        comp = compile_schedule(name, pp, m, v)
        split = name == "zero_bubble"
        assert got_a == play(comp, a, split) and got_b == play(comp, b, split)
        assert got_a != got_b and cm.simulate(name, pp, m, v, a, ia) is got_a
