"""The terminal explanation: content read from the plan's records, and a 100-column fit."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from planner.explain.knobs import complete_knobs, constraints_from_pins, parse_assignment
from planner.explain.render import render_explain
from planner.explain.report import explain_data, knob_diff, mesh_axes
from specs import Knobs, SpecError
from tests.explain_sample import GIB, big_plan, small_plan


def _render(plan, width=100, color=False) -> str:
    con = Console(
        width=width,
        file=io.StringIO(),
        highlight=False,
        force_terminal=color,
        color_system="truecolor" if color else None,
    )
    render_explain(plan, con)
    return con.file.getvalue()


@pytest.mark.parametrize("make", [big_plan, small_plan])
def test_fits_100_columns(make):
    text = _render(make())
    lines = text.splitlines()
    assert len(lines) > 30
    too_long = [ln for ln in lines if len(ln) > 100]
    assert not too_long, too_long[:3]


def test_fits_100_columns_with_colour_codes_stripped():
    from rich.text import Text

    text = _render(big_plan(), color=True)
    assert "\x1b[" in text  # really coloured
    assert all(Text.from_ansi(ln).cell_len <= 100 for ln in text.splitlines())


def test_mesh_axes_links_follow_the_layout():
    axes = {a["axis"]: a for a in mesh_axes(big_plan())}
    # 8 GPUs per node: tp=8 consecutive ranks stay in a node; dp (stride 8) and pp (stride 128) do not.
    assert axes["tp"]["spans_nodes"] is False and "NVLink" in axes["tp"]["link"]
    assert axes["dp"]["num_nodes_spanned"] == 16 and "InfiniBand" in axes["dp"]["link"]
    assert axes["pp"]["num_nodes_spanned"] == 8 and axes["pp"]["stride"] == 128
    small = {a["axis"]: a for a in mesh_axes(small_plan())}
    assert small["pp"]["spans_nodes"] is False and small["tp"]["link"].startswith("none")


def test_hsdp_shows_the_two_parts_of_dp():
    from planner.explain.html import render_html
    from specs import Plan

    data = big_plan().model_dump(mode="json")
    data["data_parallel"].update(sharding="hsdp", hsdp_shard_size=4)
    plan = Plan.from_dict(data)
    axes = {a["axis"]: a for a in mesh_axes(plan)}
    # dp=16 at stride 8 (tp=8): shard groups of 4 (stride 8, 4 nodes), 4 replicas (stride 32)
    assert [a["axis"] for a in mesh_axes(plan)] == ["tp", "dp", "dp_shard", "dp_replicate", "pp"]
    assert axes["dp_shard"]["part_of"] == axes["dp_replicate"]["part_of"] == "dp"
    assert axes["dp_shard"]["first_group"] == [0, 8, 16, 24]
    assert axes["dp_replicate"]["stride"] == 32
    assert axes["dp"]["part_of"] is None and axes["dp"]["num_nodes_spanned"] == 16
    text = _render(plan)
    assert "dp_shard=4  rank stride 8, spans 4 nodes" in text
    assert "dp_replicate=4  rank stride 32, spans 4 nodes" in text
    assert "<ul><li><b>dp_shard=4</b>" in render_html(plan)


def test_explanation_shows_the_recorded_numbers():
    plan = big_plan()
    text = _render(plan)
    for needle in (
        "tp=8",
        "NVLink within a node",
        "InfiniBand across nodes",
        "stage 15 on pp rank 7",
        "layers.91 .. head",
        "pipeline bubble",
        "740 ms",
        "MFU 48.2%",
        "56.5 GiB of 80.0 GiB",
        "activations",
        "38.0 GiB",
        "tp=4 halves NVLink traffic",
        "2.6 TiB",
        "1834 candidates",
    ):
        assert needle in text, needle
    d = explain_data(plan)
    pr = d["predicted"]
    assert pr["breakdown_sum_s"] == pytest.approx(pr["step_time_s"])
    assert [t["term"] for t in pr["breakdown"]] == list(plan.predicted.time_breakdown_s)
    assert pr["memory"]["free_bytes"] == pytest.approx(80 * GIB - plan.predicted.peak_memory_bytes)


def test_alternative_deltas_and_changes():
    d = explain_data(big_plan())
    alts = d["alternatives"]
    assert [a["rank"] for a in alts] == [1, 2, 3, 4]
    assert alts[0]["change"] == "dp=32 tp=4 mb=1x48"
    assert alts[0]["delta_fraction"] == pytest.approx(0.07)
    assert alts[1]["change"] == "sched=1f1b"
    assert alts[3]["fits"] is False and alts[3]["delta_s"] < 0


def test_knob_diff_reports_dropped_flags():
    a = Knobs(pp=1, dp=2, tp=4, sequence_parallel=True)
    b = Knobs(pp=1, dp=2, tp=4)
    assert knob_diff(a, b) == "no-sp"
    assert knob_diff(b, a) == "sp"
    assert knob_diff(a, a) == "(same knobs)"


def test_plan_without_prediction_still_renders():
    text = _render(big_plan(predicted=None, alternatives=[], rejected=[], search=None))
    assert "carries no prediction" in text
    assert all(len(ln) <= 100 for ln in text.splitlines())


def test_memory_over_capacity_is_flagged():
    plan = small_plan(memory_capacity_bytes=2e6, fits=False)
    text = _render(plan)
    assert "OVER capacity" in text and "NOT to fit" in text


# ------------------------------------------------------------------ knob parsing
@pytest.mark.parametrize(
    "text,expected",
    [
        ("tp=8", ("tp", 8)),
        ("zero=1", ("sharding", "zero1")),
        ("zero=0", ("sharding", "none")),
        ("zero=3", ("sharding", "zero3")),
        ("ckpt=full", ("recompute", "full")),
        ("sched=interleaved_1f1b", ("schedule", "interleaved_1f1b")),
        ("sp=true", ("sequence_parallel", True)),
        ("mb=2", ("micro_batch_size", 2)),
        ("offload=cpu", ("offload", "cpu")),
    ],
)
def test_parse_assignment(text, expected):
    assert parse_assignment(text) == expected


@pytest.mark.parametrize(
    "text,needles",
    [
        ("zero=5", ["zero", "'5'", "none, zero1, zero2, zero3, hsdp"]),
        ("tp=four", ["tp", "'four'", "positive integer"]),
        ("tp=0", ["tp", "positive integer"]),
        ("ckpt=some", ["ckpt", "none, selective, full"]),
        ("sched=pipedream", ["sched", "gpipe, 1f1b, interleaved_1f1b, zero_bubble"]),
        ("tensor=8", ["unknown knob 'tensor'", "pp, dp, tp"]),
        ("tp8", ["NAME=VALUE"]),
    ],
)
def test_bad_pins_name_the_knob_and_allowed_values(text, needles):
    with pytest.raises(SpecError) as e:
        parse_assignment(text)
    for n in needles:
        assert n in str(e.value)


def test_constraints_from_pins_and_cross_field_errors():
    c = constraints_from_pins(["tp=8", "zero=1,pp=4"])
    assert (c.tp, c.pp, c.sharding) == (8, 4, "zero1")
    with pytest.raises(SpecError, match="sequence_parallel"):
        constraints_from_pins(["tp=1", "sp=true"])
    with pytest.raises(SpecError, match="given twice"):
        constraints_from_pins(["tp=8", "tp=4"])


def test_complete_knobs_keeps_world_and_batch():
    base = big_plan().knobs()
    k = complete_knobs(base, {"tp": 4}, 1024, 1536)
    assert (k.tp, k.dp, k.pp) == (4, 32, 8) and k.num_micro_batches == 48
    k = complete_knobs(base, {"pp": 1}, 1024, 1536)
    assert k.dp == 128 and k.num_micro_batches == 12
    with pytest.raises(
        SpecError, match=r"tp\(3\) \* pp\(8\) = 24 does not divide the 1024 devices"
    ):
        complete_knobs(base, {"tp": 3}, 1024, 1536)
    with pytest.raises(SpecError, match="global batch 1536 is not divisible"):
        complete_knobs(base, {"micro_batch_size": 5}, 1024, 1536)


def test_term_labels_of_the_cost_models_keys():
    from planner.explain.report import term_label

    assert term_label("tp_comm_s") == "exposed comm (tp)"
    assert term_label("comm_dp") == "exposed comm (dp)"
    assert term_label("bubble_s") == "pipeline bubble"
    assert term_label("compute_forward_s") == "compute: forward"
    assert term_label("something_new_s") == "something new"


def test_pins_accept_search_bounds_but_why_not_does_not():
    c = constraints_from_pins(["max_tp=4", "memory_headroom_fraction=0.1", "tp_across_nodes=true"])
    assert (c.max_tp, c.memory_headroom_fraction, c.tp_across_nodes) == (4, 0.1, True)
    with pytest.raises(SpecError, match="memory_headroom_fraction"):
        constraints_from_pins(["memory_headroom_fraction=1.5"])
    with pytest.raises(SpecError, match="unknown knob 'max_tp'"):
        parse_assignment("max_tp=4")


def test_knob_diff_names_hsdp_group_size():
    a = Knobs(pp=1, dp=256, tp=4, sharding="hsdp", hsdp_shard_size=128)
    b = Knobs(pp=1, dp=256, tp=4, sharding="hsdp", hsdp_shard_size=64)
    assert knob_diff(a, b) == "zero=hsdp(64)"


def test_rejected_table_keeps_named_baselines_and_largest_regions():
    from planner.explain.render import rejected_table
    from specs import Rejection

    rej = [Rejection(region=f"tp={2**i}", reason="r", count=i) for i in range(20)]
    rej.append(
        Rejection(region="layer-wise model parallelism", reason="needs 1024 stages", count=1)
    )
    t = rejected_table(explain_data(big_plan(rejected=rej)), max_rows=5)
    regions = list(t.columns[0].cells)
    assert regions == [
        "tp=65536",
        "tp=131072",
        "tp=262144",
        "tp=524288",
        "layer-wise model parallelism",
    ]
    assert "16 smaller regions not shown" in t.caption
