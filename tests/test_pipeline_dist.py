"""Tier 3: every pipeline schedule on 2 and 4 stages (plus PP x DP, checkpointing, and Hugging Face
models split by torch.export with their rotary tables and masks carried stage to stage) matches one
process. One torchrun launch per world size runs all cases of tests/dist_pipeline_cases.py; each
case is asserted here separately."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.dist_pipeline_cases import cases

# one xdist group per launch: each world size's module fixture runs on one worker, and the two
# launches can run on different workers
pytestmark = pytest.mark.tier3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-10  # float64; measured differences are <= 5e-14


def _launch(world: int, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp(f"pp{world}") / "results.json"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", f"--nproc-per-node={world}",
           os.path.join(ROOT, "tests", "dist_pipeline_cases.py"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"torchrun ({world} procs) failed, rc={proc.returncode}:\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def results2(tmp_path_factory):
    return _launch(2, tmp_path_factory)


@pytest.fixture(scope="module")
def results4(tmp_path_factory):
    return _launch(4, tmp_path_factory)


def _check(case, rec):
    errors = [r["error"] for r in rec["ranks"] if r and "error" in r]
    assert not errors, errors[0]
    ranks = rec["ranks"]
    if case.bad:
        assert all(r["raised"] == "SpecError" for r in ranks), ranks
        return
    if not case.sync_tied:
        # Negative control: without summing the tied embedding/head gradients the run diverges,
        # so the comparison below can fail.
        assert rec["param_diff"] > 1e-6, rec
        return
    assert all(r["compared"] > 0 for r in ranks)
    # Every parameter moved far more than the tolerance: a match is not vacuous.
    assert min(r["param_change"] for r in ranks) > 1e-3
    assert rec["loss_diff"] < TOL, (rec["ranks"][0]["losses"], rec["ranks"][0]["ref_losses"])
    assert rec["param_diff"] < TOL, rec
    if case.model in ("gpt", "hf_gpt2"):
        assert all(r["tied"] for r in ranks), "gpt ties embed.tok.weight and head.lm_head.weight"
    if case.model == "hf_llama":
        assert not any(r["tied"] for r in ranks), "the small Llama config unties embed_tokens and lm_head"
    if case.checkpoint:
        # Each local block's attention runs forward twice per micro-batch (forward +
        # recomputation in backward); without checkpointing it would be once (plus one
        # shape-inference forward at the first step).
        steps = len(ranks[0]["losses"])
        for r in ranks:
            assert r["softmax_calls"] >= 2 * r["blocks_local"] * case.num_micro_batches * steps, r


@pytest.mark.xdist_group("pipeline2")
@pytest.mark.parametrize("case", cases(2), ids=lambda c: c.name)
def test_pipeline_2_procs(case, results2):
    _check(case, results2[case.name])


@pytest.mark.xdist_group("pipeline4")
@pytest.mark.parametrize("case", cases(4), ids=lambda c: c.name)
def test_pipeline_4_procs(case, results4):
    _check(case, results4[case.name])
