"""Tier 1: the published-runs table of benchmarks/fidelity_published.py is well formed, and two small
rows predict without error (the full comparison is the benchmark script's job)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import fidelity_published as fp  # noqa: E402


@pytest.mark.parametrize("run", fp.RUNS, ids=lambda r: r.name)
def test_row_is_well_formed(run):
    assert run.source.strip() and any(w in run.source for w in ("Table", "sec.")), run.source
    assert run.tp * run.pp * run.dp * run.cp == run.num_gpus, (run.tp, run.pp, run.dp, run.cp, run.num_gpus)
    assert run.num_gpus % 8 == 0
    assert run.global_batch % (run.dp * run.micro_batch) == 0
    assert run.num_micro_batches >= 1
    even = run.model.num_layers % (run.pp * run.virtual_stages) == 0
    assert even or any("even split" in f for f in run.flags), "uneven layers per stage must be flagged"
    if run.virtual_stages > 1:
        assert run.schedule == "interleaved_1f1b"
    if run.sequence_parallel:
        assert run.tp > 1
    assert run.model.num_heads % run.tp == 0 and run.model.vocab_size % run.tp == 0
    assert run.measured > 0 and run.measured_step_time_s() > 0
    mfu = run.model_flops_per_step() / (run.measured_step_time_s() * run.num_gpus
                                        * fp.build_hardware(run.hardware, run.num_gpus).device.peak_flops_per_s["bf16"])
    assert 0.05 < mfu < 0.75, mfu
    run.knobs()  # validates as a Knobs value


def test_names_unique_and_split():
    names = [r.name for r in fp.RUNS]
    assert len(names) == len(set(names))
    assert any(r.held_out for r in fp.RUNS) and any(not r.held_out for r in fp.RUNS)


def test_korthikanti_times_reproduce_readme_mfu():
    """Eq. 7 over Table 5's present-work times gives the MFUs the Megatron-LM README states."""
    readme_mfu = {"22B": 0.415, "175B": 0.514, "530B": 0.560, "1T": 0.563}
    for run in fp.KORTHIKANTI_T5:
        if not run.name.endswith("selective-sp"):
            continue
        size = run.name.split("-")[1]
        mfu = run.model_flops_per_step() / (run.measured * run.num_gpus * 312e12)
        assert abs(mfu - readme_mfu[size]) < 0.005, (size, mfu)


def test_megatron_stages_layout():
    st = fp.megatron_stages(8, 10, pp=2, v=2, recompute="full")
    assert st == [(0, 2, "full"), (3, 4, "full"), (5, 6, "full"), (7, 9, "full")]
    assert fp.megatron_stages(7, 9, pp=2, v=1, recompute="full") is None


def test_statistics():
    assert fp.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert fp.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(fp.spearman([1, 2], [1, 2]))
    assert fp.percentile([0, 10], 90) == pytest.approx(9.0)


def test_two_small_rows_predict():
    pred = fp.Predictor()
    for name in ("narayanan21-t1-1.7B", "korthikanti22-22B-selective-sp"):
        run = next(r for r in fp.RUNS if r.name == name)
        out = pred.predict(run)
        assert "error" in out, out
        assert out["predicted_step_s"] > 0 and math.isfinite(out["error"])
        assert 0 < out["predicted_mfu"] < 1
