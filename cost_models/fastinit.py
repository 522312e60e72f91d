"""Fast construction of frozen slotted dataclasses on the cost model's hot paths.

A frozen dataclass's generated __init__ sets each field through object.__setattr__ (it must get
past the class's own __setattr__, which raises), ~85 ns a field in CPython 3.11: 2 us for a
StepEstimate, built once per scored candidate. `fast_init(cls)` returns a constructor with the same
signature that fills a plain slotted twin of `cls` (ordinary attribute stores, ~10 ns a field)
and then sets the object's class to `cls`, which CPython allows between classes of the same
slot layout. The result is an ordinary, frozen instance of `cls` (tests/test_cost_fastinit.py).
"""

from __future__ import annotations

import dataclasses


def fast_init(cls, only: tuple[str, ...] | None = None):
    """A constructor for the frozen `slots=True` dataclass `cls`, equivalent to `cls(...)`.

    `only`: take just these fields, in this order, all required, and leave the other slots empty
    (for a class that fills them on first access, as cost_models.estimate.StepEstimate does)."""
    fields = dataclasses.fields(cls)
    if tuple(f.name for f in fields) != tuple(cls.__slots__):
        raise TypeError(f"fast_init: {cls.__name__} must be a dataclass with slots=True and only field slots")
    if only is not None:
        by_name = {f.name: f for f in fields}
        unknown = [n for n in only if n not in by_name]
        if unknown:
            raise TypeError(f"fast_init: {cls.__name__} has no field(s) {unknown}")
        fields = [by_name[n] for n in only]
    params, defaults = [], {}
    for f in fields:
        if only is not None:
            params.append(f.name)
        elif f.default is not dataclasses.MISSING:
            defaults[f"_d_{f.name}"] = f.default
            params.append(f"{f.name}=_d_{f.name}")
        elif f.default_factory is not dataclasses.MISSING:
            raise TypeError(f"fast_init: {cls.__name__}.{f.name} has a default_factory (not supported)")
        else:
            params.append(f.name)
    body = "".join(f"    self.{f.name} = {f.name}\n" for f in fields) + "    self.__class__ = _cls\n"
    ns = {"_cls": cls, **defaults}
    exec(f"def __init__(self, {', '.join(params)}):\n{body}", ns)  # noqa: S102 - generated from field names
    # calling the twin runs its __init__, which ends by making the object a `cls`
    return type(f"_{cls.__name__}Init", (), {"__slots__": cls.__slots__, "__init__": ns["__init__"],
                                              "__doc__": f"{cls.__name__}(...), built as fast_init describes"})
