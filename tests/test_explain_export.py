"""Exporters: DeepSpeed JSON (validated by DeepSpeed's own config parser), torchtitan TOML,
Megatron-LM arguments, each with notes for the knobs the target cannot express."""

from __future__ import annotations

import json

import pytest

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli", reason="needs tomllib (3.11+) or tomli to read TOML")

from planner.explain.export import export_plan
from specs import DataParallel, SpecError
from tests.explain_sample import big_plan, small_plan


def _deepspeed_config(cfg: dict, dp: int):
    """Feed a config dict to DeepSpeed's DeepSpeedConfig as a dp-rank data-parallel job."""
    ds_config = pytest.importorskip("deepspeed.runtime.config", reason="deepspeed is not installed")

    class MPU:  # what Megatron-style code hands DeepSpeed: the data-parallel world size
        def get_data_parallel_world_size(self):
            return dp

        def get_data_parallel_rank(self):
            return 0

        def get_model_parallel_world_size(self):
            return 1

        def get_model_parallel_rank(self):
            return 0

    orig = ds_config.dist.get_rank
    ds_config.dist.get_rank = lambda *a, **k: 0  # no process group in a unit test
    try:
        return ds_config.DeepSpeedConfig(cfg, mpu=MPU())
    finally:
        ds_config.dist.get_rank = orig


def test_deepspeed_export_passes_deepspeeds_parser():
    plan = big_plan()
    ex = export_plan(plan, "deepspeed")
    cfg = json.loads(ex.text)
    assert cfg == ex.config
    assert cfg["train_batch_size"] == 1536
    assert cfg["train_micro_batch_size_per_gpu"] == 1 and cfg["gradient_accumulation_steps"] == 96
    assert cfg["zero_optimization"]["stage"] == 1 and cfg["bf16"] == {"enabled": True}
    ds = _deepspeed_config(cfg, dp=plan.mesh.dp)
    assert ds.train_batch_size == 1536 and ds.gradient_accumulation_steps == 96
    assert ds.zero_optimization_stage == 1 and ds.bfloat16_config.enabled
    assert ds.tensor_parallel_config.autotp_size == 8
    # what DeepSpeed cannot say is said in notes
    joined = " ".join(ex.notes)
    for needle in (
        "pp=8",
        "interleaved_1f1b",
        "sequence_parallel",
        "recompute selective",
        "AutoTP",
    ):
        assert needle in joined, needle


def test_deepspeed_zero3_offload_fp16():
    plan = small_plan()
    plan = plan.model_copy(
        update={
            "data_parallel": DataParallel(sharding="zero3", offload="cpu"),
            "train": plan.train.model_copy(update={"precision": "fp16"}),
        }
    )
    ex = export_plan(plan, "deepspeed")
    cfg = ex.config
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["fp16"]["enabled"] is True and "bf16" not in cfg
    ds = _deepspeed_config(cfg, dp=2)
    assert ds.zero_optimization_stage == 3 and ds.float16_config.enabled
    assert ds.zero_config.offload_optimizer.device == "cpu"


def test_deepspeed_rejects_a_wrong_batch_so_the_check_is_real():
    cfg = dict(export_plan(big_plan(), "deepspeed").config)
    cfg["train_batch_size"] = 1535
    with pytest.raises(AssertionError):
        _deepspeed_config(cfg, dp=16)


def test_torchtitan_toml():
    ex = export_plan(big_plan(), "torchtitan")
    doc = tomllib.loads(ex.text)
    par = doc["parallelism"]
    assert par["tensor_parallel_degree"] == 8 and par["pipeline_parallel_degree"] == 8
    assert par["data_parallel_shard_degree"] == 16 and par["data_parallel_replicate_degree"] == 1
    assert par["pipeline_parallel_schedule"] == "Interleaved1F1B"
    assert par["pipeline_parallel_microbatch_size"] == 1
    assert (
        len(par["pipeline_parallel_split_points"]) == 15
        and par["pipeline_parallel_split_points"][0] == "layers.5"
    )
    assert par["disable_loss_parallel"] is False
    assert doc["activation_checkpoint"]["mode"] == "selective"
    assert (
        doc["training"]["global_batch_size"] == 1536 and doc["training"]["local_batch_size"] == 96
    )
    assert any("zero1" in n for n in ex.notes)
    assert all(f"# NOTE: {n}" in ex.text for n in ex.notes)


def test_torchtitan_ddp_and_hsdp():
    plan = small_plan()
    par = tomllib.loads(export_plan(plan, "torchtitan").text)["parallelism"]
    assert (par["data_parallel_replicate_degree"], par["data_parallel_shard_degree"]) == (2, 1)
    assert par["pipeline_parallel_schedule"] == "1F1B"
    big = big_plan()
    hsdp = big.model_copy(
        update={"data_parallel": DataParallel(sharding="hsdp", hsdp_shard_size=4)}
    )
    par = tomllib.loads(export_plan(hsdp, "torchtitan").text)["parallelism"]
    assert (par["data_parallel_replicate_degree"], par["data_parallel_shard_degree"]) == (4, 4)


def test_megatron_args():
    ex = export_plan(big_plan(), "megatron")
    args = ex.config

    def val(flag):
        return args[args.index(flag) + 1]

    assert (
        val("--tensor-model-parallel-size") == "8" and val("--pipeline-model-parallel-size") == "8"
    )
    # 96 transformer layers over pp(8) * v(2) = 16 chunks
    assert val("--num-layers-per-virtual-pipeline-stage") == "6"
    assert val("--micro-batch-size") == "1" and val("--global-batch-size") == "1536"
    assert val("--recompute-granularity") == "selective"
    assert (
        "--sequence-parallel" in args and "--use-distributed-optimizer" in args and "--bf16" in args
    )
    assert ex.text.startswith("# autoplan export of:") and "MEGATRON_ARGS=(" in ex.text
    assert any("uneven" in n for n in ex.notes)  # 98 blocks in 16 stages are not all the same size


def test_megatron_notes_for_what_it_cannot_express():
    plan = small_plan()
    gp = plan.model_copy(
        update={
            "pipeline": plan.pipeline.model_copy(update={"schedule": "gpipe"}),
            "data_parallel": DataParallel(sharding="hsdp", hsdp_shard_size=2),
        }
    )
    ex = export_plan(gp, "megatron")
    joined = " ".join(ex.notes)
    assert "gpipe" in joined and "hsdp" in joined
    assert "--fp16" not in ex.config and "--bf16" not in ex.config  # fp32 plan


def test_unknown_target():
    with pytest.raises(SpecError, match="deepspeed, torchtitan, megatron"):
        export_plan(small_plan(), "colossalai")
