"""cost_models.sharedsim: a schedule under processor sharing, against the plain simulation (cores
enough for every rank), closed forms (one core: all work in series) and monotonicity."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cost_models.schedules import build_schedule_plain
from cost_models.sharedsim import simulate_shared
from cost_models.simulator import simulate

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("zero_bubble", 1), ("interleaved_1f1b", 2)]


def _times(pp: int, v: int, f: float, b: float, w: float, c: float, skew: float = 0.0):
    return tuple((f * (1 + skew * j), b * (1 + skew * j), w, c) for j in range(pp * v))


def _work(name: str, m: int, times) -> float:
    return m * sum(f + b + w for f, b, w, _c in times)


@pytest.mark.parametrize("name,v", SCHEDULES)
@pytest.mark.parametrize("pp", [2, 4])
def test_enough_cores_is_the_plain_simulation(name, v, pp):
    m = 2 * pp
    times = _times(pp, v, 1.0, 2.0, 0.5 if name == "zero_bubble" else 0.0, 0.1, skew=0.3)
    plain = simulate(build_schedule_plain(name, pp, m, v), times, timeline=False).step_time_s
    assert simulate_shared(name, pp, m, v, times, cores=pp) == pytest.approx(plain, rel=1e-12)
    assert simulate_shared(name, pp, m, v, times, cores=4 * pp) == pytest.approx(plain, rel=1e-12)


@pytest.mark.parametrize("name,v", SCHEDULES)
def test_one_core_without_p2p_runs_all_work_in_series(name, v):
    pp, m = 4, 8
    times = _times(pp, v, 1.0, 2.0, 0.5, 0.0, skew=0.2)
    assert simulate_shared(name, pp, m, v, times, cores=1.0) == pytest.approx(_work(name, m, times), rel=1e-9)


def test_two_stage_gpipe_on_one_core_closed_form():
    # F0 then F1 (after a p2p delay c with nothing else to run), B1, then B0 after the delay
    f, b, c = 1.0, 2.0, 0.25
    assert simulate_shared("gpipe", 2, 1, 1, ((f, b, 0.0, c), (f, b, 0.0, 0.0)), cores=1.0) == pytest.approx(
        2 * f + 2 * b + 2 * c)


def test_tail_work_runs_after_each_ranks_last_action_and_shares_the_cores():
    times = _times(2, 1, 1.0, 1.0, 0.0, 0.0)
    base = simulate_shared("gpipe", 2, 1, 1, times, cores=1.0)
    assert simulate_shared("gpipe", 2, 1, 1, times, cores=1.0, tail=[0.5, 0.5]) == pytest.approx(base + 1.0)
    # with a core each, the tails run side by side after the ranks' last actions
    plain = simulate_shared("gpipe", 2, 1, 1, times, cores=2.0)
    assert simulate_shared("gpipe", 2, 1, 1, times, cores=2.0, tail=[0.5, 0.5]) == pytest.approx(plain + 0.5)


@settings(max_examples=40, deadline=None)
@given(sched=st.sampled_from(SCHEDULES), pp=st.sampled_from([2, 4]), mult=st.integers(1, 3),
       f=st.floats(0.1, 3.0), b=st.floats(0.1, 3.0), c=st.floats(0.0, 1.0), skew=st.floats(0.0, 1.0),
       cores=st.floats(0.5, 4.0))
def test_bounds_and_monotone_in_cores(sched, pp, mult, f, b, c, skew, cores):
    name, v = sched
    m = pp * mult
    times = _times(pp, v, f, b, 0.3 if name == "zero_bubble" else 0.0, c, skew)
    got = simulate_shared(name, pp, m, v, times, cores=cores)
    plain = simulate(build_schedule_plain(name, pp, m, v), times, timeline=False).step_time_s
    assert got >= plain * (1 - 1e-9)  # sharing never helps
    assert got >= _work(name, m, times) / cores * (1 - 1e-9)  # the cores cannot do the work faster
    assert simulate_shared(name, pp, m, v, times, cores=cores / 2) >= got * (1 - 1e-9)  # fewer cores
