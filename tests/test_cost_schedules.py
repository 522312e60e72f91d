"""Pipeline schedules and the simulator, against closed forms (which are tests, not the model)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cost_models import build_schedule, simulate
from cost_models.schedules import Action, schedule_from_str
from cost_models.simulator import compile_schedule, play
from specs import SpecError, StageTimes

pytestmark = pytest.mark.tier1


def _uniform(p, v, f=1.0, b=2.0, w=0.0, c=0.0):
    return [StageTimes(forward_s=f / v, backward_s=b / v, weight_s=w / v, p2p_s=c) for _ in range(p * v)]


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(2, 1), (2, 8), (4, 4), (4, 16), (8, 8), (8, 33)])
def test_bubble_gpipe_1f1b(name, p, m):
    r = simulate(build_schedule(name, p, m, 1), _uniform(p, 1))
    assert r.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    assert r.step_time_s == pytest.approx((m + p - 1) * 3.0)


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (4, 16, 4), (8, 16, 2), (2, 6, 3)])
def test_bubble_interleaved(p, m, v):
    r = simulate(build_schedule("interleaved_1f1b", p, m, v), _uniform(p, v))
    want = ((p - 1) / v) / (m + (p - 1) / v)
    assert r.bubble_fraction == pytest.approx(want)


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 4), (8, 16)])
@pytest.mark.parametrize("f,b,w", [(1.0, 1.0, 1.0), (1.0, 1.2, 0.9)])
def test_zero_bubble_h1_matches_paper(p, m, f, b, w):
    """Qi et al. 2023: ZB-H1 step = m(F+B+W) + (p-1)(F+B-W), vs 1F1B's (p-1)(F+B+W)."""
    r = simulate(build_schedule("zero_bubble", p, m, 1), _uniform(p, 1, f, b, w))
    assert r.step_time_s == pytest.approx(m * (f + b + w) + (p - 1) * (f + b - w))
    one = simulate(build_schedule("1f1b", p, m, 1), _uniform(p, 1, f, b, w))
    assert one.step_time_s == pytest.approx(m * (f + b + w) + (p - 1) * (f + b + w))


@pytest.mark.parametrize("p,m", [(4, 8), (4, 2), (8, 16)])
def test_peak_in_flight(p, m):
    assert simulate(build_schedule("gpipe", p, m, 1), _uniform(p, 1)).peak_in_flight == (m,) * p
    got = simulate(build_schedule("1f1b", p, m, 1), _uniform(p, 1)).peak_in_flight
    assert got == tuple(min(p - r, m) for r in range(p))


def test_p2p_delays_pipeline():
    p, m, c = 4, 8, 0.1
    base = simulate(build_schedule("gpipe", p, m, 1), _uniform(p, 1)).step_time_s
    slow = simulate(build_schedule("gpipe", p, m, 1), _uniform(p, 1, c=c)).step_time_s
    assert slow == pytest.approx(base + 2 * (p - 1) * c)  # once down the forward chain, once back
    # 1F1B also waits on the round trip in its steady state: between the two bounds
    base = simulate(build_schedule("1f1b", p, m, 1), _uniform(p, 1)).step_time_s
    slow = simulate(build_schedule("1f1b", p, m, 1), _uniform(p, 1, c=c)).step_time_s
    assert base + 2 * (p - 1) * c - 1e-9 <= slow <= base + 2 * (m + p - 1) * c + 1e-9


def test_timeline_respects_dependencies():
    sched = build_schedule("interleaved_1f1b", 4, 8, 2)
    r = simulate(sched, _uniform(4, 2, c=0.05))
    ends = {(k, s, mb): (st_, e) for _, k, s, mb, st_, e in r.timeline}
    S = sched.num_stages
    for (k, s, mb), (start, _) in ends.items():
        if k == "F" and s > 0:
            assert start >= ends[("F", s - 1, mb)][1] - 1e-12
        if k == "B" and s < S - 1:
            assert start >= ends[("B", s + 1, mb)][1] - 1e-12
    per_rank = {}
    for rank, _, _, _, start, end in r.timeline:
        per_rank.setdefault(rank, []).append((start, end))
    for spans in per_rank.values():
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(spans, spans[1:], strict=False))
    assert max(e for *_, e in r.timeline) == pytest.approx(r.step_time_s)


def test_actions_print_like_pytorch_and_parse_back():
    sched = build_schedule("1f1b", 2, 3, 1)
    assert str(sched.actions[0][0]) == "0F0"
    assert Action.from_str("12B3") == Action("B", 12, 3)
    back = schedule_from_str("1f1b", 2, 3, 1, str(sched))
    assert back.actions == sched.actions


def test_every_micro_batch_runs_once_per_stage():
    for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 1)):
        sched = build_schedule(name, 4, 8, v)
        seen = [a for acts in sched.actions for a in acts]
        kinds = "FBW" if name == "zero_bubble" else "FB"
        assert len(seen) == len(set(seen)) == len(kinds) * 8 * 4 * v
        for r, acts in enumerate(sched.actions):
            assert all(sched.stage_rank[a.stage] == r for a in acts)


def test_bad_schedules_raise_spec_errors():
    with pytest.raises(SpecError, match="multiple of pp"):
        build_schedule("interleaved_1f1b", 4, 6, 2)
    with pytest.raises(SpecError, match="unknown schedule"):
        build_schedule("dualpipe", 4, 8, 1)
    with pytest.raises(SpecError, match="virtual"):
        build_schedule("1f1b", 4, 8, 2)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"]), p=st.integers(1, 6),
       k=st.integers(1, 4), data=st.data())
def test_simulator_lower_bounds_and_cache(name, p, k, data):
    v = 2 if name == "interleaved_1f1b" else 1
    m = p * k
    times = [tuple(data.draw(st.floats(0.01, 3.0)) for _ in range(3)) + (data.draw(st.floats(0, 0.5)),)
             for _ in range(p * v)]
    r = simulate(build_schedule(name, p, m, v), times, timeline=False)
    work = [m * sum(sum(times[j][:3]) for j in range(rk, p * v, p)) for rk in range(p)]
    assert r.step_time_s >= max(work) * (1 - 1e-12)
    assert r.busy_s == pytest.approx(work)
    c = play(compile_schedule(name, p, m, v), tuple(times), name == "zero_bubble")
    assert c.step_time_s == r.step_time_s
    # more time per stage never makes the step shorter
    slower = [(f * 1.5, b, w, c_) for f, b, w, c_ in times]
    assert simulate(build_schedule(name, p, m, v), slower, timeline=False).step_time_s >= r.step_time_s * (1 - 1e-12)
