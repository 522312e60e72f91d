"""`autoplan run PLAN --model REF`: every launch check answers in one line (exit 2) before any
process starts; a good launch trains under torchrun; a failing worker shows its own line, not
torchrun's ChildFailedError report; README's "Running a plan" runs as written.

Bad launches run in this process through planner.cli.main with torchrun replaced by a trap
(tier 1, after one warm-up import); two launches start torchrun for real (tier 3).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from planner import cli, run_cmd
from specs import Plan
from tests.runtime_plans import make_plan

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ factories the cases name
def no_loss_model():
    """A model factory without a loss: runtime.launch refuses to train it."""
    return nn.Linear(4, 4), (torch.zeros(2, 4),)


not_callable = 3


def failing_batches(batch_size: int, seed: int):
    """A dataset that fails when its first batch is read."""
    raise ValueError("corrupt record 7 in shard 0")
    yield  # a generator: the factory itself returns fine


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_fingerprint() -> str:
    """gpt-tiny's fingerprint; also imports and warms what the checks use, so that the timed
    cases below measure the checks and not the first `import torch`."""
    from planner import trace
    from planner.models import build_model

    built = build_model("gpt-tiny", device="meta")
    return trace(built.module, built.example_inputs).fingerprint


@pytest.fixture
def trap(monkeypatch):
    """torchrun replaced: a call is recorded (and returns 0); no process may start."""
    started: list[list[str]] = []

    def fake_torchrun(cmd, nproc):
        started.append(cmd)
        return 0

    def no_popen(*a, **k):
        raise AssertionError(f"a process was started: {a}")

    monkeypatch.setattr(run_cmd, "_start_torchrun", fake_torchrun)
    monkeypatch.setattr(subprocess, "Popen", no_popen)
    return started


def _run(argv: list[str], capsys) -> tuple[int, list[str], float]:
    t0 = time.perf_counter()
    try:
        rc = cli.main(["run", *argv])
    except SystemExit as e:  # argparse's errors
        rc = e.code
    elapsed = time.perf_counter() - t0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return rc, err, elapsed


# (arguments after `run`, text the one line must contain); {tmp} is the test's folder
BAD_LAUNCHES = [
    (["{tmp}/p8.yaml", "--model", "gpt-tiny", "--nproc", "4"],
     "the plan {tmp}/p8.yaml is for 8 processes (pp(1) * dp(8) * tp(1) = 8), not 4; make a plan for "
     "this machine: autoplan plan gpt-tiny --hw cpu:4 -o plan-4.yaml"),
    (["{tmp}/big.yaml", "--model", "gpt-tiny"],
     "the plan is for 1024 processes (pp(1) * dp(1024) * tp(1) = 1024) on 128 nodes"),
    (["{tmp}/p2.yaml", "--model", "gpt-tiny", "--nproc", "0"], "--nproc: must be >= 1 (got 0)"),
    (["{tmp}/p2.yaml", "--model", "gpt-tiny", "--steps", "-1"], "--steps: must be >= 0 (got -1)"),
    (["{tmp}/p2.yaml", "--model", "gpt-tiny", "--checkpoint-every", "-1"],
     "--checkpoint-every: must be >= 0 (got -1)"),
    (["{tmp}/p2.yaml", "--model", "gpt-tiny", "--checkpoint-every", "2"],
     "--checkpoint-every needs --checkpoint-dir"),
    (["{tmp}/p2.yaml", "--model", "gpt-tiny", "--timeout-s", "0"], "--timeout-s: must be > 0 seconds"),
    (["{tmp}/p2.yaml", "--model", "gpt-tiny", "--lr", "nan"], "--lr: must be a finite number >= 0"),
    (["{tmp}/p2.yaml", "--model", "gpt-tiny", "--seed", str(2**64)], "--seed: must be between"),
    (["{tmp}/p2.yaml", "--model", "gpt-tiny", "--max-restarts", "-2"], "--max-restarts: must be >= 0"),
    (["{tmp}/p2.yaml", "--model", "gpt-tiny", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["{tmp}/p2.yaml", "--model", "gpt-tiny", "--stpes", "3"], "unrecognized arguments: --stpes 3"),
    (["{tmp}/p2.yaml"], "the following arguments are required: --model"),
    (["{tmp}/missing.yaml", "--model", "gpt-tiny"], "missing.yaml"),
    (["{tmp}/notaplan.yaml", "--model", "gpt-tiny"], "mesh"),
    (["{tmp}/p2.yaml", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["{tmp}/p2.yaml", "--model", "tests.no_such_module:build"], "cannot import module 'tests.no_such_module'"),
    (["{tmp}/p2.yaml", "--model", "tests.test_autoplan_run:no_loss_model"], "and no loss; to train"),
    (["{tmp}/fp.yaml", "--model", "gpt-small"],
     "was made for gpt-tiny (fingerprint {fp}), this model traces to"),
    (["{tmp}/p2.yaml", "--model", "gpt-tiny", "--data", "tests.no_such_data:fn"],
     "--data tests.no_such_data:fn: cannot import module 'tests.no_such_data'"),
    (["{tmp}/p2.yaml", "--model", "gpt-tiny", "--data", "tests.test_autoplan_run:not_callable"],
     "has no callable 'not_callable'"),
    (["{tmp}/p2.yaml", "--model", "gpt-tiny", "--data", "tests.test_autoplan_run"],
     "name the dataset factory as package.module:function"),
    (["{tmp}/p2.yaml", "--model", "gpt-tiny", "--checkpoint-dir", "{tmp}/afile/ck"],
     "--checkpoint-dir {tmp}/afile/ck: cannot write checkpoints there"),
    (["{tmp}/p2.yaml", "--model", "gpt-tiny", "--resume"], "--resume needs --checkpoint-dir"),
    (["{tmp}/p2.yaml", "--model", "gpt-tiny", "--resume", "--checkpoint-dir", "{tmp}/mistyped"],
     "--checkpoint-dir {tmp}/mistyped does not exist; nothing to resume from"),
    (["{tmp}/p2.yaml", "--model", "gpt-tiny", "--resume", "--checkpoint-dir", "{tmp}/empty"],
     "holds no committed checkpoint"),
    (["{tmp}/p2.yaml", "--model", "gpt-tiny", "--resume-from", "{tmp}/empty"],
     "not a committed checkpoint (no COMMITTED marker)"),
    (["{tmp}/p2.yaml", "--model", "gpt-tiny", "--log-file", "{tmp}/missing/log.jsonl"],
     "--log-file {tmp}/missing/log.jsonl: cannot open it for appending (FileNotFoundError"),
]


def _write_plans(tmp: Path, fingerprint: str) -> None:
    make_plan("gpt-tiny", dp=2).to_file(tmp / "p2.yaml")
    make_plan("gpt-tiny", dp=8).to_file(tmp / "p8.yaml")
    make_plan("gpt-tiny", dp=2, fingerprint=fingerprint).to_file(tmp / "fp.yaml")
    big = make_plan("gpt-tiny", dp=1024, global_batch_size=1024).model_dump(mode="json")
    big["hardware"].update(num_nodes=128, devices_per_node=8)
    Plan.from_dict(big).to_file(tmp / "big.yaml")
    (tmp / "notaplan.yaml").write_text("version: 1\nmodel: {name: x}\n")
    (tmp / "afile").write_text("x")
    (tmp / "empty").mkdir()
    (tmp / "empty" / "step_00000002.tmp").mkdir()  # uncommitted: not a checkpoint


@pytest.mark.parametrize("argv,needle", BAD_LAUNCHES, ids=[" ".join(a[1:]) or "no-model" for a, _ in BAD_LAUNCHES])
def test_a_bad_launch_is_one_line_before_any_process(tmp_path, capsys, trap, tiny_fingerprint, argv, needle):
    _write_plans(tmp_path, tiny_fingerprint)
    rc, err, elapsed = _run([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("autoplan run: error: "), err
    assert needle.replace("{tmp}", str(tmp_path)).replace("{fp}", tiny_fingerprint) in err[0], err[0]
    assert trap == []  # torchrun never started
    assert elapsed < 10, f"{elapsed:.1f} s"
    assert not (tmp_path / "missing").exists() and not (tmp_path / "mistyped").exists()


def test_there_are_enough_bad_launches():
    assert len(BAD_LAUNCHES) >= 12


def test_a_good_launch_starts_torchrun_with_the_plans_world_and_the_same_options(
        tmp_path, capsys, trap, tiny_fingerprint):
    from runtime.launch import parse_args

    _write_plans(tmp_path, tiny_fingerprint)
    log = tmp_path / "log.jsonl"
    argv = [str(tmp_path / "fp.yaml"), "--model", "gpt-tiny", "--steps", "7", "--lr", "1e-3", "--seed", "-5",
            "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "2", "--log-file", str(log),
            "--skip-nonfinite", "--timeout-s", "60", "--max-restarts", "1"]
    rc, err, _ = _run(argv, capsys)
    assert rc == 0 and err == [] and len(trap) == 1
    cmd = trap[0]
    assert cmd[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                       "--max-restarts=1"]
    i = cmd.index("runtime.launch")
    launched, typed = parse_args(cmd[i + 1:]), parse_args(argv[:-2])  # runtime.launch reads the same values
    assert vars(launched) == vars(typed)
    assert not log.exists()  # the probe left nothing behind


def test_dry_run_prints_the_command_and_starts_nothing(tmp_path, capsys, trap, tiny_fingerprint):
    _write_plans(tmp_path, tiny_fingerprint)
    assert cli.main(["run", str(tmp_path / "p2.yaml"), "--model", "gpt-tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--nproc-per-node=2 -m runtime.launch" in out and trap == []


def test_the_checkpoint_layout_is_read_alike_by_both_launchers(tmp_path):
    from runtime.checkpoint import COMMITTED, committed_checkpoints
    from specs.launch_args import has_committed_checkpoint

    layouts = {"none": [], "tmp": ["step_00000002.tmp/"], "uncommitted": ["step_00000002/"],
               "marker-is-dir": [f"step_00000002/{COMMITTED}/"], "committed": [f"step_00000002/{COMMITTED}"],
               "other-name": [f"ckpt_2/{COMMITTED}"], "afile": None}
    for name, paths in layouts.items():
        d = tmp_path / name
        if paths is None:
            d.write_text("x")
        else:
            d.mkdir()
        for rel in paths or []:
            (d / rel).mkdir(parents=True) if rel.endswith("/") else (
                (d / rel).parent.mkdir(parents=True, exist_ok=True), (d / rel).write_text("{}"))
        assert has_committed_checkpoint(d) == bool(committed_checkpoints(d)), name
    assert has_committed_checkpoint(tmp_path / "committed")


# ------------------------------------------------------------------ torchrun's stderr
_TORCHRUN_FAILURE = """\
/work/main/runtime/data_parallel.py:101: FutureWarning: `broadcast_buffers` is deprecated.
  return DDP(model, process_group=meshes.dp.get_group(), broadcast_buffers=False)
runtime.launch: error: --data nosuch.mod:fn: cannot load the dataset factory: No module named 'nosuch'
runtime.launch: error: --data nosuch.mod:fn: cannot load the dataset factory: No module named 'nosuch'
W1207 22:18:46.891000 16700 .venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 16782 closing signal SIGTERM
E1207 22:18:46.904000 16700 .venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 2) local_rank: 0 (pid: 16781) of binary: /work/main/.venv/bin/python
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/work/main/.venv/lib/python3.11/site-packages/torch/distributed/run.py", line 1142, in <module>
    main()
  File "/work/main/.venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 386, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
runtime.launch FAILED
------------------------------------------------------------
Failures:
[1]:
  rank      : 1 (local_rank: 1)
  exitcode  : 1 (pid: 16782)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : {code} (pid: 16781)
============================================================
"""


def _filtered(text: str, rc: int) -> tuple[str, int]:
    import io

    out = io.StringIO()
    f = run_cmd._TorchrunStderr(out)
    for line in text.splitlines(keepends=True):
        f.feed(line)
    code = f.finish(rc)
    return out.getvalue(), code


def test_torchruns_report_is_left_out_and_the_workers_code_returned():
    text, rc = _filtered(_TORCHRUN_FAILURE.replace("{code}", "2"), 1)
    assert rc == 2
    assert text.count("runtime.launch: error: --data nosuch.mod:fn") == 1
    assert "FutureWarning" in text  # the workers' own output stays
    for noise in ("ChildFailedError", "Traceback", "closing signal", "failed (exitcode", "====", "Root Cause"):
        assert noise not in text, noise


def test_a_worker_killed_by_a_signal_gets_one_line_of_ours():
    report = _TORCHRUN_FAILURE.replace("{code}", "-9")
    report = "\n".join(x for x in report.splitlines() if not x.startswith("runtime.launch")) + "\n"
    text, rc = _filtered(report, 1)
    assert rc == 128 + 9
    assert text.strip().splitlines()[-1] == ("autoplan run: error: a worker was killed by SIGKILL (the other "
                                             "ranks were stopped)")


def test_a_workers_own_traceback_is_kept():
    worker = ("Traceback (most recent call last):\n  File \"/work/main/runtime/launch.py\", line 5, in <module>\n"
              "    boom()\nKeyError: 'x'\n")
    text, _ = _filtered(worker + _TORCHRUN_FAILURE.replace("{code}", "1"), 1)
    assert worker in text and "ChildFailedError" not in text


# ------------------------------------------------------------------ README
def _readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Running a plan")
    section = text[start:text.index("\n## ", start + 1)]
    return re.findall(r"```\n(.*?)```", section, re.S)


def test_readme_running_a_plan_runs_as_written(tmp_path, capsys, trap, monkeypatch):
    """Its commands, in its folder: the plan and the checks for real, torchrun trapped (the
    tier-3 tests below start it); the 1024-GPU plan on 4 processes prints README's line."""
    monkeypatch.chdir(tmp_path)
    blocks = _readme_blocks()
    first = [shlex.split(c.split("  #")[0]) for c in blocks[0].splitlines() if c.strip()]
    assert [c[:2] for c in first] == [["autoplan", "plan"], ["autoplan", "run"]]
    for argv in first:
        assert cli.main(argv[1:]) == 0, argv
    assert len(trap) == 1 and "--nproc-per-node=4" in trap[0]
    capsys.readouterr()
    lines = blocks[1].splitlines()
    commands = [shlex.split(x[2:]) for x in lines if x.startswith("$ ")]
    shown = [x for x in lines if x.strip() and not x.startswith("$ ")]
    assert cli.main(commands[0][1:]) == 0
    capsys.readouterr()
    assert cli.main(commands[1][1:]) == 2
    assert capsys.readouterr().err.splitlines() == shown
    assert len(trap) == 1


def test_one_bad_launch_from_the_shell_is_one_line(tmp_path, tiny_fingerprint):
    """As a user types it: a separate process, no torchrun, one line on stderr, exit 2."""
    _write_plans(tmp_path, tiny_fingerprint)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "planner.cli", "run", str(tmp_path / "p8.yaml"), "--model",
                          "gpt-tiny", "--nproc", "4"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and "is for 8 processes" in out.stderr, out.stderr
    assert time.perf_counter() - t0 < 60  # an import of torch; 8 workers would take far longer


# ------------------------------------------------------------------ tier 3: torchrun for real
def _autoplan_run(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "planner.cli", "run", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.tier3
@pytest.mark.xdist_group("launch")
def test_a_planned_gpt_tiny_trains_on_two_processes(tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    assert cli.main(["plan", "gpt-tiny", "--hw", "cpu:2", "--batch", "8", "-o", str(plan), "--format",
                     "json"]) == 0
    capsys.readouterr()
    assert Plan.from_file(plan).model.fingerprint != "*"  # the fingerprint is checked
    log = tmp_path / "log.jsonl"
    out = _autoplan_run(tmp_path, str(plan), "--model", "gpt-tiny", "--steps", "2", "--log-file", str(log))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world=2" in out.stdout and len(log.read_text().splitlines()) == 2
    assert "torchrun" not in out.stderr and "Traceback" not in out.stderr


@pytest.mark.tier3
@pytest.mark.xdist_group("launch")
def test_a_failing_worker_shows_its_line_not_childfailederror(tmp_path):
    plan = tmp_path / "plan.yaml"
    make_plan("gpt-tiny", dp=2, sharding="zero2").to_file(plan)
    out = _autoplan_run(tmp_path, str(plan), "--model", "gpt-tiny", "--steps", "2",
                        "--data", "tests.test_autoplan_run:failing_batches")
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert lines == ["runtime.launch: error: --data tests.test_autoplan_run:failing_batches: the dataset raised "
                     "ValueError: corrupt record 7 in shard 0 reading batch 1 (step 1); fix the dataset factory"], lines
