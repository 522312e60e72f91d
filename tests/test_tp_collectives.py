"""Tier 3: the runtime issues the tensor-parallel collectives the cost model charges.

Column-parallel siblings that read one tensor (q, k, v; gate, up) share its Replicate DTensor
(runtime.tensor_parallel._SharedInputColwise), so a step all-reduces each shared input's
gradient once, as Megatron-LM does, instead of once per module (the runtime did 26 for gpt-tiny
and 30 for llama-tiny at tp=2 before; the model charges 18). Counted with the profiler over one
train_step (tests/tp_collectives_case.py, 2 processes); numerical equality of the same TP plans
against one process is tests/test_runtime_dist.py's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.tier3
def test_runtime_tp_collectives_match_the_cost_model(tmp_path):
    out = tmp_path / "counts.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "tp_collectives_case.py"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-4000:]
    counts = json.loads(out.read_text())
    assert set(counts) == {"gpt-tiny sp=False", "llama-tiny sp=False"}
    for name, c in counts.items():
        assert c["runtime"] == c["model"] > 0, (name, c)
