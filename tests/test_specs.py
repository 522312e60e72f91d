"""Tier 1: specs — presets, loaders, validation messages, plan round-trips."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specs import (
    Constraints,
    DataParallel,
    HardwareSpec,
    Mesh,
    ModelRef,
    Pipeline,
    Plan,
    Prediction,
    SpecError,
    Stage,
    StageTimes,
    TensorParallel,
    TrainSpec,
)

pytestmark = pytest.mark.tier1


def _plan(hw="dgx-a100-80gb:16", pp=2, dp=4, tp=2, blocks=6, mb=1, nmb=4, **kw) -> Plan:
    hw = HardwareSpec.load(hw)
    per = blocks // pp
    stages = [Stage(first=i * per, last=(i + 1) * per - 1 if i < pp - 1 else blocks - 1) for i in range(pp)]
    return Plan(
        model=ModelRef(name="m", fingerprint="abc", num_blocks=blocks),
        hardware=hw,
        train=TrainSpec(global_batch_size=mb * nmb * dp),
        mesh=Mesh(pp=pp, dp=dp, tp=tp),
        pipeline=Pipeline(micro_batch_size=mb, num_micro_batches=nmb, stages=stages),
        **kw,
    )


# ---------------------------------------------------------------- hardware
@pytest.mark.parametrize("name", ["dgx-a100-80gb", "dgx-h100-80gb", "dgx-h200", "cpu"])
def test_presets_load_and_cite_sources(name):
    hw = HardwareSpec.preset(name)
    assert hw.num_devices >= 1
    assert hw.sources, f"{name} has no sources"
    assert "device" in hw.sources
    assert hw.device.memory_bandwidth_bytes_per_s > 0


def test_a100_datasheet_numbers():
    hw = HardwareSpec.preset("dgx-a100-80gb", nodes=128)
    assert hw.num_devices == 1024
    assert hw.device.peak_flops_per_s["bf16"] == pytest.approx(312e12)
    assert hw.device.memory_bytes == 80 * 2**30
    assert hw.inter_node.bandwidth_bytes_per_s == pytest.approx(8 * 200e9 / 8)  # 8x200 Gb/s


@pytest.mark.parametrize(
    "ref,nodes,per_node",
    [("dgx-a100-80gb:16", 2, 8), ("dgx-a100-80gb:4", 1, 4), ("dgx-h100-80gb:2n", 2, 8), ("dgx-h200", 1, 8)],
)
def test_short_strings(ref, nodes, per_node):
    hw = HardwareSpec.load(ref)
    assert (hw.num_nodes, hw.devices_per_node) == (nodes, per_node)


def test_cpu_preset_divides_the_host_among_processes():
    one, four = HardwareSpec.preset("cpu", devices=1), HardwareSpec.preset("cpu", devices=4)
    assert four.devices_per_node == 4
    assert four.device.memory_bytes * 4 == pytest.approx(one.device.memory_bytes, rel=1e-6)
    # 2 cores shared by 4 processes: half the per-process peak of 2 processes
    two = HardwareSpec.preset("cpu", devices=2)
    assert four.device.peak_flops_per_s["fp32"] == pytest.approx(two.device.peak_flops_per_s["fp32"] / 2)


def test_unknown_preset_lists_known():
    with pytest.raises(SpecError, match="known presets: cpu, dgx-a100-80gb"):
        HardwareSpec.load("dgx-b900:8")


def test_partial_node_count_rejected():
    with pytest.raises(SpecError, match="not a whole number of 8-device nodes"):
        HardwareSpec.load("dgx-a100-80gb:12")


def test_hardware_file_roundtrip_and_errors(tmp_path):
    hw = HardwareSpec.preset("dgx-h100-80gb", nodes=4)
    p = tmp_path / "hw.yaml"
    hw.to_file(p)
    assert HardwareSpec.load(str(p)) == hw
    data = hw.model_dump(mode="json")
    data["device"]["memory_bytes"] = -1
    data["colour"] = "green"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(SpecError) as e:
        HardwareSpec.load(str(bad))
    msg = str(e.value)
    assert "device.memory_bytes" in msg and "greater than 0" in msg
    assert "colour: unknown key" in msg


def test_malformed_yaml_names_line(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("name: a\n  nodes: [1,\n")
    with pytest.raises(SpecError, match=r"malformed YAML at line \d+"):
        HardwareSpec.load(str(p))


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="malformed YAML"):
        HardwareSpec.load(str(p))


# ---------------------------------------------------------------- train / constraints
def test_trainspec_rejects_bad_values():
    with pytest.raises(ValueError, match="global_batch_size"):
        TrainSpec(global_batch_size=0)
    with pytest.raises(ValueError, match="precision"):
        TrainSpec(precision="fp8")


def test_constraints_pins_and_checks():
    c = Constraints(tp=8, sharding="zero1", schedule="interleaved_1f1b", virtual_stages=2)
    assert c.pins() == {"tp": 8, "sharding": "zero1", "schedule": "interleaved_1f1b", "virtual_stages": 2}
    with pytest.raises(ValueError, match="sequence_parallel: needs tp > 1"):
        Constraints(tp=1, sequence_parallel=True)
    with pytest.raises(ValueError, match="virtual_stages"):
        Constraints(schedule="gpipe", virtual_stages=2)
    with pytest.raises(ValueError, match="max_tp"):
        Constraints(tp=8, max_tp=4)


# ---------------------------------------------------------------- plan
def test_plan_prints_one_line():
    p = _plan()
    assert str(p) == "dp=4 tp=2 pp=2 zero=0 mb=1x4 sched=1f1b ckpt=none"
    assert "\n" not in p.summary()


def test_plan_mesh_arithmetic_message():
    with pytest.raises(SpecError, match=r"mesh: tp\(8\) \* pp\(4\) \* dp\(3\) = 96, but the hardware has 64 devices"):
        Plan.from_dict({**_plan().model_dump(), "hardware": HardwareSpec.load("dgx-a100-80gb:64").model_dump(),
                        "mesh": {"pp": 4, "dp": 3, "tp": 8}})


@pytest.mark.parametrize(
    "stages,match",
    [
        ([(0, 2), (4, 5)], "starts at block 4 but block 3 is next.*skips"),
        ([(0, 3), (3, 5)], "starts at block 3 but block 4 is next.*repeats"),
        ([(0, 2), (3, 4)], r"cover blocks 0..4, but the model has 6 blocks"),
        ([(0, 5)], r"pp\(2\) \* virtual_stages\(1\) = 2 stages expected, got 1"),
    ],
)
def test_plan_stage_coverage(stages, match):
    data = _plan().model_dump()
    data["pipeline"]["stages"] = [{"first": a, "last": b} for a, b in stages]
    with pytest.raises(SpecError, match=match):
        Plan.from_dict(data)


def test_plan_batch_arithmetic():
    data = _plan().model_dump()
    data["train"]["global_batch_size"] = 10
    with pytest.raises(SpecError, match=r"micro_batch_size\(1\) \* num_micro_batches\(4\) \* dp\(4\) = 16"):
        Plan.from_dict(data)


def test_plan_unknown_schedule_and_key():
    data = _plan().model_dump()
    data["pipeline"]["schedule"] = "2f2b"
    data["pipeline"]["colour"] = 1
    with pytest.raises(SpecError) as e:
        Plan.from_dict(data)
    assert "pipeline.schedule" in str(e.value) and "'gpipe'" in str(e.value)
    assert "pipeline.colour: unknown key" in str(e.value)


def test_plan_hsdp_and_sp_checks():
    with pytest.raises(SpecError, match="hsdp_shard_size"):
        Plan.from_dict({**_plan().model_dump(), "data_parallel": {"sharding": "hsdp"}})
    ok = _plan(data_parallel=DataParallel(sharding="hsdp", hsdp_shard_size=2))
    assert ok.knobs().sharding == "hsdp"
    with pytest.raises(SpecError, match="sequence_parallel: needs tp > 1"):
        Plan.from_dict({**_plan(tp=1, dp=8).model_dump(), "tensor_parallel": {"sequence_parallel": True}})


def test_plan_version_mismatch(tmp_path):
    p = tmp_path / "old.yaml"
    _plan().to_file(p)
    p.write_text(p.read_text().replace("version: 1", "version: 7"))
    with pytest.raises(SpecError, match="format version 7; this autoplan reads version 1"):
        Plan.from_file(p)


def test_corrupted_plan_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="must be a mapping.*corrupted"):
        Plan.from_file(p)


# ---------------------------------------------------------------- round trips (property based)
@st.composite
def plans(draw):
    tp = draw(st.sampled_from([1, 2, 4, 8]))
    pp = draw(st.sampled_from([1, 2, 4]))
    v = draw(st.sampled_from([1, 2])) if pp > 1 else 1
    dp = draw(st.sampled_from([1, 2, 3, 4]))
    blocks = draw(st.integers(min_value=pp * v, max_value=40))
    nstages = pp * v
    cuts = sorted(draw(st.sets(st.integers(1, blocks - 1), min_size=nstages - 1, max_size=nstages - 1))) if nstages > 1 else []
    bounds = [0, *cuts, blocks]
    rec = st.sampled_from(["none", "selective", "full"])
    stages = [Stage(first=bounds[i], last=bounds[i + 1] - 1, recompute=draw(rec)) for i in range(nstages)]
    mb, nmb = draw(st.integers(1, 8)), draw(st.integers(1, 64))
    world = pp * dp * tp
    per_node = 8 if world % 8 == 0 else world
    hw = HardwareSpec.preset("dgx-a100-80gb").model_copy(update={"num_nodes": world // per_node, "devices_per_node": per_node})
    sharding = draw(st.sampled_from(["none", "zero1", "zero2", "zero3"] + (["hsdp"] if dp % 2 == 0 and dp > 2 else [])))
    fl = st.floats(min_value=0, max_value=1e18, allow_nan=False, allow_infinity=False)
    predicted = Prediction(
        step_time_s=draw(fl), samples_per_s=draw(fl), tokens_per_s=draw(fl), mfu=draw(fl), hfu=draw(fl),
        model_flops_per_step=draw(fl), time_breakdown_s={"compute": draw(fl), "bubble": draw(fl)},
        memory_bytes={"parameters": draw(fl)}, peak_memory_bytes=draw(fl), memory_capacity_bytes=draw(fl),
        bubble_fraction=draw(st.floats(0, 1)), stage_times=[StageTimes(forward_s=draw(fl), backward_s=draw(fl))],
    )
    return Plan(
        predicted=predicted,
        model=ModelRef(name=draw(st.text(min_size=1, max_size=12)), fingerprint=draw(st.text(min_size=1, max_size=16)),
                       num_blocks=blocks, num_params=draw(st.integers(0, 10**13))),
        hardware=hw,
        train=TrainSpec(global_batch_size=mb * nmb * dp, precision=draw(st.sampled_from(["fp32", "bf16", "fp16"]))),
        mesh=Mesh(pp=pp, dp=dp, tp=tp),
        data_parallel=DataParallel(sharding=sharding, hsdp_shard_size=2 if sharding == "hsdp" else None),
        tensor_parallel=TensorParallel(sequence_parallel=tp > 1 and draw(st.booleans()),
                                       styles={"layers.*.attn.q_proj": "colwise"} if tp > 1 else {}),
        pipeline=Pipeline(schedule="interleaved_1f1b" if v > 1 else draw(st.sampled_from(["gpipe", "1f1b", "zero_bubble"])),
                          virtual_stages=v, micro_batch_size=mb, num_micro_batches=nmb, stages=stages),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans(), st.sampled_from(["yaml", "json"]))
def test_plan_roundtrips_exactly(tmp_path_factory, plan, ext):
    path = tmp_path_factory.mktemp("rt") / f"plan.{ext}"
    plan.to_file(path)
    again = Plan.from_file(path)
    assert again == plan
    assert str(again) == str(plan)
