"""The statistics benchmarks/fidelity.py reports (ranks with ties, Spearman) against known values."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fidelity import GLOBAL_BATCH, PLANS, ranks, spearman  # noqa: E402


@pytest.mark.tier1
def test_ranks_average_ties():
    assert ranks([10.0, 30.0, 20.0, 20.0]) == [1.0, 4.0, 2.5, 2.5]


@pytest.mark.tier1
def test_spearman_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # textbook example: d^2 sum = 2 for n = 5 -> 1 - 6*2/(5*24) = 0.9
    assert spearman([1, 2, 3, 4, 5], [2, 1, 3, 4, 5]) == pytest.approx(0.9)


@pytest.mark.tier1
def test_fidelity_plans_cover_the_issue_and_the_batch():
    assert len(PLANS) >= 10
    for k in PLANS.values():
        assert k.dp * k.micro_batch_size * k.num_micro_batches == GLOBAL_BATCH
    kinds = {(k.pp > 1, k.tp > 1, k.dp > 1, k.sharding, k.schedule if k.pp > 1 else None) for k in PLANS.values()}
    assert {s for *_, s, _ in kinds} >= {"none", "zero1", "zero2", "zero3"}
    assert {k.schedule for k in PLANS.values() if k.pp > 1} >= {"gpipe", "1f1b", "interleaved_1f1b"}
    assert any(k.recompute == "full" for k in PLANS.values())
    assert len({k.micro_batch_size for k in PLANS.values() if k.pp == 1 and k.tp == 1}) >= 2
