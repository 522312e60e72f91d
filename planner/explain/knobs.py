"""Knob assignments typed by people: `--pin tp=8 --pin zero=1` and `--why-not tp=4 ckpt=full`.

Knob names are those of `specs.Constraints` (pp, dp, tp, sharding, micro_batch_size, ...) plus
short aliases (zero, ckpt, sched, mb, nmb, sp, v). Values are checked against the field's type:
a bad name lists the knob names, a bad value names the knob and its allowed values.

`complete_knobs(plan_knobs, overrides, world_size, global_batch)` turns a partial change into a
whole `specs.Knobs` point that keeps the world size and global batch: changing tp re-derives dp
(unless dp is given too), changing dp or micro_batch_size re-derives num_micro_batches.
"""

from __future__ import annotations

import math
import typing

from specs import Constraints, Knobs, SpecError

# alias -> (knob, value map or None)
ALIASES: dict[str, tuple[str, dict[str, str] | None]] = {
    "zero": (
        "sharding",
        {
            "0": "none",
            "1": "zero1",
            "2": "zero2",
            "3": "zero3",
            "hsdp": "hsdp",
            "none": "none",
            "zero1": "zero1",
            "zero2": "zero2",
            "zero3": "zero3",
        },
    ),
    "ckpt": ("recompute", None),
    "checkpoint": ("recompute", None),
    "sched": ("schedule", None),
    "mb": ("micro_batch_size", None),
    "nmb": ("num_micro_batches", None),
    "sp": ("sequence_parallel", None),
    "v": ("virtual_stages", None),
}
_PIN_FIELDS = (
    "pp",
    "dp",
    "tp",
    "ep",
    "cp",
    "sharding",
    "hsdp_shard_size",
    "micro_batch_size",
    "num_micro_batches",
    "schedule",
    "virtual_stages",
    "recompute",
    "sequence_parallel",
    "offload",
)


# Bounds of the search that `--pin` also accepts (not knobs of a plan, so not for --why-not).
_BOUND_FIELDS = ("max_tp", "max_pp", "tp_across_nodes", "memory_headroom_fraction", "top_k")


def _field_kind(name: str) -> tuple[str, tuple[str, ...]]:
    """('int'|'float'|'bool'|'choice', allowed choices) for a Constraints field."""
    ann = Constraints.model_fields[name].annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)] or [ann]
    for a in args:
        if typing.get_origin(a) is typing.Literal:
            return "choice", tuple(str(x) for x in typing.get_args(a))
    if bool in args:
        return "bool", ("true", "false")
    if float in args:
        return "float", ()
    return "int", ()


def allowed_values(name: str) -> str:
    kind, choices = _field_kind(name)
    if kind == "choice":
        if name == "sharding":
            return ", ".join(choices) + " (or zero=0/1/2/3)"
        return ", ".join(choices)
    if kind == "bool":
        return "true or false"
    if kind == "float":
        return "a fraction in [0, 1)"
    return "a positive integer"


def parse_assignment(text: str, bounds: bool = False) -> tuple[str, object]:
    """'tp=8' -> ('tp', 8); 'zero=1' -> ('sharding', 'zero1'). Raises SpecError naming the knob.
    With `bounds`, the search bounds (max_tp, max_pp, ...) are accepted too."""
    if "=" not in text:
        raise SpecError(f"knob {text!r}: expected NAME=VALUE, e.g. tp=8 or zero=1")
    raw_name, _, raw_value = text.partition("=")
    raw_name, raw_value = raw_name.strip(), raw_value.strip()
    name, value_map = ALIASES.get(raw_name, (raw_name, None))
    names = _PIN_FIELDS + (_BOUND_FIELDS if bounds else ())
    if name not in names:
        known = ", ".join(names)
        alias = ", ".join(f"{a}={k}" for a, (k, _) in ALIASES.items())
        raise SpecError(f"unknown knob {raw_name!r}; knobs: {known} (aliases: {alias})")
    value: object = raw_value
    if value_map is not None:
        if raw_value.lower() not in value_map:
            raise SpecError(
                f"knob {raw_name}: {raw_value!r} is not allowed; allowed: {allowed_values(name)}"
            )
        value = value_map[raw_value.lower()]
    kind, choices = _field_kind(name)
    if kind == "int":
        try:
            value = int(str(value))
        except ValueError:
            raise SpecError(
                f"knob {raw_name}: {raw_value!r} is not allowed; allowed: {allowed_values(name)}"
            ) from None
        if value <= 0:
            raise SpecError(
                f"knob {raw_name}: {raw_value!r} is not allowed; allowed: {allowed_values(name)}"
            )
    elif kind == "float":
        try:
            value = float(str(value))
        except ValueError:
            raise SpecError(
                f"knob {raw_name}: {raw_value!r} is not allowed; allowed: {allowed_values(name)}"
            ) from None
    elif kind == "bool":
        low = str(value).lower()
        if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise SpecError(
                f"knob {raw_name}: {raw_value!r} is not allowed; allowed: true or false"
            )
        value = low in ("true", "1", "yes", "on")
    elif str(value) not in choices:
        raise SpecError(
            f"knob {raw_name}: {raw_value!r} is not allowed; allowed: {allowed_values(name)}"
        )
    return name, value


def parse_assignments(items: list[str], bounds: bool = False) -> dict[str, object]:
    """Several `NAME=VALUE` items (each may hold several, comma or space separated)."""
    out: dict[str, object] = {}
    for item in items:
        for part in item.replace(",", " ").split():
            name, value = parse_assignment(part, bounds)
            if name in out and out[name] != value:
                raise SpecError(f"knob {name}: given twice ({out[name]} and {value})")
            out[name] = value
    return out


def constraints_from_pins(items: list[str], **extra: object) -> Constraints:
    """`--pin` items -> specs.Constraints (validation errors become SpecError)."""
    from specs._base import validate_model

    return validate_model(Constraints, {**parse_assignments(items, bounds=True), **extra}, "--pin")


def complete_knobs(
    base: Knobs, overrides: dict[str, object], world_size: int, global_batch: int
) -> Knobs:
    """`base` with `overrides`, re-deriving the dependent knobs so the point stays on the same
    hardware and global batch. Raises SpecError with the arithmetic when no such point exists."""
    data = base.model_dump()
    data.update(overrides)
    given = set(overrides)
    pp, tp, cp = int(data["pp"]), int(data["tp"]), int(data.get("cp", 1))
    cps = f" * cp({cp})" if cp > 1 else ""
    if "dp" not in given:
        if world_size % (pp * tp * cp):
            raise SpecError(
                f"tp({tp}) * pp({pp}){cps} = {tp * pp * cp} does not divide the {world_size} devices; "
                f"choose degrees whose product divides {world_size}"
            )
        data["dp"] = world_size // (pp * tp * cp)
    dp = int(data["dp"])
    if pp * dp * tp * cp != world_size:
        raise SpecError(
            f"tp({tp}) * pp({pp}) * dp({dp}){cps} = {tp * pp * dp * cp}, but the hardware has {world_size} devices"
        )
    mbs = int(data["micro_batch_size"])
    if "num_micro_batches" not in given:
        if global_batch % (mbs * dp):
            raise SpecError(
                f"global batch {global_batch} is not divisible by micro_batch_size({mbs}) * dp({dp}) = "
                f"{mbs * dp}; pin micro_batch_size or num_micro_batches too"
            )
        data["num_micro_batches"] = global_batch // (mbs * dp)
    nmb = int(data["num_micro_batches"])
    if mbs * nmb * dp != global_batch:
        raise SpecError(
            f"micro_batch_size({mbs}) * num_micro_batches({nmb}) * dp({dp}) = {mbs * nmb * dp}, but the "
            f"global batch is {global_batch}"
        )
    if pp == 1 and "schedule" not in given:
        data["virtual_stages"] = 1
    if data.get("virtual_stages", 1) > 1 and data["schedule"] not in (
        "interleaved_1f1b",
        "zero_bubble",
    ):
        if "schedule" in given:
            raise SpecError(
                f"virtual_stages {data['virtual_stages']} needs schedule interleaved_1f1b or zero_bubble"
            )
        data["schedule"] = "interleaved_1f1b"
    if tp == 1:
        data["sequence_parallel"] = False
    ep = int(data.get("ep", 1))
    if dp % ep:
        if "ep" in given:
            raise SpecError(f"ep({ep}) does not divide dp({dp}); expert-parallel groups are data-parallel ranks")
        data["ep"] = math.gcd(ep, dp)  # the base plan's ep, cut to what the new dp allows
    if data["sharding"] != "hsdp":
        data["hsdp_shard_size"] = None
    from specs._base import validate_model

    return validate_model(Knobs, data, "knobs")
