"""Tier 3 faults under torchrun (CPU, gloo): SIGKILL mid-training and mid-save with
`--max-restarts 1`, resharding a checkpoint across plans, and a hung peer.

A faulted run must end with the same per-step losses (every attempt's, redone steps included)
and the same final checkpoint, entry for entry, as the uninterrupted run; at most
--checkpoint-every steps are redone and none are lost. Scenarios live in tests/fault_runs.py
(also used by benchmarks/reliability_report.py).
"""

from __future__ import annotations

import pytest

from tests import fault_runs as fr

pytestmark = [pytest.mark.tier3, pytest.mark.slow, pytest.mark.xdist_group("launch")]


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    return fr.run_fault_scenarios(tmp_path_factory.mktemp("faults"))


def test_uninterrupted_reference(scenarios):
    s = scenarios["straight"]
    assert s.returncode == 0, s.stderr[-3000:]
    assert s.steps_by_attempt == {0: list(range(1, fr.STEPS + 1))}
    assert s.records[-1]["loss"] != s.records[0]["loss"]  # it trained


@pytest.mark.parametrize("name,first_attempt,redone", [
    ("kill-at-step", [1, 2, 3], 1),       # killed before step 4; step 2's checkpoint: step 3 redone
    ("kill-in-save", [1, 2, 3, 4], 2),    # killed before step 4's commit; resumes at 2: 3, 4 redone
])
def test_killed_run_resumes_and_loses_nothing(scenarios, name, first_attempt, redone):
    ref, run = scenarios["straight"], scenarios[name]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fault injection: rank" in run.stderr and "SIGKILL" in run.stderr
    assert "a collective failed" in run.stderr  # the surviving rank said why, and did not wait
    assert run.steps_by_attempt[0] == first_attempt
    assert run.steps_by_attempt[1] == list(range(first_attempt[-1] - redone + 1, fr.STEPS + 1))
    assert run.steps_redone == redone <= fr.EVERY
    assert run.steps_lost == []
    assert fr.loss_mismatches(ref, run) == []
    diff = fr.final_state_difference(ref, run)
    assert diff["keys"] > 100 and diff["bytes"] > 0
    assert (diff["missing"], diff["differing"], diff["bytes_lost"]) == ([], [], 0)


def test_kill_during_save_keeps_the_last_good_checkpoint(scenarios):
    """The killed save of step 4 never committed: attempt 1 resumed from step 2, and the leftover
    step_4.tmp was replaced by a committed step 4 (every committed checkpoint has its marker)."""
    from runtime.checkpoint import COMMITTED, committed_checkpoints

    run = scenarios["kill-in-save"]
    assert "before its commit" in run.stderr
    ck = run.checkpoint_dir
    assert [s for s, _ in committed_checkpoints(ck)] == [2, 4, 6]
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000002", "step_00000004", "step_00000006"]
    assert all((p / COMMITTED).is_file() for p in ck.iterdir())


def test_checkpoint_reshards_across_plans_with_identical_state(tmp_path):
    """ZeRO-3 on 4 ranks -> PP2 x TP2 on 4 ranks and -> one process: every parameter and optimizer
    state entry of the saved checkpoint comes back bit for bit (re-saved under the new plan)."""
    from runtime.checkpoint import load_full_state, state_difference

    paths = fr.run_reshard(tmp_path)
    a = load_full_state(paths["A"])
    assert any(k.startswith("optim.state.") and k.endswith(".exp_avg") for k in a)
    for name, world in (("pp2tp2", 4), ("one", 1)):
        b = load_full_state(paths[name])
        diff = state_difference(a, b, ignore=fr.reshard_ignore(world))
        assert (diff["missing"], diff["differing"], diff["bytes_lost"]) == ([], [], 0), (name, diff)
        assert diff["bytes"] > 0
        assert int(b["train.step"]) == 2


def test_hung_peer_fails_the_job_within_the_timeout(tmp_path):
    run = fr.run_hang(tmp_path, timeout_s=10.0)
    assert run.returncode != 0
    assert run.wall_s < 120, run.wall_s  # start-up (~5 s idle, ~40 s on a loaded 2-core box) + 10 s timeout
    assert "rank 1 hangs before step 2" in run.stderr
    assert "a collective failed" in run.stderr and "--timeout-s 10 s" in run.stderr, run.stderr[-3000:]
    assert [r["step"] for r in run.records] == [1]
