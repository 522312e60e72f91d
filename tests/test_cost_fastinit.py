"""Tier 1: cost_models.fastinit builds the same frozen objects as the dataclasses' own __init__."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass, field

import pytest

from cost_models.estimate import AxisCommEstimate, StepEstimate
from cost_models.fastinit import fast_init
from cost_models.simulator import ScheduleResult


@dataclass(frozen=True, slots=True)
class _Point:
    x: float
    y: float = 2.0
    tags: tuple = ()


def test_same_object_as_the_dataclass():
    make = fast_init(_Point)
    for args, kwargs in [((1.0,), {}), ((1.0, 3.0), {}), ((), {"x": 1.0, "tags": ("a",)}), ((1.0,), {"y": 5.0})]:
        got, ref = make(*args, **kwargs), _Point(*args, **kwargs)
        assert type(got) is _Point and got == ref and repr(got) == repr(ref) and hash(got) == hash(ref)
    with pytest.raises(FrozenInstanceError):
        make(1.0).x = 2.0
    with pytest.raises(TypeError):
        make()  # a missing field fails as the dataclass's __init__ would


def test_cost_model_classes():
    a = fast_init(AxisCommEstimate)(1.0, 2.0, 3.0)
    assert type(a) is AxisCommEstimate and a == AxisCommEstimate(1.0, 2.0, 3.0)
    r = fast_init(ScheduleResult)(1.0, 0.1, (1.0,), (1,), (1,))
    assert r == ScheduleResult(1.0, 0.1, (1.0,), (1,), (1,)) and r.timeline == ()
    assert fast_init(StepEstimate).__init__.__code__.co_varnames[1:4] == ("step_time_s", "fits", "peak_memory_bytes")


def test_only_some_fields():
    make = fast_init(_Point, only=("tags", "x"))
    got = make(("a",), 1.0)
    assert type(got) is _Point and got.x == 1.0 and got.tags == ("a",)
    with pytest.raises(AttributeError):
        _ = got.y  # left empty: a class that fills it on access defines __getattr__
    with pytest.raises(TypeError, match="no field"):
        fast_init(_Point, only=("x", "z"))


def test_refuses_what_it_cannot_build():
    @dataclass(frozen=True, slots=True)
    class WithFactory:
        xs: list = field(default_factory=list)

    @dataclass(frozen=True)
    class NoSlots:
        x: float

    for cls in (WithFactory, NoSlots):
        with pytest.raises((TypeError, AttributeError)):
            fast_init(cls)
