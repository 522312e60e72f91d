"""Tier 1: the CLI starts without torch where it does not need it (issue 19): `autoplan --help`,
each subcommand's --help, and `explain` / `export` of a plan file import no torch; `planner`'s
public names (autoplan, plan_from_knobs, trace) still work, imported on first use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.tier1

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "docs" / "gpt3-175b.yaml"

PROBE = """
import contextlib, io, json, sys
from planner.cli import main
argv = json.loads(sys.argv[1])
with contextlib.redirect_stdout(io.StringIO()):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
print(json.dumps({"code": code or 0, "torch": "torch" in sys.modules}))
"""


@pytest.mark.parametrize("argv", [
    ["--help"], ["plan", "--help"], ["explain", "--help"], ["run", "--help"],
    ["explain", str(PLAN)], ["export", str(PLAN), "--to", "torchtitan"],
])
def test_no_torch_where_none_is_needed(argv):
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"code": 0, "torch": False}, out.stderr[-2000:]


def test_public_names_are_the_functions():
    import planner
    from planner import autoplan, plan_from_knobs, trace
    from planner.api import autoplan as api_autoplan
    from planner.tracer import trace as tracer_trace

    assert autoplan is api_autoplan and trace is tracer_trace and callable(plan_from_knobs)
    assert planner.trace is tracer_trace
    with pytest.raises(AttributeError):
        _ = planner.not_a_name
