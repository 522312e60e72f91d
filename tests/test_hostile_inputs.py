"""tests/hostile_inputs.py and hostile_verdicts.py, cheaply (issue 20): the catalogue has >= 200
distinct cases, a fixed sample of them answers clearly in time, and each verdict is what the
runner gives.

All cases run in `benchmarks/reliability_report.py` (benchmarks/results/reliability_report.txt).
"""

from __future__ import annotations

import importlib
import time

import pytest

from specs import SpecError
from tests import hostile_inputs as hi
from tests import hostile_verdicts as hv


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return hi.cheap_cases(tmp_path_factory.mktemp("hostile"))  # the report adds the catalogues,
    # `autoplan run` and the fuzzers


def test_at_least_200_distinct_cases(cases):
    assert len(cases) >= 200
    assert len({c.name for c in cases}) == len(cases)
    assert len({c.group for c in cases}) >= 5
    assert hi.KNOWN_DEFECTS <= {c.name for c in cases}


def test_a_fixed_sample_answers_clearly(cases, tmp_path):
    cases = [c for c in cases if c.name not in hi.KNOWN_DEFECTS]
    sample = cases[:: len(cases) // 20]
    results = hv.run_cases(sample, tmp_path)
    bad = [f"{r.verdict} {r.name}: {r.detail}" for r in results if r.verdict != "clear"]
    assert not bad, "\n".join(bad)
    assert len({r.group for r in results}) >= 4


def test_the_verdicts(tmp_path):
    def refuse():
        raise SpecError("x.yaml: mesh.tp: must be > 0 (got 0)")

    def evil_import():
        importlib.import_module(hv.EVIL)

    def slow():
        time.sleep(5)

    cases = [
        hv.api("clear", "t", refuse, ("mesh.tp",)),
        hv.api("needle missing", "t", refuse, ("mesh.dp",)),
        hv.api("two lines", "t", lambda: (_ for _ in ()).throw(SpecError("a\nb"))),
        hv.api("crash", "t", lambda: 1 / 0),
        hv.api("accepted", "t", lambda: 1),
        hv.api("accepted, fine", "t", lambda: 1, expect="either"),
        hv.api("accepted, wrong", "t", lambda: 1, expect="either", wrong=lambda v: "one"),
        hv.api("imports the marker module", "t", evil_import),
        hv.api("slow", "t", slow),
        hv.cli("cli refused", "t", ["plan", "gpt-tiny"], ("--hw",)),
        hv.cli("cli exit 0", "t", ["schema", "plan"]),
    ]
    got = {r.name: r.verdict for r in hv.run_cases(cases, tmp_path, limit_s=0.5)}
    assert got == {
        "clear": "clear", "needle missing": "unclear", "two lines": "unclear", "crash": "crash",
        "accepted": "silent-wrong", "accepted, fine": "clear", "accepted, wrong": "silent-wrong",
        "imports the marker module": "code-executed", "slow": "hang", "cli refused": "clear",
        "cli exit 0": "silent-wrong",
    }


def test_found_by_the_catalogue(tmp_path, capsys):
    """Defects the catalogue found: a FIFO with no writer hung every loader; `explain --top-k -3`
    showed all but 3 alternatives; argparse's errors came with a usage block."""
    import os

    from planner.cli import main

    fifo = tmp_path / "plan.yaml"
    os.mkfifo(fifo)
    assert main(["explain", str(fifo)]) == 2
    assert "is a pipe or socket" in capsys.readouterr().err
    for argv in (["explain", str(fifo), "--top-k", "-3"], ["plan", "gpt-tiny", "--hw", "cpu:2", "--batch", "x"],
                 ["plna"]):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("autoplan"), err
