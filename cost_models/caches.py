"""The cost models' memos, in one place: `clear_caches()` forgets them all.

estimate_knobs and friends keep what they compute for reuse (cost_models.blocks.Context per
(graph, hw, train) object: block costs, stage lists, layouts; the simulations, compiled schedule
structures and schedules themselves per process). They are pure memos: clearing them changes no
estimate, only the time the next ones take (cold again) and the memory a long-lived process holds.
benchmarks/cost_bench.py clears them between its cold passes; tests check the values stay the same.
"""

from __future__ import annotations


def clear_caches() -> None:
    """Forget every memo of the cost models; the next estimates start from empty caches."""
    from cost_models import (
        blocks,
        efficiency,
        layout,
        periodic,
        ranks,
        schedules,
        sharedhost,
        simulator,
    )

    blocks._CONTEXTS.clear()  # each context holds its block costs, stage lists, layouts, stage results
    layout._NOTES.clear()
    ranks._rank_stages.cache_clear()
    simulator._CACHE.clear()
    simulator._compiled.cache_clear()
    periodic._BY_M.clear()
    periodic._compiled_rounds.cache_clear()
    schedules.build_schedule.cache_clear()
    efficiency._curve_cached.cache_clear()
    sharedhost._UNSHARED.clear()
    sharedhost._CONTENDED.clear()
