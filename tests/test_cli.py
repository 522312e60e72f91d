"""The `autoplan` command line: every command, --format json, and errors as exit code 2 with one
clear message (never a traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from planner.cli import main
from planner.explain import whynot
from specs import PLAN_VERSION
from tests.explain_sample import GIB, big_plan, small_plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def plans(tmp_path):
    big, small = tmp_path / "big.yaml", tmp_path / "small.json"
    big_plan().to_file(big)
    small_plan().to_file(small)
    return big, small


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_explain_text_fits_100_columns(capsys, plans):
    code, out, err = run(capsys, "explain", plans[0])
    assert code == 0 and err == ""
    assert "dp=16 tp=8 pp=8 zero=1 mb=1x96" in out and "Why: where the step time goes" in out
    assert max(len(ln) for ln in out.splitlines()) <= 100


def test_explain_json(capsys, plans):
    code, out, _ = run(capsys, "explain", plans[1], "--format", "json")
    d = json.loads(out)["explain"]
    assert code == 0 and d["plan"] == str(small_plan())
    assert d["predicted"]["step_time_s"] == pytest.approx(0.017)


def test_explain_picture_and_html(capsys, plans, tmp_path):
    png, html = tmp_path / "t.png", tmp_path / "r.html"
    code, out, _ = run(capsys, "explain", plans[1], "--picture", png, "--html", html)
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert html.read_text().count("<svg") >= 3
    assert f"picture written to {png}" in out


def test_compare(capsys, plans, tmp_path):
    other = tmp_path / "other.yaml"
    p = big_plan()
    p.model_copy(
        update={"data_parallel": p.data_parallel.model_copy(update={"sharding": "zero3"})}
    ).to_file(other)
    code, out, _ = run(capsys, "compare", plans[0], other)
    assert code == 0 and "*sharding" in out and "zero1" in out and "zero3" in out
    assert max(len(ln) for ln in out.splitlines()) <= 100
    code, out, _ = run(capsys, "compare", plans[0], other, "--format", "json")
    d = json.loads(out)
    assert [r["name"] for r in d["rows"] if r["differs"]] == ["sharding"]


@pytest.mark.parametrize("target", ["deepspeed", "torchtitan", "megatron"])
def test_export(capsys, plans, tmp_path, target):
    code, out, err = run(capsys, "export", plans[0], "--to", target)
    assert code == 0 and out
    if target == "deepspeed":
        assert json.loads(out)["train_batch_size"] == 1536 and "note:" in err
    dest = tmp_path / "cfg"
    code, out, _ = run(capsys, "export", plans[0], "--to", target, "-o", dest, "--format", "json")
    d = json.loads(out)
    assert code == 0 and d["target"] == target and dest.read_text() == d["text"] and d["notes"]


@pytest.mark.parametrize("what", ["plan", "hardware", "train", "constraints"])
def test_schema(capsys, what):
    code, out, _ = run(capsys, "schema", what)
    schema = json.loads(out)
    assert code == 0 and schema["type"] == "object" and schema["properties"]


# ------------------------------------------------------------------ why-not
def test_why_not_invalid_point_is_an_answer(capsys, plans):
    code, out, _ = run(capsys, "explain", plans[0], "--why-not", "tp=3")
    assert code == 0
    assert "cannot be built" in out and "tp(3) * pp(8) = 24 does not divide the 1024 devices" in out


def test_why_not_quotes_the_search_records(capsys, plans, monkeypatch):
    """The counterfactual is scored by the planner (stubbed here with a recorded-looking plan) and
    the search's own note about the point is quoted."""
    base = big_plan()
    terms = dict(base.predicted.time_breakdown_s, comm_dp=0.9, comm_tp=0.3)
    step = sum(terms.values())
    scored = base.model_copy(
        update={
            "predicted": base.predicted.model_copy(
                update={"time_breakdown_s": terms, "step_time_s": step}
            )
        }
    )
    seen = {}

    def fake_score(plan, knobs, graph=None):
        seen["knobs"] = knobs
        return scored

    monkeypatch.setattr(whynot, "score_knobs", fake_score)
    code, out, _ = run(capsys, "explain", plans[0], "--why-not", "tp=4")
    assert code == 0
    assert (seen["knobs"].tp, seen["knobs"].dp, seen["knobs"].num_micro_batches) == (4, 32, 48)
    assert "slower" in out and "exposed comm (dp)" in out and "+690 ms" in out
    assert "alternative #1" in out
    code, out, _ = run(capsys, "explain", plans[0], "--why-not", "tp=4", "--format", "json")
    d = json.loads(out)["why_not"]
    assert "alternative #1 (12.1 s/step" in d["records"][0] and "halves NVLink" in d["records"][0]
    assert d["verdict"] == "slower" and d["terms"][-1]["delta_s"] == pytest.approx(
        step - base.predicted.step_time_s
    )


def test_why_not_memory_verdict(capsys, plans, monkeypatch):
    base = big_plan()
    over = base.model_copy(
        update={
            "predicted": base.predicted.model_copy(
                update={"peak_memory_bytes": 97 * GIB, "fits": False, "worst_rank_stage": 2}
            )
        }
    )
    monkeypatch.setattr(whynot, "score_knobs", lambda plan, knobs, graph=None: over)
    code, out, _ = run(capsys, "explain", plans[0], "--why-not", "ckpt=none")
    assert code == 0 and "does not fit" in out
    code, out, _ = run(capsys, "explain", plans[0], "--why-not", "ckpt=none", "--format", "json")
    reason = json.loads(out)["why_not"]["reason"]
    assert "needs 97.0 GiB but has 80.0 GiB (over by 17.0 GiB)" in reason and "pp stage 2" in reason


def test_why_not_whole_plan_file_uses_its_recorded_prediction(capsys, plans, tmp_path):
    other = tmp_path / "alt.yaml"
    p = big_plan()
    p.model_copy(
        update={"predicted": p.predicted.model_copy(update={"step_time_s": 20.0})}
    ).to_file(other)
    code, out, _ = run(capsys, "explain", plans[0], "--why-not", other)
    assert code == 0 and "slower" in out and "20 s vs 11.3 s" in out


def test_why_not_same_point(capsys, plans):
    code, out, _ = run(capsys, "explain", plans[0], "--why-not", "tp=8", "--why-not", "zero=1")
    assert code == 0 and "the same" in out


def test_why_not_with_the_real_planner(capsys, tmp_path):
    """End to end with the planner's own model: a real plan for gpt-tiny on 4 CPU processes
    (plan_from_knobs), asked about ZeRO-3 and about a tp that does not divide the heads."""
    api = pytest.importorskip("planner.api")
    from specs import HardwareSpec, Knobs, TrainSpec

    graph = api.trace_model("gpt-tiny", None)
    knobs = Knobs(pp=2, dp=2, tp=1, micro_batch_size=2, num_micro_batches=4, schedule="1f1b")
    plan = api.plan_from_knobs(
        graph,
        HardwareSpec.preset("cpu", devices=4),
        TrainSpec(global_batch_size=16, precision="fp32"),
        knobs,
    )
    path = tmp_path / "p.yaml"
    plan.to_file(path)
    code, out, err = run(capsys, "explain", path)
    assert code == 0 and "rank 1 |" in out and max(len(ln) for ln in out.splitlines()) <= 100
    code, out, err = run(capsys, "explain", path, "--why-not", "zero=3", "--format", "json")
    assert code == 0, err
    d = json.loads(out)["why_not"]
    assert d["knobs"].startswith("dp=2 tp=1 pp=2 zero=3")
    assert d["verdict"] in ("slower", "faster", "same", "does_not_fit")
    terms = d["terms"]
    assert sum(r["other_s"] for r in terms[:-1]) == pytest.approx(terms[-1]["other_s"], rel=1e-6)
    assert terms[-1]["plan_s"] == pytest.approx(plan.predicted.step_time_s)


# ------------------------------------------------------------------ errors: exit 2, one message
def _err(capsys, *argv) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert "Traceback" not in err and err.count("\n") <= 4, err
    return err


def test_bad_pin_names_knob_and_allowed_values(capsys):
    err = _err(capsys, "plan", "gpt-tiny", "--hw", "cpu:4", "--pin", "zero=7")
    assert "knob zero" in err and "none, zero1, zero2, zero3, hsdp" in err
    err = _err(capsys, "plan", "gpt-tiny", "--hw", "cpu:4", "--pin", "tensor=2")
    assert "unknown knob 'tensor'" in err


def test_unknown_model_lists_bundled(capsys):
    pytest.importorskip("planner.api")
    err = _err(capsys, "plan", "gpt-9000", "--hw", "cpu:4")
    assert "unknown model 'gpt-9000'" in err and "gpt-tiny" in err and "llama3-8b" in err


def test_unknown_hardware(capsys):
    err = _err(capsys, "plan", "gpt-tiny", "--hw", "tpu-v9:8")
    assert "unknown hardware preset 'tpu-v9'" in err and "dgx-a100-80gb" in err


def test_plan_file_errors(capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    assert "file not found" in _err(capsys, "explain", missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("mesh: {pp: 2\n  dp: [\n")
    assert "malformed YAML" in _err(capsys, "explain", bad)
    old = tmp_path / "old.yaml"
    data = big_plan().model_dump(mode="json")
    data["version"] = PLAN_VERSION + 1
    old.write_text(json.dumps(data))
    err = _err(capsys, "explain", old)
    assert f"format version {PLAN_VERSION + 1}" in err and "Re-create the plan" in err
    broken = tmp_path / "broken.json"
    data = big_plan().model_dump(mode="json")
    data["mesh"]["tp"] = 4
    broken.write_text(json.dumps(data))
    assert "tp(4) * pp(8) * dp(16) = 512" in _err(capsys, "explain", broken)
    binary = tmp_path / "plan.yaml"
    binary.write_bytes(b"\x00\xff\xfe\x00garbage")
    assert "not a text file" in _err(capsys, "compare", binary, binary)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    assert "must be a mapping" in _err(capsys, "export", listy, "--to", "megatron")


def test_why_not_errors(capsys, plans, tmp_path):
    assert "unknown knob 'bogus'" in _err(capsys, "explain", plans[0], "--why-not", "bogus=1")
    assert "not both" in _err(
        capsys, "explain", plans[0], "--why-not", "tp=4", "--why-not", plans[1]
    )


def test_picture_needs_png_or_svg(capsys, plans, tmp_path):
    err = _err(capsys, "explain", plans[1], "--picture", tmp_path / "t.gif")
    assert ".png or .svg" in err or "no timeline" in err


def test_console_script_exit_code_and_message(tmp_path):
    """Through a real process: exit status 2 and no traceback."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bad = tmp_path / "p.yaml"
    bad.write_text("version: 99\n")
    proc = subprocess.run(
        [sys.executable, "-m", "planner.cli", "explain", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "format version 99" in proc.stderr and "Traceback" not in proc.stderr


def test_trace(capsys):
    pytest.importorskip("planner.trace_report")
    code, out, _ = run(capsys, "trace", "gpt-tiny")
    assert code == 0 and "TransformerBlock" in out
    assert max(len(ln) for ln in out.splitlines()) <= 100
    code, out, _ = run(capsys, "trace", "gpt-tiny", "--format", "json")
    graph = json.loads(out)
    assert code == 0 and len(graph["blocks"]) == 6 and graph["num_params"] > 0


def test_trace_unknown_model(capsys):
    err = _err(capsys, "trace", "gpt-9000")
    assert "unknown model 'gpt-9000'" in err and "gpt-tiny" in err


def test_plan_command_end_to_end(capsys, tmp_path):
    """`autoplan plan` with the real planner: writes a plan that `explain` reads back; pins hold."""
    pytest.importorskip("planner.api")
    out_file = tmp_path / "tiny.yaml"
    argv = [
        "plan",
        "gpt-tiny",
        "--hw",
        "cpu:4",
        "--batch",
        "16",
        "--precision",
        "fp32",
        "--pin",
        "pp=2",
        "--pin",
        "zero=0",
        "-o",
        out_file,
    ]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert max(len(ln) for ln in out.splitlines()) <= 100
    assert "pp=2" in out and "zero=0" in out and "Why: where the step time goes" in out
    assert "rank 1 |" in out  # a pipeline, so a timeline
    from specs import Plan

    plan = Plan.from_file(out_file)
    assert (
        plan.mesh.pp == 2
        and plan.data_parallel.sharding == "none"
        and plan.model.name == "gpt-tiny"
    )
    assert plan.predicted is not None and plan.train.global_batch_size == 16
    code, out, _ = run(capsys, "explain", out_file, "--format", "json")
    assert json.loads(out)["explain"]["plan"] == str(plan)
    code, out, _ = run(capsys, *argv[:-2], "--format", "json")
    d = json.loads(out)
    assert (
        code == 0 and d["plan"]["mesh"]["pp"] == 2 and d["explain"]["predicted"]["step_time_s"] > 0
    )


@pytest.mark.tier1
def test_console_script_finds_a_model_module_in_the_current_folder(tmp_path):
    """`autoplan plan mymodel:build` from the folder holding mymodel.py, without PYTHONPATH=."""
    script = Path(sys.executable).with_name("autoplan")
    if not script.exists():
        pytest.skip("the autoplan console script is not installed in this environment")
    (tmp_path / "mymodel.py").write_text(
        "import torch\n"
        "from torch import nn\n\n"
        "def build():\n"
        "    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))\n"
        "    return model, (torch.zeros(2, 8),)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(script), "plan", "mymodel:build", "--hw", "cpu:2", "--batch", "4",
                          "--format", "json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["plan"]["mesh"]["dp"] in (1, 2)
