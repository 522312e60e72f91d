"""Bad input to the runtime: one clear SpecError each, raised before any process group exists
(these checks are pure: no torch.distributed initialisation)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from planner.models import build_model
from runtime.data_parallel import validate_data_parallel
from runtime.mesh import mesh_shape, validate_world
from runtime.parallelize import validate_model
from runtime.tensor_parallel import resolve_styles
from specs import SpecError
from tests.runtime_plans import make_plan

ROOT = Path(__file__).resolve().parents[1]


def _meta(name: str):
    return build_model(name, device="meta")


def test_world_size_mismatch_names_both_numbers():
    plan = make_plan("gpt-tiny", dp=2, tp=2, tp_styles="gpt")
    with pytest.raises(SpecError, match=r"pp\(1\) \* dp\(2\) \* tp\(2\) = 4 processes, but 2 were launched"):
        validate_world(plan, 2)
    validate_world(plan, 4)


def test_mesh_axes_tp_innermost_and_hsdp_split():
    assert mesh_shape(make_plan("gpt-tiny", dp=2, tp=2, tp_styles="gpt")) == ((1, 2, 2), ("pp", "dp", "tp"))
    plan = make_plan("gpt-tiny", dp=4, sharding="hsdp", hsdp_shard_size=2)
    assert mesh_shape(plan) == ((1, 2, 2, 1), ("pp", "dp_replicate", "dp_shard", "tp"))


def test_unknown_module_in_styles():
    plan = make_plan("gpt-tiny", tp=2, tp_styles="llama")  # gpt has no gate_proj
    with pytest.raises(SpecError, match=r"pattern 'layers\.\*\.mlp\.gate_proj' matches no module"):
        validate_model(_meta("gpt-tiny").module, plan)


def test_style_on_wrong_module_type():
    data = make_plan("gpt-tiny", tp=2).model_dump(mode="json")
    data["tensor_parallel"]["styles"] = {"layers.*.attn_norm": "colwise"}
    from specs import Plan

    with pytest.raises(SpecError, match=r"colwise needs an nn.Linear, layers.0.attn_norm is a LayerNorm"):
        resolve_styles(_meta("gpt-tiny").module, Plan.from_dict(data))


def test_tp_must_divide_kv_heads():
    plan = make_plan("llama-tiny", tp=4, tp_styles="llama")  # 2 key/value heads
    with pytest.raises(SpecError, match=r"colwise splits 2 attention heads .* over tp=4"):
        validate_model(_meta("llama-tiny").module, plan)


def test_block_names_from_another_model():
    plan = make_plan("gpt-tiny")
    with pytest.raises(SpecError, match=r"model.block_names: .* not found in the model"):
        validate_model(_meta("resnet18").module, plan)


def test_fingerprint_mismatch_is_refused():
    pytest.importorskip("planner", reason="planner.trace")
    from planner import trace

    built = build_model("gpt-tiny", device="meta")
    good = trace(built.module, built.example_inputs).fingerprint
    ok = make_plan("gpt-tiny", fingerprint=good)
    assert validate_model(built.module, ok, built.example_inputs) == []
    bad = make_plan("gpt-tiny", fingerprint="0" * 32)
    with pytest.raises(SpecError, match=r"model.fingerprint: the plan was made for a model with fingerprint 0+"):
        validate_model(built.module, bad, built.example_inputs)


def test_stages_not_covering_the_model():
    data = make_plan("gpt-tiny", pp=2, num_micro_batches=2).model_dump(mode="json")
    data["pipeline"]["stages"][1]["last"] -= 1  # the last block is left out
    from specs import Plan

    with pytest.raises(SpecError, match=r"pipeline.stages: cover blocks 0..4, but the model has 6 blocks"):
        Plan.from_dict(data)


def test_zero1_with_tp_and_offload_without_fsdp():
    with pytest.raises(SpecError, match="zero1 .* use zero2"):
        validate_data_parallel(make_plan("gpt-tiny", dp=2, tp=2, sharding="zero1", tp_styles="gpt"))
    with pytest.raises(SpecError, match="cpu offload runs through FSDP2"):
        validate_data_parallel(make_plan("gpt-tiny", dp=2, offload="cpu"))


def test_launch_refuses_world_mismatch_before_any_collective(tmp_path):
    """No torchrun: WORLD_SIZE is 1, the plan wants 2. Exit code 2, one line, no hang."""
    plan = tmp_path / "plan.yaml"
    make_plan("gpt-tiny", dp=2).to_file(plan)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-m", "runtime.launch", str(plan), "--model", "gpt-tiny"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "needs pp(1) * dp(2) * tp(1) = 2 processes, but 1 were launched" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_tp_plan_without_styles_is_noted():
    """A plan with tp > 1 whose styles split nothing runs replicated: the runtime says so."""
    from planner.models import build_model
    from runtime.parallelize import validate_model
    from tests.runtime_plans import make_plan

    model = build_model("gpt-tiny", device="meta").module
    plan = make_plan("gpt-tiny", dp=1, tp=2, tp_styles="gpt")
    bare = plan.model_copy(update={"tensor_parallel": plan.tensor_parallel.model_copy(update={"styles": {}})})
    assert any("split nothing" in n for n in validate_model(model, bare))
    assert not any("split nothing" in n for n in validate_model(model, plan))
