"""Shared pydantic base and the user-facing error type for spec files."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class Frozen(BaseModel):
    """Base of every spec: frozen, strict about unknown keys, described fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class SpecError(ValueError):
    """A user's input (file, string or value) is wrong. The message says what and how to fix it."""


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
            text = repr(inp)
            got = f" (got {text[:60]})"
        if path == "(top level)" and re.match(r"^[\w.]+: ", msg):
            path, msg = msg.split(": ", 1)  # model validators already name the field
        lines.append(f"{path}: {msg}{got}")
    head = f"{source}: " if source else ""
    if len(lines) == 1:
        return head + lines[0]
    return head + f"{len(lines)} problems:\n  " + "\n  ".join(lines)


def validate_model(cls: type[BaseModel], data: Any, source: str = "") -> Any:
    """cls.model_validate(data), turning pydantic's error into a SpecError with field paths."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, source)) from None
