"""Safe YAML/JSON reading and writing of spec files (no pickle, no eval, no custom tags)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from specs._base import SpecError


def load_data(path: str | os.PathLike) -> Any:
    """Read a YAML or JSON file with safe loaders. Errors name the file and the line."""
    p = Path(path)
    if not p.exists():
        raise SpecError(f"{p}: file not found")
    if p.is_dir():
        raise SpecError(f"{p}: is a directory, expected a YAML or JSON file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{p}: not a text file (expected YAML or JSON)") from None
    return parse_text(text, str(p), json_only=p.suffix.lower() == ".json")


def parse_text(text: str, source: str = "<string>", json_only: bool = False) -> Any:
    if json_only:
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"{source}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{source}: malformed YAML{where}: {problem}") from None


def dump_data(data: Any, path: str | os.PathLike) -> None:
    """Write JSON for *.json, YAML otherwise; atomically (write a temp file, then rename)."""
    p = Path(path)
    if p.suffix.lower() == ".json":
        text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    else:
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)
