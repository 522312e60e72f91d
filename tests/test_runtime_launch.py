"""Tier 3: the `runtime.launch` entry point end to end (torchrun on CPU/gloo).

- checkpoint / resume: 2 steps under one plan (ZeRO-3), then resume under another (TP=2):
  steps 3-4 must equal an uninterrupted 4-step run (DCP re-shards model and optimizer, the
  data position and RNG come back);
- multi-node: two torchrun invocations (2 "nodes" x 2 processes, c10d rendezvous on
  127.0.0.1) train as one job and match one process with the same global batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runtime_plans import make_plan

ROOT = Path(__file__).resolve().parents[1]
# no xdist group: each test makes its own runs, so the two workers can share them
pytestmark = [pytest.mark.tier3, pytest.mark.slow]


def _torchrun(nproc: int, args: list[str], *, extra: list[str] | None = None, wait: bool = True):
    launcher = extra or ["--standalone"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc-per-node={nproc}",
           "-m", "runtime.launch", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


def test_resume_under_another_plan_continues_exactly(tmp_path):
    zero3, tp2 = tmp_path / "zero3.yaml", tmp_path / "tp2.yaml"
    make_plan("gpt-tiny", dp=2, sharding="zero3").to_file(zero3)
    make_plan("gpt-tiny", tp=2, tp_styles="gpt").to_file(tp2)
    common = ["--model", "gpt-tiny", "--dtype", "float64", "--lr", "1e-2"]
    _torchrun(2, [str(zero3), *common, "--steps", "4", "--log-file", str(tmp_path / "straight.jsonl")])
    ck = tmp_path / "ck"
    _torchrun(2, [str(zero3), *common, "--steps", "2", "--checkpoint-dir", str(ck),
                  "--log-file", str(tmp_path / "first.jsonl")])
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000002"]  # renamed from .tmp: complete
    out = _torchrun(2, [str(tp2), *common, "--steps", "4", "--checkpoint-dir", str(ck), "--resume",
                        "--log-file", str(tmp_path / "resumed.jsonl")])
    assert "resumed from" in out.stdout and "at step 2" in out.stdout
    straight, resumed = _losses(tmp_path / "straight.jsonl"), _losses(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert abs(resumed[step] - straight[step]) <= 1e-6 * straight[step], (straight, resumed)
    assert straight[4] != straight[2]  # training moved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_train_as_one_job(tmp_path):
    plan4, plan1 = tmp_path / "dp4.yaml", tmp_path / "dp1.yaml"
    make_plan("gpt-tiny", dp=4, sharding="zero2").to_file(plan4)
    make_plan("gpt-tiny").to_file(plan1)
    common = ["--model", "gpt-tiny", "--dtype", "float64", "--lr", "1e-2", "--steps", "3"]
    port = _free_port()
    rdzv = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=twonodes"]
    log = tmp_path / "multi.jsonl"
    nodes = [_torchrun(2, [str(plan4), *common, "--log-file", str(log)], extra=[*rdzv, f"--node-rank={i}"],
                       wait=False) for i in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-4000:]
    _torchrun(1, [str(plan1), *common, "--log-file", str(tmp_path / "one.jsonl")])
    multi, one = _losses(log), _losses(tmp_path / "one.jsonl")
    assert sorted(multi) == [1, 2, 3]  # only global rank 0 logs: one job, not two
    for step in (1, 2, 3):  # lm_loss reduces in float32: compare to float32 round-off
        assert abs(multi[step] - one[step]) <= 1e-6 * one[step], (multi, one)


def test_autoplan_plan_runs_with_its_fingerprint_checked(tmp_path):
    """A plan from the planner's search (not hand-written) runs, and its fingerprint is verified."""
    from planner import autoplan
    from planner.models import build_model
    from specs import Constraints, HardwareSpec, TrainSpec

    built = build_model("gpt-tiny", device="meta")
    plan = autoplan(built.module, HardwareSpec.preset("cpu", devices=2), example_inputs=built.example_inputs,
                    train=TrainSpec(global_batch_size=8, precision="fp32"),
                    constraints=Constraints(dp=2, tp=1, pp=1, sharding="zero3"))
    path = tmp_path / "auto.yaml"
    plan.to_file(path)
    out = _torchrun(2, [str(path), "--model", "gpt-tiny", "--steps", "2"])
    assert "fingerprint not checked" not in out.stdout
    assert '"step": 2' in out.stdout


def test_zero_bubble_pipeline_passes_the_nonfinite_guard(tmp_path):
    """torch's schedule computes a loss on uninitialised buffers while it sets its stages up; the
    guard once read that NaN as step 1's and stopped a healthy run (`make demo`'s pp4 zero_bubble
    plan for gpt-small)."""
    plan = tmp_path / "zb.yaml"
    make_plan("gpt-tiny", pp=2, schedule="zero_bubble", num_micro_batches=2).to_file(plan)
    out = _torchrun(2, [str(plan), "--model", "gpt-tiny", "--steps", "2", "--log-file", str(tmp_path / "zb.jsonl")])
    assert "non-finite" not in out.stderr
    assert sorted(_losses(tmp_path / "zb.jsonl")) == [1, 2]
