"""Shared pydantic base and the user-facing error type for spec files."""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


class Frozen(BaseModel):
    """Base of every spec: frozen, strict about unknown keys, described fields.

    A yes/no where a number belongs is refused: pydantic's lax mode reads `true` as 1, so a
    hand-edited `devices_per_node: true` or `memory_bytes: true` would silently mean one device or
    one byte."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, value in data.items():
                if isinstance(value, bool):
                    field = cls.model_fields.get(name) if isinstance(name, str) else None
                    if field is not None and _is_number(field.annotation):
                        raise ValueError(f"{name}: {value!r} is a yes/no, not a number; give a number")
        return data


def _is_number(annotation: Any) -> bool:
    """int or float (alone, optional, or in a union with other non-bool types), not bool."""
    if annotation in (int, float):
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _is_number(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if bool in args:  # a yes/no is one of the field's own values
            return False
        return any(_is_number(a) for a in args if a is not type(None))
    return False


class SpecError(ValueError):
    """A user's input (file, string or value) is wrong. The message says what and how to fix it."""


# an int stays an int through SaneRange.check (a batch size, a device count)
Number = TypeVar("Number", int, float)
ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass(frozen=True)
class SaneRange:
    """The values of a number that describe a real machine or job, with the reason for the bounds.

    Generous on purpose (orders of magnitude beyond today's largest systems): they exist to refuse
    inf, nan, 1e308 and unit mistakes before a cost model or the search runs on them.
    """

    lo: float
    hi: float
    unit: str
    why: str

    def check(self, value: Number, name: str = "") -> Number:
        """`value` if finite and in [lo, hi]; else a ValueError with the range and why.

        With `name` (a validator over several values) the message starts `name: value`; without it
        (a field validator) pydantic's error already names the field and the value.
        """
        if isinstance(value, float) and not math.isfinite(value) or not self.lo <= value <= self.hi:
            head = f"{name}: {_show(value)} is outside" if name else "must be within"
            raise ValueError(f"{head} [{_show(self.lo)}, {_show(self.hi)}] {self.unit} ({self.why}); check the value")
        return value


def _show(value: float) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if abs(value) < 10**30 else f"an integer of {value.bit_length()} bits"


def format_validation_error(err: ValidationError, source: str = "") -> str:
    """One readable message per problem: `field.path: what is wrong (got value)`."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e.get("loc", ())) or "(top level)"
        msg = e.get("msg", "invalid")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        inp = e.get("input")
        kind = e.get("type", "")
        if kind == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        got = ""
        if kind not in ("missing",) and not isinstance(inp, dict) and inp is not None:
            try:
                text = repr(inp)
            except ValueError:  # an int past Python's 4300-digit str() limit
                text = f"an integer of {inp.bit_length()} bits"
            got = f" (got {text[:60]})"
        if kind == "value_error" and re.match(r"^[\w.]+: ", msg):  # a model validator named the field
            head, msg = msg.split(": ", 1)
            path = head if path == "(top level)" else f"{path}.{head}"
        lines.append(f"{path}: {msg}{got}")
    head = f"{source}: " if source else ""
    if len(lines) == 1:
        return head + lines[0]
    return head + f"{len(lines)} problems:\n  " + "\n  ".join(lines)


def validate_model(cls: type[ModelT], data: Any, source: str = "") -> ModelT:
    """cls.model_validate(data), turning pydantic's error into a SpecError with field paths."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, source)) from None
