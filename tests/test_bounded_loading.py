"""Bounded loading of every file autoplan reads (issue 20, part 3): specs.io and the specs' ranges.

- Hostile files (a "billion laughs" of YAML aliases, more than 16 MiB, 10,000 levels of nesting,
  a 5,000-digit integer, 300,000 values) give one SpecError line naming the file, in well under a
  second, through the API and through the CLI (exit 2, no traceback).
- HardwareSpec numbers must be finite and in a sane range (inf, nan, 1e308 bandwidths or FLOP/s,
  1e9 devices, 2**60 bytes of memory are refused naming the field and the range); the global
  batch is bounded before any search runs (`plan --batch 1000000000000`).
- A hypothesis fuzzer mutates valid plan and hardware files, as data (hostile values spliced in)
  and as text (bytes flipped, aliases, tags, deep brackets, long digits inserted): the loader
  returns a valid object or raises SpecError, never anything else, each in under 10 s.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from planner.cli import main
from specs import HardwareSpec, Plan, SpecError, TrainSpec
from specs.io import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES, load_data
from tests.explain_sample import big_plan, small_plan
from tests.runtime_plans import make_plan
from tests.test_bad_inputs_props import _paths  # every (path) to a value in nested data

BILLION_LAUGHS = "\n".join(
    ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 9) + "]" for i in range(1, 12)]
) + "\n"


def _one_line(msg: str) -> bool:
    return "\n" not in msg.strip() and "Traceback" not in msg


def _refused(fn, *needles: str, seconds: float = 1.0) -> str:
    """fn() raises SpecError within `seconds`, as one line holding every needle."""
    t0 = time.perf_counter()
    with pytest.raises(SpecError) as e:
        fn()
    took = time.perf_counter() - t0
    msg = str(e.value)
    assert _one_line(msg), msg
    assert all(n in msg for n in needles), (msg, needles)
    assert took < seconds, f"took {took:.2f} s: {msg}"
    return msg


def _hw_data() -> dict:
    return HardwareSpec.preset("dgx-a100-80gb", devices=8).model_dump(mode="json")


# ------------------------------------------------------------------ file-level bounds
@pytest.mark.parametrize("loader", [load_data, Plan.from_file, HardwareSpec.load])
def test_billion_laughs_refused_fast(tmp_path, loader):
    path = tmp_path / "lol.yaml"
    path.write_text(BILLION_LAUGHS)
    _refused(lambda: loader(str(path)), str(path), "aliases", "line 2")


def test_a_single_alias_is_refused_too(tmp_path):
    """Plans never need aliases: even a harmless merge key is refused with what to do."""
    path = tmp_path / "hw.yaml"
    path.write_text("base: &b {bandwidth_bytes_per_s: 1.0e+9, latency_s: 1.0e-6}\nintra_node: *b\n")
    _refused(lambda: load_data(path), "*b", "write the value out")
    path.write_text("x: &b 1\n")  # an anchor alone expands nothing
    assert load_data(path) == {"x": 1}


def test_file_size_limit(tmp_path):
    path = tmp_path / "big.yaml"
    with open(path, "w") as f:  # a valid YAML comment, one byte over the limit
        f.write("#" + "x" * (MAX_FILE_BYTES - 1) + "\n")
    assert path.stat().st_size == MAX_FILE_BYTES + 1
    _refused(lambda: Plan.from_file(path), str(path), "larger than 16 MiB", seconds=3)


def test_endless_device_file_is_refused(tmp_path):
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    _refused(lambda: load_data("/dev/zero"), "/dev/zero", "larger than 16 MiB", seconds=3)


@pytest.mark.parametrize("name,text", [
    ("deep.json", "[" * 10000 + "]" * 10000),
    ("deep.yaml", "[" * 10000 + "]" * 10000),
    ("deep_block.yaml", "".join("  " * i + "- \n" for i in range(2000))),
    ("deep_map.json", '{"a": ' * 5000 + "1" + "}" * 5000),
    ("just_over.json", "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)),
    ("just_over.yaml", "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)),
])
def test_deep_nesting_is_one_line(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    msg = _refused(lambda: load_data(path), str(path))
    assert "nest" in msg


def test_nesting_within_the_limit_loads(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text("[" * MAX_DEPTH + "]" * MAX_DEPTH)
    assert load_data(path) is not None


@pytest.mark.parametrize("name,text,needle", [
    ("int.json", '{"num_nodes": ' + "9" * 5000 + "}", "thousands of digits"),
    ("int.yaml", "num_nodes: " + "9" * 5000 + "\n", "thousands of digits"),
    ("hex.yaml", "num_nodes: 0x" + "f" * 10000 + "\n", "larger than 2**63 - 1"),
    ("wide.json", '{"num_nodes": ' + "9" * 100 + "}", "larger than 2**63 - 1"),
])
def test_huge_integers_are_one_line(tmp_path, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    _refused(lambda: HardwareSpec.load(str(path)), str(path), needle)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_too_many_values(tmp_path, suffix):
    path = tmp_path / f"many{suffix}"
    path.write_text(json.dumps({"a": [1] * (MAX_NODES + 10)}))
    _refused(lambda: load_data(path), f"more than {MAX_NODES:,} values", seconds=3)


def test_the_largest_accepted_file_loads_in_seconds(tmp_path):
    """Just under the value limit, YAML's slowest shape (one-digit list items) still loads fast."""
    path = tmp_path / "most.yaml"
    path.write_text("a: [" + ", ".join(["1"] * (MAX_NODES - 10)) + "]\n")
    t0 = time.perf_counter()
    assert len(load_data(path)["a"]) == MAX_NODES - 10
    assert time.perf_counter() - t0 < 10


def test_bad_values_in_yaml_are_one_line(tmp_path):
    path = tmp_path / "date.yaml"
    path.write_text("when: 2020-13-45\n")  # a timestamp YAML cannot construct
    _refused(lambda: load_data(path), str(path), "cannot be converted")


@pytest.mark.parametrize("argv_of", [
    lambda f: ["explain", f],
    lambda f: ["compare", f, f],
    lambda f: ["export", f, "--to", "megatron"],
    lambda f: ["plan", "gpt-tiny", "--hw", f],
])
@pytest.mark.parametrize("name,text", [
    ("lol.yaml", BILLION_LAUGHS),
    ("deep.json", "[" * 10000 + "]" * 10000),
    ("int.json", '{"a": ' + "7" * 5000 + "}"),
])
def test_cli_exits_2_with_one_line(tmp_path, capsys, argv_of, name, text):
    path = tmp_path / name
    path.write_text(text)
    t0 = time.perf_counter()
    rc = main(argv_of(str(path)))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("autoplan ") and _one_line(err) and str(path) in err, err
    assert time.perf_counter() - t0 < 2


# ------------------------------------------------------------------ sane ranges
HW_CASES = [
    (("device", "memory_bandwidth_bytes_per_s"), math.inf, "device.memory_bandwidth_bytes_per_s", "finite"),
    (("device", "memory_bandwidth_bytes_per_s"), 1e308, "device.memory_bandwidth_bytes_per_s", "1e+15"),
    (("device", "peak_flops_per_s", "bf16"), math.nan, "device.peak_flops_per_s.bf16", "finite"),
    (("device", "peak_flops_per_s", "bf16"), 1e308, "device.peak_flops_per_s.bf16", "1e+18"),
    (("device", "peak_flops_per_s", "fp8"), 1e30, "device.peak_flops_per_s.fp8", "1e+18"),
    (("device", "memory_bytes"), 2**60, "device.memory_bytes", "bytes"),
    (("device", "memory_bytes"), math.inf, "device.memory_bytes", "finite"),
    (("device", "kernel_launch_s"), 1e9, "device.kernel_launch_s", "s ("),
    (("intra_node", "bandwidth_bytes_per_s"), math.inf, "intra_node.bandwidth_bytes_per_s", "finite"),
    (("inter_node", "bandwidth_bytes_per_s"), 1e300, "inter_node.bandwidth_bytes_per_s", "1e+15"),
    (("inter_node", "latency_s"), math.nan, "inter_node.latency_s", "finite"),
    (("host", "pcie_bandwidth_bytes_per_s"), 1e20, "host.pcie_bandwidth_bytes_per_s", "1e+15"),
    (("host", "memory_bytes"), 2**62, "host.memory_bytes", "bytes"),
    (("host", "cpu_adam_params_per_s"), math.inf, "host.cpu_adam_params_per_s", "finite"),
    (("num_nodes",), 10**9, "num_nodes", "1,048,576"),
    (("num_nodes",), 200_000, "num_nodes(200,000) * devices_per_node(8) = 1,600,000 devices", "2**20"),
    (("devices_per_node",), 10**6, "devices_per_node", "4,096"),
    (("collective_efficiency",), math.nan, "collective_efficiency", "finite"),
    (("collectives",), {"all_reduce": {"bandwidth_bytes_per_s": math.inf, "latency_s": 0}},
     "collectives.all_reduce.bandwidth_bytes_per_s", "finite"),
    (("efficiency",), {"matmul": [{"size": 1e308, "efficiency": 0.5}]}, "efficiency.matmul.0.size", "1e+30"),
]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize("path,value,field,needle", HW_CASES, ids=[c[2][:40] for c in HW_CASES])
def test_hardware_numbers_finite_and_sane(tmp_path, suffix, path, value, field, needle):
    data = _hw_data()
    node = data
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    f = tmp_path / f"hw{suffix}"
    # YAML writes .inf/.nan; JSON writes Infinity/NaN (which Python's json reads back)
    f.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
    _refused(lambda: HardwareSpec.load(str(f)), str(f), field, needle)


def test_presets_are_within_the_ranges():
    for name in HardwareSpec.preset_names():
        HardwareSpec.preset(name)
    HardwareSpec.preset("dgx-h100-80gb", devices=2**20)  # the largest accepted cluster


def test_plan_with_infinite_hardware_is_refused(tmp_path):
    data = make_plan("gpt-tiny").model_dump(mode="json")
    data["hardware"]["device"]["peak_flops_per_s"]["bf16"] = math.inf
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(data))
    _refused(lambda: Plan.from_file(f), "hardware.device.peak_flops_per_s.bf16", "finite")


def test_batch_is_bounded_before_the_search(capsys):
    t0 = time.perf_counter()
    rc = main(["plan", "gpt-tiny", "--hw", "cpu:2", "--batch", "1000000000000"])
    err = capsys.readouterr().err
    assert rc == 2 and _one_line(err), err
    assert "global_batch_size" in err and "1,048,576" in err and "1000000000000" in err
    assert time.perf_counter() - t0 < 5  # refused up front: no trace, no search
    assert TrainSpec(global_batch_size=2**20).global_batch_size == 2**20


def test_absurd_device_count_refused_before_the_search(capsys):
    rc = main(["plan", "gpt-tiny", "--hw", "dgx-a100-80gb:1000000000"])
    err = capsys.readouterr().err
    assert rc == 2 and _one_line(err) and "num_nodes" in err and "1,048,576" in err, err


# ------------------------------------------------------------------ fuzzing the loaders
@functools.cache
def _valid_plans() -> list[dict]:
    from planner import autoplan

    planned = autoplan("gpt-tiny", HardwareSpec.preset("cpu", devices=2), train=TrainSpec(global_batch_size=8))
    return [p.model_dump(mode="json") for p in (planned, make_plan("gpt-tiny"), small_plan(), big_plan())]


@functools.cache
def _valid_hardware() -> list[dict]:
    return [HardwareSpec.preset(n).model_dump(mode="json") for n in HardwareSpec.preset_names()]


HOSTILE = st.sampled_from([
    math.inf, -math.inf, math.nan, 1e308, -1e308, 5e-324, 10**18, 2**63, 2**64, -(2**63), 0, -1,
    "os:abort", "x" * 10_000, [[[[[[[[[[]]]]]]]]]], {"a": {"b": {"c": {"d": {}}}}}, None, True,
])
TEXT_INSERTS = st.sampled_from([
    "&a ", "*a", "*a ", "!!python/object/apply:os.system ['true']", "[" * 200, "{" * 200,
    "9" * 5000, "0x" + "f" * 5000, ".inf", ".nan", "\x00", "\t", ": ", "- ", "\n", "<<: *a\n",
    "!!binary aGk=", "2020-13-45", "1e999", "\ufeff", "'", '"', "#",
])


@st.composite
def mutated_files(draw, bases):
    """(suffix, bytes): a valid spec, mutated as data and then as text."""
    data = copy.deepcopy(draw(st.sampled_from(bases())))
    for _ in range(draw(st.integers(0, 3))):
        paths = _paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        if draw(st.booleans()):
            parent[path[-1]] = copy.deepcopy(draw(HOSTILE))  # sampled objects are shared
        elif isinstance(parent[path[-1]], (int, float)) and not isinstance(parent[path[-1]], bool):
            parent[path[-1]] = parent[path[-1]] * draw(st.sampled_from([-1, 0, 1e3, 1e30, 1e300]))
    suffix = draw(st.sampled_from([".yaml", ".json"]))
    text = json.dumps(data) if suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    raw = bytearray(text.encode("utf-8"))
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(raw)))
        op = draw(st.sampled_from(["insert", "flip", "cut"]))
        if op == "insert":
            raw[pos:pos] = draw(TEXT_INSERTS).encode("utf-8")
        elif op == "flip" and pos < len(raw):
            raw[pos] = draw(st.integers(0, 255))
        else:
            del raw[pos:]
    return suffix, bytes(raw)


def _load_or_error(fn, path: Path):
    """fn(path) -> a value, or None after a one-line SpecError; anything else fails; < 10 s."""
    t0 = time.perf_counter()
    try:
        out = fn(str(path))
    except SpecError as e:
        assert str(e).strip(), "empty message"
        assert "Traceback" not in str(e)
        event(f"refused: {str(e).split(': ')[1][:40] if ': ' in str(e) else str(e)[:40]}")
        out = None
    else:
        event("loaded")
    assert time.perf_counter() - t0 < 10
    return out


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(case=mutated_files(_valid_plans))
def test_fuzz_plan_files(tmp_path_factory, case):
    suffix, raw = case
    path = tmp_path_factory.mktemp("fuzz") / f"plan{suffix}"
    path.write_bytes(raw)
    plan = _load_or_error(Plan.from_file, path)
    assert plan is None or isinstance(plan, Plan)


@FUZZ
@given(case=mutated_files(_valid_hardware))
def test_fuzz_hardware_files(tmp_path_factory, case):
    suffix, raw = case
    path = tmp_path_factory.mktemp("fuzz") / f"hw{suffix}"
    path.write_bytes(raw)
    hw = _load_or_error(HardwareSpec.load, path)
    if hw is not None:
        assert isinstance(hw, HardwareSpec) and 1 <= hw.num_devices <= 2**20
        for v in (hw.device.memory_bandwidth_bytes_per_s, hw.intra_node.bandwidth_bytes_per_s,
                  hw.inter_node.bandwidth_bytes_per_s, *hw.device.peak_flops_per_s.values()):
            assert math.isfinite(v) and 0 < v <= 1e18
