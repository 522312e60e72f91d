"""The pipeline timeline: a golden text chart for 1F1B (pp=2, 4 micro-batches) and real pictures."""

from __future__ import annotations

import pytest

from planner.explain import timeline as tl
from specs import SpecError
from tests.explain_sample import ONE_F_ONE_B_PP2_M4, big_plan, count_colour, small_plan

# F = 1 s, B = 2 s: the shortest action gets two columns, so the 15 s step takes 30.
GOLDEN_1F1B = """\
        0                         15 s
rank 0 |F0F1....B0==F2B1==F3B2==..B3==
rank 1 |..F0B0==F1B1==F2B2==F3B3==....
        F fwd  B bwd  W weight-grad  # mixed  . idle  (digits: micro-batch)"""


def _entries():
    return [tl.Entry(*e) for e in ONE_F_ONE_B_PP2_M4]


def test_golden_1f1b_text_chart():
    assert "\n".join(tl.text_chart(_entries())) == GOLDEN_1F1B


def test_cost_model_simulator_replays_to_the_same_chart():
    """The plan's recorded stage times replayed through cost_models' simulator give the chart
    worked out by hand (and so the same schedule)."""
    entries, why = tl.plan_timeline(small_plan())
    if not entries:
        pytest.skip(f"no simulator in this build: {why}")
    assert "\n".join(tl.text_chart(entries)) == GOLDEN_1F1B


def test_narrow_chart_stays_in_width_and_marks_mixed_columns():
    lines = tl.text_chart(_entries(), width=20)
    rows = [ln for ln in lines if ln.startswith("rank")]
    assert len(rows) == 2 and all(len(r) <= 20 for r in rows)
    # 15 s in 12 columns: every column of rank 0 from 4 s on is busy
    assert set(rows[0].split("|")[1][4:]) <= set("-=#BF0123")


def test_chart_of_a_long_interleaved_schedule_has_idle_ramps():
    entries, why = tl.plan_timeline(big_plan())
    if not entries:
        pytest.skip(f"no simulator in this build: {why}")
    lines = tl.text_chart(entries, width=100)
    rows = [ln.split("|", 1)[1] for ln in lines if ln.startswith("rank")]
    assert len(rows) == 8 and all(len(r) <= 92 for r in rows)
    assert rows[7].startswith(".")  # the last rank waits for the first forward
    assert "#" in rows[3]  # steady state alternates faster than a column


def test_normalise_action_names():
    assert [
        tl.normalise_action(a) for a in ("F", "forward", "B", "I", "backward_input", "W", "weight")
    ] == ["F", "F", "B", "B", "B", "W", "W"]


def test_no_timeline_without_pipeline():
    plan = big_plan()
    entries, why = tl.plan_timeline(
        plan.model_copy(update={"predicted": plan.predicted.model_copy(update={"stage_times": []})})
    )
    assert entries == [] and "stage_times" in why


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_pictures_are_real_images(tmp_path, suffix):
    path = tl.draw_timeline(_entries(), tmp_path / f"t.{suffix}", title="1f1b pp=2 m=4")
    data = path.read_bytes()
    assert len(data) > 5000
    if suffix == "svg":
        text = data.decode()
        assert (
            "<svg" in text
            and tl.COLORS["F"].lower() in text.lower()
            and tl.COLORS["B"].lower() in text.lower()
        )
        return
    from PIL import Image

    w, h = Image.open(path).size
    assert w >= 800 and h >= 100
    fwd = count_colour(path, tl.COLORS["F"])
    bwd = count_colour(path, tl.COLORS["B"])
    # backward bars are twice as long as forward bars: the drawn areas say so
    assert fwd > 2000 and bwd > 2000
    assert 1.5 < bwd / fwd < 2.6


def test_picture_suffix_and_empty_errors(tmp_path):
    with pytest.raises(SpecError, match=r"\.png or \.svg"):
        tl.draw_timeline(_entries(), tmp_path / "t.gif")
    with pytest.raises(SpecError, match="no pipeline timeline"):
        tl.draw_timeline([], tmp_path / "t.png")
