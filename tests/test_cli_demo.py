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


def _console() -> Console:
    return Console(width=200, file=io.StringIO(), highlight=False)


@pytest.mark.tier1
def test_this_host_calibrates_once_then_uses_the_cache(tmp_path, monkeypatch):
    import yaml

    import specs.hardware as hwmod

    monkeypatch.setenv("AUTOPLAN_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_calibrate(con, nproc):  # what `python -m runtime.calibrate --local` leaves behind
        calls.append(nproc)
        data = yaml.safe_load((ROOT / "specs" / "presets" / "cpu.yaml").read_text())
        hwmod.local_spec_path().parent.mkdir(parents=True)
        hwmod.local_spec_path().write_text(yaml.safe_dump({**data, "name": "local"}))

    monkeypatch.setattr(demo, "calibrate_this_host", fake_calibrate)
    con = _console()
    hw = demo.this_host(con, 4)
    assert hw.name == "local" and hw.devices_per_node == 4 and calls == [4]
    assert demo.this_host(con, 4).name == "local" and calls == [4]  # cached: no second calibration
    assert "note:" not in con.file.getvalue()


@pytest.mark.tier1
def test_shipped_preset_on_another_host_says_so(monkeypatch):
    import specs.hardware as hwmod

    monkeypatch.setattr(hwmod, "host_key", lambda: "amd-epyc-9654-96cores-torch2.12.0")
    con = _console()
    hw = demo.this_host(con, 4, "cpu")
    out = con.file.getvalue()
    assert hw.name == "cpu"
    assert out.count("note: the 'cpu' preset was calibrated on another host") == 1
    assert "--hw local" in out


@pytest.mark.tier1
def test_failed_calibration_falls_back_to_the_shipped_preset_with_the_note(tmp_path, monkeypatch):
    import specs.hardware as hwmod

    monkeypatch.setenv("AUTOPLAN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hwmod, "host_key", lambda: "elsewhere-2cores-torch2.12.0")

    def broken(con, nproc):
        raise RuntimeError("`-m runtime.calibrate --local --nproc 4` exited with 1: boom")

    monkeypatch.setattr(demo, "calibrate_this_host", broken)
    con = _console()
    assert demo.this_host(con, 4).name == "cpu"
    out = con.file.getvalue()
    assert "could not calibrate this host" in out and "boom" in out and "note: the 'cpu' preset" in out


@pytest.mark.slow
@pytest.mark.tier3
def test_demo_tiny_run_under_torchrun(tmp_path):
    """Part 3 of `make demo` for real: plan gpt-small for 4 CPU processes on the shipped cpu preset
    (no calibration: tests/test_local_host.py times that), torchrun it 2 steps."""
    pytest.importorskip("runtime.launch")
    con = Console(width=100, file=io.StringIO(), highlight=False)
    import planner.demo as d

    orig = d.make_console
    d.make_console = lambda width=None: con
    try:
        code = d.main(["--only", "tiny", "--steps", "2", "--hw", "cpu", "--out", str(tmp_path)])
    finally:
        d.make_console = orig
    out = con.file.getvalue()
    assert code == 0, out
    assert "measured/predicted" in out and "training steps" in out
    assert len((tmp_path / "train-log.jsonl").read_text().splitlines()) == 2
