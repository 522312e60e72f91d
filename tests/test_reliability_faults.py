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

pytestmark = [pytest.mark.tier3, pytest.mark.slow]
# The tests that share the module fixtures' runs (scenarios, integrity) run on one xdist worker;
# the others (each its own runs) are scheduled alone, so the two workers can share them.
SHARED_RUNS = pytest.mark.xdist_group("faults")


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    return fr.run_fault_scenarios(tmp_path_factory.mktemp("faults"))


@SHARED_RUNS
def test_uninterrupted_reference(scenarios):
    s = scenarios["straight"]
    assert s.returncode == 0, s.stderr[-3000:]
    assert s.steps_by_attempt == {0: list(range(1, fr.STEPS + 1))}
    assert s.records[-1]["loss"] != s.records[0]["loss"]  # it trained


@SHARED_RUNS
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


@SHARED_RUNS
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


# ------------------------------------------------------------------ issue 20: integrity, NaN, launcher faults
def _our_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("runtime.launch:")]


@pytest.fixture(scope="module")
def integrity(scenarios, tmp_path_factory):
    return fr.run_integrity_scenarios(tmp_path_factory.mktemp("integrity"), scenarios["straight"])


@SHARED_RUNS
def test_damaged_checkpoints_are_named_and_the_run_falls_back_to_the_newest_intact(scenarios, integrity):
    """Step 6 (flipped bytes, same size) and step 4 (truncated) are rejected by name; the run resumes
    from step 2 and ends exactly as the uninterrupted run: same losses for steps 3-6 and the same
    final state bit for bit, so step 2 loaded the parameters it had saved."""
    from runtime.checkpoint import verify_checkpoint

    ref, (run, files) = scenarios["straight"], integrity["fallback"]
    assert run.returncode == 0, run.stderr[-3000:]
    lines = _our_lines(run.stderr)
    assert any(str(files[0]) in ln and "sha256 differs from the manifest (same size" in ln for ln in lines), lines
    assert any(str(files[1]) in ln and "truncated or extended" in ln for ln in lines), lines
    assert any("falling back to the newest intact checkpoint" in ln and ln.endswith("step_00000002") for ln in lines)
    assert "PytorchStreamReader" not in run.stderr
    assert [r["step"] for r in run.records] == [3, 4, 5, 6]
    assert fr.loss_mismatches(ref, run) == []
    diff = fr.final_state_difference(ref, run)
    assert diff["bytes"] > 0 and (diff["missing"], diff["differing"], diff["bytes_lost"]) == ([], [], 0)
    for s in (4, 6):  # the damaged ones were replaced by intact re-saves
        assert verify_checkpoint(run.checkpoint_dir / f"step_{s:08d}").intact


@SHARED_RUNS
def test_no_intact_checkpoint_stops_with_one_line(integrity):
    run, files = integrity["none-intact"]
    assert run.returncode != 0
    lines = _our_lines(run.stderr)
    assert len(lines) == 1, lines
    assert "no intact checkpoint to resume from, all 3 committed ones are damaged" in lines[0]
    assert all(str(f) in lines[0] for f in files), lines[0]
    assert "PytorchStreamReader" not in run.stderr and run.records == []


@SHARED_RUNS
def test_nan_loss_stops_the_run_before_any_save(scenarios, tmp_path):
    """NaN at step 5 on rank 1: exit non-zero, one line naming step 5, steps 1-4 as the reference,
    checkpoints 2 and 4 only, and step 4's is intact and equal to the uninterrupted run's."""
    from runtime.checkpoint import (
        committed_checkpoints,
        load_full_state,
        state_difference,
        verify_checkpoint,
    )

    ref = scenarios["straight"]
    runs = fr.run_nonfinite(tmp_path)
    stop = runs["nan-stop"]
    assert stop.returncode != 0 and "exitcode  : 3" in stop.stderr, stop.stderr[-3000:]
    lines = _our_lines(stop.stderr)
    assert len(lines) == 1 and "step 5: non-finite loss (nan)" in lines[0], lines
    assert [r["step"] for r in stop.records] == [1, 2, 3, 4] and fr.loss_mismatches(ref, stop) == []
    assert [s for s, _ in committed_checkpoints(stop.checkpoint_dir)] == [2, 4]
    assert sorted(p.name for p in stop.checkpoint_dir.iterdir()) == ["step_00000002", "step_00000004"]
    last = stop.checkpoint_dir / "step_00000004"
    assert verify_checkpoint(last).intact
    diff = state_difference(load_full_state(ref.checkpoint_dir / "step_00000004"), load_full_state(last))
    assert diff["bytes_lost"] == 0, diff

    skip = runs["nan-skip"]
    assert skip.returncode == 0, skip.stderr[-3000:]
    assert [r["step"] for r in skip.records] == list(range(1, fr.STEPS + 1))
    assert [r["step"] for r in skip.records if r.get("skipped")] == [3]
    assert skip.records[2]["loss"] is None and all(r["loss"] is not None for r in skip.records if r["step"] != 3)
    assert fr.loss_mismatches(ref, fr.FaultRun("first", 0, 0, skip.records[:2], skip.checkpoint_dir, "")) == []
    assert any("skipped 1 step(s) with a non-finite loss or gradient norm: [3]" in ln for ln in _our_lines(skip.stderr))
    assert [s for s, _ in committed_checkpoints(skip.checkpoint_dir)] == [2, 4, 6]
    final = load_full_state(skip.checkpoint_dir / "step_00000006")
    assert all(v.isfinite().all() for v in final.values() if hasattr(v, "isfinite") and v.is_floating_point())


def test_workers_die_with_their_launcher(tmp_path):
    import signal

    out = fr.run_signalled_launcher(tmp_path, signal.SIGKILL, "killed-launcher")
    assert len(out["workers"]) == 2 and out["steps_before"] >= 1, out
    assert out["alive"] == [], out
    assert out["steps_after"] == 0


def test_ctrl_c_prints_one_line_per_job(tmp_path):
    import signal

    out = fr.run_signalled_launcher(tmp_path, signal.SIGINT, "sigint")
    assert out["alive"] == [] and out["returncode"] != 0, out
    lines = _our_lines(out["stderr"])
    assert len(lines) == 1 and lines[0].startswith("runtime.launch: interrupted by SIGINT during step"), lines
    assert "KeyboardInterrupt" not in out["stderr"]
    assert out["stderr"].count("Traceback") <= 1  # torchrun's own (SignalException), none from the workers
