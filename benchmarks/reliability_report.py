"""Reliability report (issue 8): bad inputs, injected faults, steps redone, bytes of state lost.

    .venv/bin/python benchmarks/reliability_report.py [--skip-faults]

Last output: benchmarks/results/reliability_report.txt. The closing line counts every case (bad
inputs and faults) by verdict, the faults survived and the bytes of state lost.

1. Bad inputs (issue 20): every case of tests/hostile_inputs.py (the catalogues of
   tests/test_bad_inputs.py and of `autoplan run`'s bad launches, each numeric field of a hardware
   file set to 0, -1, nan, inf, 1e308, a word, a list or left out, unknown keys and wrong nesting,
   each knob of a plan file broken alone, plans and hardware files naming code, bad CLI arguments of
   every command, the loaders' bounds, and a fixed sample of the hypothesis fuzzers), each in this
   process under a 10 s alarm, with a module on sys.path whose import writes a marker file and
   os.system / os.abort / os.popen / subprocess.call / torchrun's start replaced by recorders.
   Verdicts: clear, unclear, crash, hang, silent-wrong, code-executed (tests/hostile_verdicts.py).
2. Faults (torchrun, CPU gloo, gpt-tiny float64, ZeRO-3 on 2 ranks, 6 steps, checkpoint every 2;
   tests/fault_runs.py): SIGKILL of rank 1 before step 4, SIGKILL of rank 0 between writing
   step 4's checkpoint and committing it (both under --max-restarts 1), a rank hanging (10 s
   collective timeout), and a checkpoint saved under ZeRO-3 x4 loaded under PP2 x TP2 and one
   process. "Bytes of state lost" compares the final committed checkpoint of each faulted run
   with the uninterrupted run's, entry by entry (runtime.checkpoint.state_difference): bytes of
   entries missing or not bit-identical.
3. Integrity and launch faults (issue 20): every kind of checkpoint damage on a one-rank checkpoint
   (flipped bytes in a shard with the same size, truncated or extended shard, flipped or truncated
   `.metadata`, missing shard, a FIFO in a shard's place, edited manifest, damaged marker) must be
   detected and named; under torchrun (2 ranks): resume past a flipped shard (step 6) and a truncated
   one (step 4) to the newest intact checkpoint with 0 bytes lost, no intact checkpoint (all
   `.metadata` flipped), NaN at step 5 (stops, nothing of it saved), NaN at step 3 with
   --skip-nonfinite, --resume from a missing and from an empty directory, an unwritable checkpoint
   directory, a log file in a missing folder, a dataset that runs out, SIGKILL of the torchrun
   process (workers must die with it) and SIGINT (one line). Each case is counted as clear (detected,
   one line of ours, non-zero exit; or survived as specified), unclear, crash (a traceback from our
   workers), hang (over its time limit) or silent-wrong (exit 0 with damaged or NaN state).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")


def bad_inputs(tmp: Path) -> list:
    """Section 1: every case of tests/hostile_inputs.py, each under its time limit; prints per group."""
    from tests import hostile_verdicts as hv
    from tests.hostile_inputs import hostile_cases

    t0 = time.perf_counter()
    cases = hostile_cases(tmp)
    built_s = time.perf_counter() - t0
    results = hv.run_cases(cases, tmp)
    print(f"bad inputs and hostile files (tests/hostile_inputs.py; {len(cases)} cases built in {built_s:.1f} s, "
          f"run in {time.perf_counter() - t0 - built_s:.1f} s; limit {hv.LIMIT_S:.0f} s per case):")
    print(f"  {'group':<22} {'tried':>5} " + " ".join(f"{v:>13}" for v in hv.VERDICTS) + f" {'slowest s':>9}")
    for group in dict.fromkeys(r.group for r in results):
        rs = [r for r in results if r.group == group]
        n = hv.counts(rs)
        print(f"  {group:<22} {len(rs):>5} " + " ".join(f"{n[v]:>13}" for v in hv.VERDICTS)
              + f" {max(r.seconds for r in rs):>9.2f}")
    for r in results:
        if r.verdict != "clear":
            print(f"  {r.verdict.upper():<13} {r.name}: {r.detail[:200]}")
    slow = sorted(results, key=lambda r: -r.seconds)[:3]
    print("  slowest: " + "; ".join(f"{r.name} {r.seconds:.1f} s" for r in slow))
    return results


def _damage_catalogue(tmp: Path) -> list[tuple[str, str, str]]:
    """(case, verdict, detail) for each kind of checkpoint damage, on a one-rank checkpoint."""
    from runtime.checkpoint import load_full_state, verify_checkpoint
    from specs import SpecError
    from tests.test_checkpoint_safety import _CORRUPTIONS, _STATE, _sealed

    out = []
    for i, (kind, (damage, name, needle)) in enumerate(sorted(_CORRUPTIONS.items())):
        path = _sealed(tmp / f"c{i}" / "step_00000001", _STATE)
        damaged = path / name(path)
        damage(path)
        found = verify_checkpoint(path).problems
        try:
            load_full_state(path)
            out.append((f"damage: {kind}", "silent-wrong", "loaded"))
            continue
        except SpecError as e:
            msg = str(e)
        except Exception as e:  # noqa: BLE001 - a crash is what we count
            out.append((f"damage: {kind}", "crash", f"{type(e).__name__}: {e}"))
            continue
        ok = any(str(damaged) in p and needle in p for p in found) and str(damaged) in msg and "\n" not in msg
        out.append((f"damage: {kind}", "clear" if ok else "unclear", msg[:150]))
    return out


def _worker_traceback(stderr: str) -> bool:
    """A traceback through our code (torchrun's own ChildFailedError/SignalException report is not)."""
    return any(ln.strip().startswith("File ") and f"{ROOT}/" in ln and "/.venv/" not in ln
               for ln in stderr.splitlines())


def _launch_case(name: str, args: list[str], needle: str, limit_s: float = 150) -> tuple[str, str, str]:
    import subprocess

    from tests import fault_runs as fr

    try:
        proc = fr.torchrun(2, args, check=False, timeout_s=limit_s)
    except subprocess.TimeoutExpired:
        return (name, "hang", f"no answer in {limit_s:.0f} s")
    ours = sorted({ln for ln in proc.stderr.splitlines() if ln.startswith("runtime.launch:")})
    if _worker_traceback(proc.stderr):
        return (name, "crash", "traceback from a worker")
    if proc.returncode == 0:
        return (name, "silent-wrong", "exit 0")
    ok = len(ours) == 1 and needle in ours[0]
    return (name, "clear" if ok else "unclear", (ours[0] if ours else proc.stderr[-200:])[:160])


def integrity_and_launch(tmp: Path, straight) -> tuple[list[tuple[str, str, str]], list]:
    """Section 3 of the module docstring: (case, verdict, detail) per case, and the bytes lost measured."""
    import signal

    from runtime.checkpoint import (
        committed_checkpoints,
        load_full_state,
        state_difference,
        verify_checkpoint,
    )
    from tests import fault_runs as fr

    cases = _damage_catalogue(tmp / "damage")
    plans = fr.write_plans(tmp)

    integ = fr.run_integrity_scenarios(tmp / "integrity", straight)
    run, files = integ["fallback"]
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("runtime.launch:")]
    named = [any(str(f) in ln for ln in lines) for f in files]
    diff = fr.final_state_difference(straight, run) if run.returncode == 0 else {"bytes_lost": "n/a"}
    for (kind, f), seen in zip((("flipped shard bytes (same size), step 6", files[0]),
                                ("truncated shard, step 4", files[1])), named, strict=True):
        verdict = "clear" if seen and run.returncode == 0 else "silent-wrong" if run.returncode == 0 else "unclear"
        cases.append((f"torchrun resume: {kind}", verdict, f"named {f.name}: {seen}"))
    fell_back = run.returncode == 0 and [r["step"] for r in run.records] == [3, 4, 5, 6] and diff["bytes_lost"] == 0
    cases.append(("torchrun resume: fell back to step 2, bytes lost vs uninterrupted",
                  "clear" if fell_back else "silent-wrong", f"bytes lost {diff['bytes_lost']}"))
    run, files = integ["none-intact"]
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("runtime.launch:")]
    ok = run.returncode != 0 and len(lines) == 1 and all(str(f) in lines[0] for f in files)
    cases.append(("torchrun resume: .metadata of every checkpoint flipped",
                  "clear" if ok else "silent-wrong" if run.returncode == 0 else "unclear",
                  lines[0][:160] if lines else run.stderr[-160:]))

    nan = fr.run_nonfinite(tmp / "nan")
    stop, skip = nan["nan-stop"], nan["nan-skip"]
    lines = [ln for ln in stop.stderr.splitlines() if ln.startswith("runtime.launch:")]
    kept = [s for s, _ in committed_checkpoints(stop.checkpoint_dir)]
    same4 = kept == [2, 4] and verify_checkpoint(stop.checkpoint_dir / "step_00000004").intact and state_difference(
        load_full_state(straight.checkpoint_dir / "step_00000004"),
        load_full_state(stop.checkpoint_dir / "step_00000004"))["bytes_lost"] == 0
    ok = stop.returncode != 0 and len(lines) == 1 and "step 5: non-finite loss" in lines[0] and same4
    cases.append(("NaN loss at step 5 (stop)", "clear" if ok else "silent-wrong" if stop.returncode == 0 else "unclear",
                  f"checkpoints kept {kept}; " + (lines[0][:120] if lines else "")))
    skipped = [r["step"] for r in skip.records if r.get("skipped")]
    final = load_full_state(skip.checkpoint_dir / f"step_{fr.STEPS:08d}") if skip.returncode == 0 else {}
    finite = bool(final) and all(v.isfinite().all() for v in final.values()
                                 if hasattr(v, "isfinite") and v.is_floating_point())
    ok = skip.returncode == 0 and skipped == [3] and finite
    cases.append(("NaN loss at step 3 (--skip-nonfinite)", "clear" if ok else "unclear",
                  f"skipped {skipped}, final state finite: {finite}"))

    (tmp / "empty-ck").mkdir()
    (tmp / "afile").write_text("x")
    common = [str(plans["zero3x2"]), *fr.COMMON, "--steps", "2"]
    cases.append(_launch_case("--resume from a missing directory",
                              [*common, "--resume", "--checkpoint-dir", str(tmp / "mistyped")], "does not exist"))
    cases.append(_launch_case("--resume from a directory without checkpoints",
                              [*common, "--resume", "--checkpoint-dir", str(tmp / "empty-ck")], "no committed checkpoint"))
    cases.append(_launch_case("unwritable --checkpoint-dir", [*common, "--checkpoint-dir", str(tmp / "afile" / "ck")],
                              "cannot write checkpoints there"))
    cases.append(_launch_case("--log-file in a missing folder",
                              [*common, "--log-file", str(tmp / "missing" / "log.jsonl")], "cannot open it"))
    cases.append(_launch_case("dataset runs out", [str(plans["zero3x2"]), *fr.COMMON, "--steps", "5", "--data",
                                                   "tests.test_launch_guards:three_batches"], "dataset ran out"))

    killed = fr.run_signalled_launcher(tmp, signal.SIGKILL, "killed-launcher")
    ok = len(killed["workers"]) == 2 and not killed["alive"] and killed["steps_after"] == 0
    cases.append(("SIGKILL of the torchrun process", "clear" if ok else "silent-wrong",
                  f"workers {killed['workers']} gone after {killed['gone_after_s']:.1f} s; alive: {killed['alive']}"))
    sigint = fr.run_signalled_launcher(tmp, signal.SIGINT, "sigint")
    lines = [ln for ln in sigint["stderr"].splitlines() if ln.startswith("runtime.launch:")]
    verdict = ("crash" if _worker_traceback(sigint["stderr"]) or "KeyboardInterrupt" in sigint["stderr"]
               else "clear" if len(lines) == 1 and not sigint["alive"] else "unclear")
    cases.append(("SIGINT (Ctrl-C) of the torchrun process", verdict, lines[0][:120] if lines else "(no line)"))
    return cases, [diff["bytes_lost"]]


def _summary(results, faults: list[tuple[str, str, str]], bytes_lost: list) -> str:
    """The one-paragraph count the issue asks for (bytes lost: the sum over the runs compared)."""
    from tests import hostile_verdicts as hv

    verdicts = [r.verdict for r in results] + [v for _, v, _ in faults]
    counts = ", ".join(f"{v}: {verdicts.count(v)}" for v in hv.VERDICTS)
    known = [b for b in bytes_lost if isinstance(b, int)]
    lost = f"{sum(known)}" + (f" (+{len(bytes_lost) - len(known)} runs not compared)" if len(known) < len(bytes_lost)
                              else "")
    survived = sum(v == "clear" for _, v, _ in faults)
    return (f"inputs and faults tried: {len(verdicts)} ({len(results)} bad inputs, {len(faults)} faults); {counts} "
            f"(hang: over {hv.LIMIT_S:.0f} s per input; faults: their own limits); faults survived: "
            f"{survived}/{len(faults)}; bytes lost: {lost}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-faults", action="store_true", help="only the bad inputs (no torchrun)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for sub in ("bad", "faults", "hang", "reshard", "issue20"):
            (tmp / sub).mkdir()
        results = bad_inputs(tmp / "bad")
        failures = sum(r.verdict != "clear" for r in results)
        if args.skip_faults:
            print("\n" + _summary(results, [], []))
            return 0 if not failures else 1
        from runtime.checkpoint import load_full_state, state_difference
        from tests import fault_runs as fr

        faults: list[tuple[str, str, str]] = []
        bytes_lost: list = []
        runs = fr.run_fault_scenarios(tmp / "faults")
        ref = runs["straight"]
        print(f"\nreference: uninterrupted run, {fr.STEPS} steps, checkpoint every {fr.EVERY}: "
              f"rc={ref.returncode}, {ref.wall_s:.1f} s")
        print(f"{'fault':<14} {'survived':>8} {'steps by attempt':<32} {'redone':>6} {'lost':>5} "
              f"{'loss mismatches':>15} {'state bytes compared':>20} {'bytes lost':>10} {'wall s':>7}")
        for name in ("kill-at-step", "kill-in-save"):
            run = runs[name]
            diff = fr.final_state_difference(ref, run) if run.returncode == 0 else {"bytes": 0, "bytes_lost": "n/a"}
            mism = fr.loss_mismatches(ref, run)
            ok = run.returncode == 0 and not run.steps_lost and not mism and diff["bytes_lost"] == 0
            faults.append((name, "clear" if ok else "silent-wrong" if run.returncode == 0 else "unclear", ""))
            bytes_lost.append(diff["bytes_lost"])
            attempts = "; ".join(f"{a}: {s[0]}-{s[-1]}" for a, s in sorted(run.steps_by_attempt.items()))
            print(f"{name:<14} {str(ok):>8} {attempts:<32} {run.steps_redone:>6} {len(run.steps_lost):>5} "
                  f"{len(mism):>15} {diff['bytes']:>20,} {diff['bytes_lost']:>10} {run.wall_s:>7.1f}")
        hang = fr.run_hang(tmp / "hang")
        hang_ok = hang.returncode != 0 and "a collective failed" in hang.stderr and hang.wall_s < 120
        faults.append(("hang (10 s)", "clear" if hang_ok else "hang" if hang.wall_s >= 120 else "unclear", ""))
        line = next((ln for ln in hang.stderr.splitlines() if "a collective failed" in ln), "(no message)")
        print(f"{'hang (10 s)':<14} {str(hang_ok):>8} job ended rc={hang.returncode} after {hang.wall_s:.1f} s "
              f"(incl. start-up): {line[:140]}...")
        paths = fr.run_reshard(tmp / "reshard")
        a = load_full_state(paths["A"])
        for name, world in (("pp2tp2", 4), ("one", 1)):
            diff = state_difference(a, load_full_state(paths[name]), ignore=fr.reshard_ignore(world))
            ok = diff["bytes_lost"] == 0 and not diff["missing"]
            faults.append((f"reshard {name}", "clear" if ok else "silent-wrong", ""))
            bytes_lost.append(diff["bytes_lost"])
            print(f"reshard zero3x4 -> {name:<7} {str(ok):>5} entries {diff['keys']}, bytes compared "
                  f"{diff['bytes']:,}, bytes lost {diff['bytes_lost']}")
        print(f"\nfaults injected: 5 (2 kills under restart, 1 hang, 2 reshards); failures: "
              f"{sum(v != 'clear' for _, v, _ in faults)}")

        t0 = time.perf_counter()
        cases, lost = integrity_and_launch(tmp / "issue20", ref)
        bytes_lost += lost
        print(f"\nintegrity and launch faults ({time.perf_counter() - t0:.1f} s):")
        for name, verdict, detail in cases:
            print(f"  {verdict:<12} {name:<62} {detail}")
        counts = {k: sum(v == k for _, v, _ in cases) for k in ("clear", "unclear", "crash", "hang", "silent-wrong")}
        print(f"integrity and launch faults tried: {len(cases)}, " + ", ".join(f"{k}: {n}" for k, n in counts.items()))
        faults += cases
        failures += sum(v != "clear" for _, v, _ in faults)
        print("\n" + _summary(results, faults, bytes_lost))
        print(f"failures overall: {failures}")
        return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
