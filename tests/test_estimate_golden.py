"""Tier 1: the cost model's estimates are the recorded ones (tests/data/estimates_golden.json.gz).

Every field of the StepEstimate (and the search's lower bound) of every 20th candidate of
benchmarks/estimate_equality.py's space (GPT-3 175B on 1024 A100 over tp x pp x dp, micro-batch,
ZeRO stage, recompute, sp, schedules; HSDP and offload; a shared-host CPU space): 123 candidates.
A change to any term changes some of them, so this fails until the golden file is rewritten on
purpose, with the change named in the commit:

    .venv/bin/python benchmarks/estimate_equality.py --write tests/data/estimates_golden.json.gz --every 20

(The benchmark checks the whole space bit for bit; here a relative 1e-12 leaves room for a
Python whose float sum() rounds differently, e.g. 3.12's compensated sum.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.estimate_equality import collect, compare, read

pytestmark = pytest.mark.tier1

GOLDEN = Path(__file__).with_name("data") / "estimates_golden.json.gz"


def test_estimates_are_the_recorded_ones(capsys):
    assert compare(read(GOLDEN), collect(every=20), rtol=1e-12) == 0, capsys.readouterr().out
