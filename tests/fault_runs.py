"""Fault-injection runs of `runtime.launch` under torchrun (CPU, gloo), shared by
tests/test_reliability_faults.py and benchmarks/reliability_report.py.

Each scenario trains gpt-tiny in float64 under ZeRO-3 on 2 processes for STEPS steps with a
checkpoint every EVERY steps, and is compared with an uninterrupted run of the same command:
- per step: the loss of every attempt that ran it (a redone step must reproduce its loss);
- at the end: the final committed checkpoints, entry by entry (runtime.checkpoint.state_difference),
  so "bytes of state lost" is measured, not asserted.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 6, 2
COMMON = ["--model", "gpt-tiny", "--dtype", "float64", "--lr", "1e-2"]


def torchrun(nproc: int, args: list[str], *, max_restarts: int = 0, timeout_s: float = 300,
             check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.2", "-m", "runtime.launch", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def write_plans(directory: Path) -> dict[str, Path]:
    """Plan files: zero3 on 2 and 4 ranks, PP2 x TP2, and one process."""
    from tests.runtime_plans import make_plan

    plans = {
        "zero3x2": make_plan("gpt-tiny", dp=2, sharding="zero3"),
        "zero3x4": make_plan("gpt-tiny", dp=4, sharding="zero3"),
        "pp2tp2": make_plan("gpt-tiny", pp=2, tp=2, tp_styles="gpt", num_micro_batches=2),
        "one": make_plan("gpt-tiny"),
    }
    out = {}
    for name, plan in plans.items():
        out[name] = directory / f"{name}.yaml"
        plan.to_file(out[name])
    return out


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@dataclass
class FaultRun:
    name: str
    returncode: int
    wall_s: float
    records: list[dict]
    checkpoint_dir: Path
    stderr: str
    steps_by_attempt: dict[int, list[int]] = field(default_factory=dict)

    @property
    def steps_redone(self) -> int:
        return len(self.records) - len({r["step"] for r in self.records})

    @property
    def steps_lost(self) -> list[int]:
        return sorted(set(range(1, STEPS + 1)) - {r["step"] for r in self.records})


def run_training(tmp: Path, name: str, plan: Path, extra: list[str], *, max_restarts: int = 0) -> FaultRun:
    ck, log = tmp / f"{name}-ck", tmp / f"{name}.jsonl"
    t0 = time.perf_counter()
    proc = torchrun(2, [str(plan), *COMMON, "--steps", str(STEPS), "--checkpoint-dir", str(ck),
                        "--checkpoint-every", str(EVERY), "--log-file", str(log), *extra],
                    max_restarts=max_restarts, check=False)
    records = read_log(log)
    by_attempt: dict[int, list[int]] = {}
    for r in records:
        by_attempt.setdefault(r["attempt"], []).append(r["step"])
    return FaultRun(name, proc.returncode, time.perf_counter() - t0, records, ck, proc.stderr, by_attempt)


def loss_mismatches(reference: FaultRun, run: FaultRun, rel: float = 1e-12) -> list[str]:
    """Steps (of any attempt) whose loss differs from the uninterrupted run's."""
    ref = {r["step"]: r["loss"] for r in reference.records}
    return [f"step {r['step']} attempt {r['attempt']}: {r['loss']!r} vs {ref.get(r['step'])!r}"
            for r in run.records if r["step"] not in ref or abs(r["loss"] - ref[r["step"]]) > rel * abs(ref[r["step"]])]


def final_state_difference(reference: FaultRun, run: FaultRun) -> dict:
    from runtime.checkpoint import latest_checkpoint, load_full_state, state_difference

    ref_ck, run_ck = latest_checkpoint(reference.checkpoint_dir), latest_checkpoint(run.checkpoint_dir)
    assert ref_ck is not None and run_ck is not None, (ref_ck, run_ck)
    assert ref_ck.name == run_ck.name == f"step_{STEPS:08d}", (ref_ck, run_ck)
    return state_difference(load_full_state(ref_ck), load_full_state(run_ck))


def run_fault_scenarios(tmp: Path) -> dict:
    """The uninterrupted run and the two killed runs. Returns {name: FaultRun}."""
    plans = write_plans(tmp)
    straight = run_training(tmp, "straight", plans["zero3x2"], [])
    kill_step = run_training(tmp, "kill-at-step", plans["zero3x2"], ["--fault-kill-at-step", "4"], max_restarts=1)
    kill_save = run_training(tmp, "kill-in-save", plans["zero3x2"], ["--fault-kill-in-save", "4", "--fault-rank", "0"],
                             max_restarts=1)
    return {"straight": straight, "kill-at-step": kill_step, "kill-in-save": kill_save}


def run_reshard(tmp: Path) -> dict:
    """Save under ZeRO-3 on 4 ranks, load and re-save under PP2 x TP2 (4 ranks) and one process.
    Returns {"A": path, "pp2tp2": path, "one": path} of the three committed checkpoints."""
    from runtime.checkpoint import latest_checkpoint

    plans = write_plans(tmp)
    a_dir = tmp / "reshard-A"
    torchrun(4, [str(plans["zero3x4"]), *COMMON, "--steps", "2", "--checkpoint-dir", str(a_dir)])
    a = latest_checkpoint(a_dir)
    out = {"A": a}
    for name, nproc in (("pp2tp2", 4), ("one", 1)):
        d = tmp / f"reshard-{name}"
        torchrun(nproc, [str(plans[name]), *COMMON, "--steps", "2", "--resume-from", str(a), "--checkpoint-dir", str(d)])
        out[name] = latest_checkpoint(d)
    return out


def reshard_ignore(world_size: int):
    """Entries that legitimately differ between plans: the per-stage parameter-name lists of
    param groups, and RNG states of ranks that do not exist in the smaller world."""
    def ignore(key: str) -> bool:
        if key.endswith(".params") and key.startswith("optim.param_groups."):
            return True
        return key.startswith("rng.rank") and int(key[len("rng.rank"):]) >= world_size
    return ignore


def run_hang(tmp: Path, timeout_s: float = 10.0) -> FaultRun:
    """Rank 1 hangs before step 2; rank 0 must fail after the collective timeout."""
    plans = write_plans(tmp)
    log = tmp / "hang.jsonl"
    t0 = time.perf_counter()
    proc = torchrun(2, [str(plans["zero3x2"]), *COMMON, "--steps", "4", "--fault-hang-at-step", "2",
                        "--timeout-s", str(timeout_s), "--log-file", str(log)], check=False, timeout_s=180)
    return FaultRun("hang", proc.returncode, time.perf_counter() - t0, read_log(log), tmp, proc.stderr)


# ------------------------------------------------------------------ integrity and launch faults (issue 20)
def damage(path: Path, how: str) -> Path:
    """Damage one file of checkpoint `path` in place; returns the file. how: "flip" (bytes of
    rank 1's shard inverted, same size), "truncate" (rank 0's shard cut to half), "metadata"
    (bytes of .metadata inverted, same size)."""
    target = path / {"flip": "__1_0.distcp", "truncate": "__0_0.distcp", "metadata": ".metadata"}[how]
    data = bytearray(target.read_bytes())
    if how == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
        return target
    mid = len(data) // 2
    for i in range(mid, mid + 8):
        data[i] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def copy_checkpoints(run: FaultRun, dst: Path) -> Path:
    import shutil

    shutil.copytree(run.checkpoint_dir, dst)
    return dst


def run_resume(tmp: Path, name: str, plan: Path, ck: Path, extra: list[str] | None = None) -> FaultRun:
    """--resume from `ck` (damaged by the caller) and train to STEPS."""
    log = tmp / f"{name}.jsonl"
    t0 = time.perf_counter()
    proc = torchrun(2, [str(plan), *COMMON, "--steps", str(STEPS), "--checkpoint-dir", str(ck), "--checkpoint-every",
                        str(EVERY), "--resume", "--log-file", str(log), *(extra or [])], check=False)
    return FaultRun(name, proc.returncode, time.perf_counter() - t0, read_log(log), ck, proc.stderr,
                    {0: [r["step"] for r in read_log(log)]})


def run_integrity_scenarios(tmp: Path, straight: FaultRun) -> dict:
    """Two resumes from copies of the uninterrupted run's checkpoints (steps 2, 4, 6):
    "fallback": step 6 with flipped bytes in rank 1's shard, step 4 with rank 0's shard truncated:
      both must be named and the run must resume from step 2 and end as the uninterrupted run;
    "none-intact": the .metadata of all three flipped: one line, exit non-zero, nothing trained.
    Returns {name: (FaultRun, [damaged files])}."""
    tmp.mkdir(parents=True, exist_ok=True)
    plans = write_plans(tmp)
    out = {}
    ck = copy_checkpoints(straight, tmp / "fallback-ck")
    files = [damage(ck / "step_00000006", "flip"), damage(ck / "step_00000004", "truncate")]
    out["fallback"] = (run_resume(tmp, "fallback", plans["zero3x2"], ck), files)
    ck = copy_checkpoints(straight, tmp / "none-intact-ck")
    files = [damage(ck / f"step_{s:08d}", "metadata") for s in (2, 4, 6)]
    out["none-intact"] = (run_resume(tmp, "none-intact", plans["zero3x2"], ck), files)
    return out


def run_nonfinite(tmp: Path) -> dict:
    """NaN loss injected on rank 1: at step 5 (stops; checkpoints 2 and 4 only), and at step 3
    with --skip-nonfinite (skipped, the run goes on to step 6)."""
    tmp.mkdir(parents=True, exist_ok=True)
    plans = write_plans(tmp)
    return {"nan-stop": run_training(tmp, "nan-stop", plans["zero3x2"], ["--fault-nan-at-step", "5"]),
            "nan-skip": run_training(tmp, "nan-skip", plans["zero3x2"],
                                     ["--fault-nan-at-step", "3", "--skip-nonfinite"])}


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run_signalled_launcher(tmp: Path, sig: int, name: str, wait_s: float = 20.0) -> dict:
    """Start a long 2-process run, wait for its first logged step, send `sig` to the torchrun
    process, and watch its workers for `wait_s` s. Returns {"workers", "alive" (still alive
    after wait_s), "gone_after_s", "steps_before", "steps_after" (logged steps then and 5 s
    later), "stderr", "returncode"}."""
    import signal as _signal

    tmp.mkdir(parents=True, exist_ok=True)
    plans = write_plans(tmp)
    log = tmp / f"{name}.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--monitor-interval=0.2", "-m", "runtime.launch", str(plans["zero3x2"]), *COMMON,
           "--steps", "1000000", "--log-file", str(log)]
    err = tmp / f"{name}.stderr"
    workers: list[int] = []
    with open(err, "w") as ferr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                stdout=subprocess.DEVNULL, stderr=ferr, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while not read_log(log) and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.2)
            workers = _children(proc.pid)
            steps_before = len(read_log(log))
            t0 = time.monotonic()
            proc.send_signal(sig)
            if sig == _signal.SIGKILL:
                proc.wait()
            while any(_alive(w) for w in workers) and time.monotonic() - t0 < wait_s:
                time.sleep(0.1)
            gone_after = time.monotonic() - t0
            alive = [w for w in workers if _alive(w)]
            n_then = len(read_log(log))
            time.sleep(2.0 if not alive else 5.0)
            steps_after = len(read_log(log)) - n_then
            rc = proc.wait(timeout=60)
        finally:
            for w in _children(proc.pid) + [w for w in workers if _alive(w)]:
                with contextlib.suppress(OSError):
                    os.kill(w, _signal.SIGKILL)
            if proc.poll() is None:
                proc.kill()
    return {"workers": workers, "alive": alive, "gone_after_s": gone_after, "steps_before": steps_before,
            "steps_after": steps_after, "stderr": err.read_text(), "returncode": rc}
