"""Property tests (hypothesis): random and mutated specs/plans thrown at the loaders and the planner.

Properties:
- Plan.from_dict / HardwareSpec files / Constraints data: the result is either a valid object or
  a specs.SpecError (a ValueError) with a non-empty message; nothing else escapes.
- Every valid plan round-trips exactly: dict -> Plan -> JSON dict -> Plan, and through YAML and
  JSON text files.
- The planner on small random GPT graphs (tests/graphs.gpt_graph), random hardware and random
  constraints: returns a plan that validates and round-trips, or raises SpecError.
"""

from __future__ import annotations

import copy
import math

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from specs import Constraints, HardwareSpec, Plan, SpecError
from specs._base import validate_model
from tests.graphs import gpt_graph
from tests.runtime_plans import make_plan

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SCALARS = (st.none() | st.booleans() | st.integers(-(2**40), 2**40)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
JSONISH = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                       max_leaves=12)
VALID_PLANS = [
    make_plan("gpt-tiny").model_dump(mode="json"),
    make_plan("gpt-tiny", pp=2, num_micro_batches=2).model_dump(mode="json"),
    make_plan("gpt-tiny", dp=4, sharding="hsdp", hsdp_shard_size=2).model_dump(mode="json"),
]


def _paths(d, prefix=()):
    """Every (path) to a value inside nested dicts/lists."""
    out = []
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    for k, v in items:
        out.append((*prefix, k))
        out.extend(_paths(v, (*prefix, k)))
    return out


@st.composite
def mutated(draw, bases):
    data = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(0, 3))):
        paths = _paths(data)
        path = draw(st.sampled_from(paths))
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "delete", "add", "nudge", "nudge", "same_type", "same_type"]))
        key = path[-1]
        val = parent[key]
        if op == "same_type" and isinstance(val, (bool, int, float, str)):
            kind = {bool: st.booleans(), int: st.integers(-4, 64), float: st.floats(-1, 1e15),
                    str: st.sampled_from(["none", "zero3", "1f1b", "gpipe", "full", "cpu", "x", ""])}
            parent[key] = draw(kind[type(val)])
        elif op == "delete":
            del parent[key]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(SCALARS)
        elif op == "nudge" and isinstance(val, int) and not isinstance(val, bool):
            parent[key] += draw(st.sampled_from([-2, -1, 1, 2]))
        else:
            parent[key] = draw(JSONISH)
    return data


def _load_or_error(fn):
    """fn() -> object, or None after a SpecError with a message; anything else fails the test."""
    try:
        out = fn()
    except SpecError as e:
        assert str(e).strip(), "empty error message"
        event("SpecError")
        return None
    event("valid")
    return out


def _has_nan(x) -> bool:
    if isinstance(x, float):
        return math.isnan(x)
    if isinstance(x, dict):
        return any(_has_nan(v) for v in x.values())
    if isinstance(x, list):
        return any(_has_nan(v) for v in x)
    return False


def _round_trips(plan: Plan, tmp_dir) -> None:
    data = plan.model_dump(mode="json")
    again = Plan.from_dict(data)
    assert again.model_dump(mode="json") == data or _has_nan(data)
    for suffix in (".yaml", ".json"):
        path = tmp_dir / f"rt{suffix}"
        plan.to_file(path)
        back = Plan.from_file(path)
        if not _has_nan(data):
            assert back == plan, suffix


@SETTINGS
@given(data=JSONISH)
def test_random_data_is_a_plan_or_a_spec_error(data):
    _load_or_error(lambda: Plan.from_dict(data))


@SETTINGS
@given(data=mutated(VALID_PLANS))
def test_mutated_plans_load_or_fail_clearly_and_valid_ones_round_trip(data, tmp_path_factory):
    plan = _load_or_error(lambda: Plan.from_dict(data))
    if plan is not None:
        _round_trips(plan, tmp_path_factory.mktemp("rt"))


HW = HardwareSpec.preset("dgx-a100-80gb", devices=8).model_dump(mode="json")


@SETTINGS
@given(data=mutated([HW]), as_json=st.booleans())
def test_mutated_hardware_files(data, as_json, tmp_path_factory):
    path = tmp_path_factory.mktemp("hw") / ("hw.json" if as_json else "hw.yaml")
    import json

    try:
        text = json.dumps(data) if as_json else yaml.safe_dump(data)
    except (ValueError, yaml.YAMLError):
        return  # not representable in that format (e.g. NaN in strict JSON is fine; odd keys)
    path.write_text(text)
    hw = _load_or_error(lambda: HardwareSpec.load(path))
    if hw is not None and not _has_nan(hw.model_dump(mode="json")):
        out = path.with_name("out" + path.suffix)
        hw.to_file(out)
        assert HardwareSpec.load(out) == hw


KNOB_VALUES = st.one_of(st.integers(-3, 20), st.sampled_from(["none", "zero3", "1f1b", "full", "x"]),
                        st.booleans(), st.none(), st.floats(-1, 2))
CONSTRAINT_KEYS = list(Constraints.model_fields) + ["tpp", "zero"]


@SETTINGS
@given(data=st.dictionaries(st.sampled_from(CONSTRAINT_KEYS), KNOB_VALUES, max_size=5))
def test_random_constraints(data):
    c = _load_or_error(lambda: validate_model(Constraints, data, "constraints"))
    if c is not None:
        assert validate_model(Constraints, c.model_dump(mode="json")) == c


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.integers(1, 6), heads=st.sampled_from([1, 2, 3, 4, 6, 8]), head_dim=st.sampled_from([16, 32]),
    seq_len=st.sampled_from([32, 128]), vocab=st.integers(50, 3000),
    preset=st.sampled_from(["dgx-a100-80gb", "dgx-h100-80gb", "cpu"]), devices=st.sampled_from([1, 2, 4, 8]),
    batch=st.sampled_from([1, 3, 8, 16]),
    pins=st.dictionaries(st.sampled_from(["pp", "dp", "tp", "sharding", "recompute", "schedule", "max_tp"]),
                         st.sampled_from([1, 2, 4, 3, "zero3", "none", "full", "gpipe"]), max_size=2),
)
def test_planner_on_random_graphs(layers, heads, head_dim, seq_len, vocab, preset, devices, batch, pins,
                                  tmp_path_factory):
    from planner import autoplan
    from specs import TrainSpec

    graph = gpt_graph(vocab=vocab, hidden=heads * head_dim, layers=layers, heads=heads, seq_len=seq_len)
    hw = HardwareSpec.preset(preset, devices=devices)
    constraints = _load_or_error(lambda: validate_model(Constraints, pins, "constraints"))
    if constraints is None:
        return
    train = TrainSpec(global_batch_size=batch, precision="fp32" if preset == "cpu" else "bf16")
    plan = _load_or_error(lambda: autoplan(None, hw, graph=graph, train=train, constraints=constraints))
    if plan is not None:
        assert plan.mesh.world_size == devices
        assert plan.predicted is not None and plan.predicted.fits
        _round_trips(plan, tmp_path_factory.mktemp("rt"))


def test_every_base_plan_round_trips(tmp_path):
    for data in VALID_PLANS:
        _round_trips(Plan.from_dict(data), tmp_path)
