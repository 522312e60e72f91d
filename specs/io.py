"""Safe, bounded YAML/JSON reading and writing of spec files (no pickle, no eval, no custom tags).

Every file autoplan reads (plans, hardware specs) comes through `load_data`, which treats it as
hostile: whatever it holds, the answer is a value or one `SpecError` line, in about a second.

| bound                 | limit                 | why                                                       |
|-----------------------|-----------------------|-----------------------------------------------------------|
| size                  | MAX_FILE_BYTES 16 MiB | a GPT-3 175B plan is ~30 KiB; 500x headroom, yet libyaml  |
|                       |                       | parses 16 MiB in ~2 s (`_read_bounded`)                   |
| YAML aliases (`*a`)   | refused               | plans never need them; nested aliases ("billion laughs")  |
|                       |                       | expand exponentially (`_scan_yaml_events`)                |
| nesting depth         | MAX_DEPTH 32          | the deepest spec (hardware efficiency curves) is 5; the   |
|                       |                       | parsers and pydantic recurse per level (`_check_tree`)    |
| values (nodes)        | MAX_NODES 200,000     | a GPT-3 175B plan has ~1,800; YAML builds ~4 us of Python |
|                       |                       | objects per value, so 200k cost < 1 s where 16 MiB of     |
|                       |                       | one-digit list items would take ~50 s and 3 GiB           |
| integers              | abs <= 2**63 - 1      | every count and byte size fits int64 (torch's index type) |
|                       |                       | and Python refuses > 4300 digits with a raw ValueError    |

Floats are left to the specs' own fields (finite, sane ranges: specs/hardware.py), since which
range is sane depends on the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from specs._base import SpecError

MAX_FILE_BYTES = 16 * 2**20
MAX_DEPTH = 32
MAX_NODES = 200_000
MAX_INT = 2**63 - 1

# libyaml (C) where the wheel has it: ~10x faster than the pure-Python loader, which would need
# ~20 s for a 16 MiB file.
_YAML_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_data(path: str | os.PathLike[str]) -> Any:
    """Read a YAML or JSON file with safe, bounded loaders. Errors name the file and the line."""
    p = Path(path)
    if not p.exists():
        raise SpecError(f"{p}: file not found")
    if p.is_dir():
        raise SpecError(f"{p}: is a directory, expected a YAML or JSON file")
    if p.is_fifo() or p.is_socket():  # reading one waits for a writer that may never come
        raise SpecError(f"{p}: is a pipe or socket, expected a YAML or JSON file (save it to a file first)")
    raw = _read_bounded(p)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{p}: not a text file (expected YAML or JSON)") from None
    return parse_text(text, str(p), json_only=p.suffix.lower() == ".json")


def _read_bounded(p: Path) -> bytes:
    """At most MAX_FILE_BYTES of `p`; reads one byte more to tell, so /dev/zero is refused too."""
    with open(p, "rb") as f:
        raw = f.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise SpecError(_too_big(str(p)))
    return raw


def _too_big(source: str) -> str:
    return (
        f"{source}: larger than {MAX_FILE_BYTES // 2**20} MiB, the limit for a spec file (a plan "
        f"is usually under 100 KiB); is it the right file?"
    )


def parse_text(text: str, source: str = "<string>", json_only: bool = False) -> Any:
    """YAML (or, with json_only, JSON) text -> plain data, within the bounds of the module docstring."""
    if len(text) > MAX_FILE_BYTES:
        raise SpecError(_too_big(source))
    data = _parse_json(text, source) if json_only else _parse_yaml(text, source)
    _check_tree(data, source)
    return data


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"{source}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise SpecError(_too_deep(source)) from None
    except ValueError as e:  # Python's int-conversion limit (more than 4300 digits)
        raise SpecError(_bad_number(source, e)) from None


def _parse_yaml(text: str, source: str) -> Any:
    try:
        _scan_yaml_events(text, source)
        return yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 - a SafeLoader (C or Python)
    except SpecError:
        raise
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{source}: malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise SpecError(_too_deep(source)) from None
    except (ValueError, OverflowError) as e:  # a huge int literal, a date like 2020-13-45
        raise SpecError(_bad_number(source, e)) from None


def _scan_yaml_events(text: str, source: str) -> None:
    """Refuse aliases, deep nesting and too many values from the event stream, before anything is composed.

    The composer recurses per level and expands aliases by reference (a "billion laughs" file
    becomes a graph whose walk is exponential); the parser underneath does neither, so scanning
    its events is safe and linear.
    """
    depth = nodes = 0
    for event in yaml.parse(text, Loader=_YAML_LOADER):
        if isinstance(event, yaml.NodeEvent):  # scalars, aliases, sequence and mapping starts
            nodes += 1
            if nodes > MAX_NODES:
                raise SpecError(_too_many(source))
        if isinstance(event, yaml.AliasEvent):
            line = event.start_mark.line + 1 if event.start_mark else "?"
            raise SpecError(
                f"{source}: line {line}: YAML aliases (*{event.anchor}) are not allowed in autoplan "
                f"files; write the value out in full"
            )
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise SpecError(_too_deep(source))
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1


def _check_tree(data: Any, source: str) -> None:
    """Depth, value-count and integer bounds over the parsed data, iteratively (no recursion to overflow)."""
    stack = [(data, 1)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise SpecError(_too_many(source))
        if isinstance(node, (dict, list)):
            if depth > MAX_DEPTH:
                raise SpecError(_too_deep(source))
            children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
            stack.extend((c, depth + 1) for c in children)
        elif isinstance(node, int) and not isinstance(node, bool) and abs(node) > MAX_INT:
            raise SpecError(
                f"{source}: an integer of {node.bit_length()} bits is larger than 2**63 - 1, more "
                f"than any count or byte size autoplan uses; check the file"
            )


def _too_many(source: str) -> str:
    return (
        f"{source}: more than {MAX_NODES:,} values (a large plan has a few thousand); "
        f"is it the right file?"
    )


def _too_deep(source: str) -> str:
    return (
        f"{source}: nested more than {MAX_DEPTH} levels deep (spec files need at most 5); "
        f"is it the right file?"
    )


def _bad_number(source: str, err: Exception) -> str:
    first = (str(err).splitlines() or [""])[0]
    if "integer string conversion" in first:  # Python's limit on int(str) (4300 digits)
        return f"{source}: an integer with thousands of digits; numbers in spec files fit in 64 bits"
    return f"{source}: a value that cannot be converted ({first[:120]}); check the file"


def dump_data(data: Any, path: str | os.PathLike[str]) -> None:
    """Write JSON for *.json, YAML otherwise; atomically (write a temp file, then rename)."""
    p = Path(path)
    if p.suffix.lower() == ".json":
        text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    else:
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)
