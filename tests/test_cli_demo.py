"""`make demo` (planner.demo): its report of a run, and the whole demo as a slow multi-process test."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from planner import demo
from tests.explain_sample import small_plan

ROOT = Path(__file__).resolve().parents[1]


def test_report_run_compares_measured_and_predicted(tmp_path):
    log = tmp_path / "log.jsonl"
    recs = [
        {"step": i + 1, "loss": 4.0 - 0.1 * i, "step_time_s": t, "peak_memory_bytes": 2**30}
        for i, t in enumerate([0.5, 0.034, 0.030, 0.040])
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    con = Console(width=100, file=io.StringIO(), highlight=False)
    plan = small_plan()  # predicts 17 ms per step
    demo.report_run(con, plan, log)
    out = con.file.getvalue()
    # the first step (start-up) is left out of the median: median(34, 30, 40) = 34 ms = 2.00 x 17 ms
    assert "measured 34.0 ms" in out and "predicted 17.0 ms" in out and "= 2.00" in out
    assert "3.7000" in out and "1024 MiB" in out


def test_report_run_without_steps_fails(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("")
    with pytest.raises(RuntimeError, match="wrote no steps"):
        demo.report_run(Console(file=io.StringIO()), small_plan(), log)


def test_parts_skip_with_a_reason_when_a_piece_is_missing(monkeypatch):
    con = Console(width=100, file=io.StringIO(), highlight=False)
    monkeypatch.setattr(demo, "make_console", lambda width=None: con)

    def missing(con, args):
        raise demo.Skip("runtime.launch is not in this build yet")

    monkeypatch.setitem(demo.PARTS, "tiny", ("3. tiny", missing))
    assert demo.main(["--only", "tiny"]) == 0
    assert "skipped: runtime.launch is not in this build yet" in con.file.getvalue()


@pytest.mark.slow
@pytest.mark.tier3
def test_demo_tiny_run_under_torchrun(tmp_path):
    """Part 3 of `make demo` for real: plan gpt-tiny for 4 CPU processes, torchrun it 2 steps."""
    pytest.importorskip("runtime.launch")
    con = Console(width=100, file=io.StringIO(), highlight=False)
    import planner.demo as d

    orig = d.make_console
    d.make_console = lambda width=None: con
    try:
        code = d.main(["--only", "tiny", "--steps", "2", "--out", str(tmp_path)])
    finally:
        d.make_console = orig
    out = con.file.getvalue()
    assert code == 0, out
    assert "measured/predicted" in out and "training steps" in out
    assert len((tmp_path / "train-log.jsonl").read_text().splitlines()) == 2
