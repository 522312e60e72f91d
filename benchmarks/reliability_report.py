"""Reliability report (issue 8): bad inputs, injected faults, steps redone, bytes of state lost.

    .venv/bin/python benchmarks/reliability_report.py [--skip-faults]

1. Bad inputs: runs the catalogue of tests/test_bad_inputs.py (API cases and CLI cases) and
   counts those that gave one clear SpecError message (CLI: exit code 2, one stderr line).
2. Faults (torchrun, CPU gloo, gpt-tiny float64, ZeRO-3 on 2 ranks, 6 steps, checkpoint every 2;
   tests/fault_runs.py): SIGKILL of rank 1 before step 4, SIGKILL of rank 0 between writing
   step 4's checkpoint and committing it (both under --max-restarts 1), a rank hanging (10 s
   collective timeout), and a checkpoint saved under ZeRO-3 x4 loaded under PP2 x TP2 and one
   process. "Bytes of state lost" compares the final committed checkpoint of each faulted run
   with the uninterrupted run's, entry by entry (runtime.checkpoint.state_difference): bytes of
   entries missing or not bit-identical.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")


def bad_inputs(tmp: Path) -> tuple[int, int, list[str]]:
    from planner.cli import main as cli_main
    from specs import SpecError
    from tests.test_bad_inputs import FACTORY, _is_one_message, api_cases, cli_cases

    tried, clear, unclear = 0, 0, []
    for name, fn, needles in api_cases(tmp):
        tried += 1
        try:
            fn()
            unclear.append(f"{name}: no error")
        except SpecError as e:
            ok = all(n in str(e) for n in needles) and _is_one_message(str(e))
            clear += ok
            if not ok:
                unclear.append(f"{name}: {e}")
        except Exception as e:  # noqa: BLE001 - a crash is what we count
            unclear.append(f"{name}: {type(e).__name__}: {e}")
    (tmp / "badfactory_ap.py").write_text(FACTORY)
    sys.path.insert(0, str(tmp))
    for name, argv, needles in cli_cases(tmp):
        tried += 1
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = cli_main(argv)
            except BaseException as e:  # noqa: BLE001
                rc = f"{type(e).__name__}: {e}"
        text = err.getvalue()
        ok = rc == 2 and all(n in text for n in needles) and _is_one_message(text)
        clear += ok
        if not ok:
            unclear.append(f"cli {name}: rc={rc} {text!r}")
    return tried, clear, unclear


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-faults", action="store_true", help="only the bad-input catalogue (no torchrun)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for sub in ("bad", "faults", "hang", "reshard"):
            (tmp / sub).mkdir()
        t0 = time.perf_counter()
        tried, clear, unclear = bad_inputs(tmp / "bad")
        print(f"bad inputs tried: {tried}, clear one-line messages: {clear}, unclear or crashed: {len(unclear)} "
              f"({time.perf_counter() - t0:.1f} s)")
        for u in unclear:
            print(f"  UNCLEAR {u}")
        if args.skip_faults:
            return 0 if not unclear else 1
        from runtime.checkpoint import load_full_state, state_difference
        from tests import fault_runs as fr

        failures = len(unclear)
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
            failures += not ok
            attempts = "; ".join(f"{a}: {s[0]}-{s[-1]}" for a, s in sorted(run.steps_by_attempt.items()))
            print(f"{name:<14} {str(ok):>8} {attempts:<32} {run.steps_redone:>6} {len(run.steps_lost):>5} "
                  f"{len(mism):>15} {diff['bytes']:>20,} {diff['bytes_lost']:>10} {run.wall_s:>7.1f}")
        hang = fr.run_hang(tmp / "hang")
        hang_ok = hang.returncode != 0 and "a collective failed" in hang.stderr and hang.wall_s < 120
        failures += not hang_ok
        line = next((ln for ln in hang.stderr.splitlines() if "a collective failed" in ln), "(no message)")
        print(f"{'hang (10 s)':<14} {str(hang_ok):>8} job ended rc={hang.returncode} after {hang.wall_s:.1f} s "
              f"(incl. start-up): {line[:140]}...")
        paths = fr.run_reshard(tmp / "reshard")
        a = load_full_state(paths["A"])
        for name, world in (("pp2tp2", 4), ("one", 1)):
            diff = state_difference(a, load_full_state(paths[name]), ignore=fr.reshard_ignore(world))
            ok = diff["bytes_lost"] == 0 and not diff["missing"]
            failures += not ok
            print(f"reshard zero3x4 -> {name:<7} {str(ok):>5} entries {diff['keys']}, bytes compared "
                  f"{diff['bytes']:,}, bytes lost {diff['bytes_lost']}")
        print(f"\nfaults injected: 5 (2 kills under restart, 1 hang, 2 reshards); failures: {failures}")
        return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
