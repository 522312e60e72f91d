"""`make demo` (`python -m planner.demo`): the whole story on bundled defaults, in a few minutes.

1. Plan GPT-3 175B for 1024 A100s (dgx-a100-80gb, 128 nodes, global batch 1536, bf16) and
   explain the plan: layout, where the step time goes, memory, timeline, alternatives.
2. Trace a tiny GPT and print the tracer's block table.
3. Plan a small GPT (gpt-small: 4 layers, hidden 256, 128 tokens) for this machine (4
   processes) and run the plan for a few steps under torchrun (`python -m torch.distributed.run
   --standalone --nproc-per-node 4 -m runtime.launch PLAN --model gpt-small --steps K`), printing
   its loss and the measured against the predicted step time. Not gpt-tiny (hidden 64): its
   ~60 ms step on a 2-core host is Python and autograd dispatch of ~2000 tiny ops and AdamW's
   loop over 68 small tensors, host time the cost model does not charge (it predicted half the
   measured step, calibrated or not); gpt-small's GEMMs are what the model describes.
   "This machine" is this host's own calibration, `HardwareSpec.preset("local")`:
   the first time on a host the demo runs `python -m runtime.calibrate --local` (about half a
   minute; a subprocess, as planner/ may not import runtime/), which caches it under the user's
   cache directory (specs.hardware.local_spec_path). `--hw cpu` plans with the shipped `cpu`
   preset instead, and says so when that preset was calibrated on another host.

Each part says what it runs, and the demo exits non-zero if a part fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.rule import Rule

from planner.api import autoplan, trace_model
from planner.explain.render import make_console, render_explain
from planner.trace_report import block_table_text
from specs import HardwareSpec, SpecError, TrainSpec
from specs.hardware import LOCAL_PRESET, foreign_host_note, host_key, local_spec_path

ROOT = Path(__file__).resolve().parents[1]


def part_big(con, args) -> None:
    hw = HardwareSpec.preset("dgx-a100-80gb", nodes=128)
    train = TrainSpec(global_batch_size=1536, precision="bf16")
    con.print(f"autoplan('gpt3-175b', {hw}, global batch 1536, bf16)")
    t0 = time.perf_counter()
    plan = autoplan("gpt3-175b", hw, train=train)
    con.print(f"planned in {time.perf_counter() - t0:.1f} s\n")
    render_explain(plan, con)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        plan.to_file(Path(args.out) / "gpt3-175b.yaml")


def part_trace(con, args) -> None:
    graph = trace_model("gpt-tiny", None)
    con.print(block_table_text(graph))


def part_tiny(con, args) -> None:
    hw = this_host(con, args.nproc, args.hw)
    train = TrainSpec(global_batch_size=16, precision="fp32")
    plan = autoplan(args.model, hw, train=train)
    con.print(f"plan for this machine ({hw.name}): {plan.summary()}")
    tmp = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="autoplan-demo-"))
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"{args.model}.yaml"
    plan.to_file(path)
    log = tmp / "train-log.jsonl"
    log.unlink(missing_ok=True)
    run_plan(con, path, args.nproc, args.steps, log, model=args.model)
    report_run(con, plan, log)


def this_host(con, nproc: int, which: str = LOCAL_PRESET) -> HardwareSpec:
    """The hardware of part 3: this host's calibration (`local`, measured once by
    `calibrate_this_host` when not cached), or the shipped `cpu` preset with a plain note when
    that preset describes another host (also the fallback if the calibration fails)."""
    if which == LOCAL_PRESET:
        try:
            if not local_spec_path().exists():
                calibrate_this_host(con, nproc)
            return HardwareSpec.preset(LOCAL_PRESET, devices=nproc)
        except (RuntimeError, SpecError, subprocess.TimeoutExpired) as e:
            con.print(f"could not calibrate this host ({e}); planning with the shipped cpu preset",
                      style="yellow", markup=False)
    hw = HardwareSpec.preset("cpu", devices=nproc)
    note = foreign_host_note(hw)
    if note:
        con.print(note, style="yellow", markup=False)
    return hw


def calibrate_this_host(con, nproc: int) -> None:
    """`python -m runtime.calibrate --local --nproc N` in a subprocess (planner/ may not import
    runtime/); it writes local_spec_path()."""
    cmd = [sys.executable, "-m", "runtime.calibrate", "--local", "--nproc", str(nproc)]
    con.print(
        f"calibrating this host ({host_key()}) once, for predictions of this host rather than the shipped "
        f"preset's: about half a minute\n$ " + " ".join(["python", *cmd[1:]]),
        markup=False,
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not local_spec_path().exists():
        tail = "\n".join(((proc.stderr or "") + (proc.stdout or "")).strip().splitlines()[-5:])
        raise RuntimeError(f"`{' '.join(cmd[1:])}` exited with {proc.returncode}: {tail}")
    for line in proc.stdout.splitlines():
        if line.startswith("note:"):  # e.g. that the host was busy while it measured
            con.print(line, style="yellow", markup=False)
    con.print(f"calibrated in {time.perf_counter() - t0:.1f} s; cached in {local_spec_path()}", markup=False)


def run_plan(con, path: Path, nproc: int, steps: int, log: Path, *, model: str = "gpt-small") -> None:
    """torchrun the plan; rank 0 appends one JSON line per step to `log`."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "runtime.launch",
        str(path),
        "--model",
        model,
        "--steps",
        str(steps),
        "--log-file",
        str(log),
    ]
    con.print("$ " + " ".join(["python", *cmd[1:]]), markup=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    con.print(f"torchrun finished in {time.perf_counter() - t0:.1f} s (exit {proc.returncode})")
    if proc.returncode != 0:
        text = (proc.stderr or "") + (proc.stdout or "")
        # the ranks' own messages, not torchrun's summary around them
        errs = [ln for ln in text.splitlines() if "error" in ln.lower() and "elastic" not in ln]
        tail = "\n".join(list(dict.fromkeys(errs))[-8:] or text.strip().splitlines()[-15:])
        raise RuntimeError(f"torchrun exited with {proc.returncode}:\n{tail}")


def report_run(con, plan, log: Path) -> None:
    """Loss per step, and measured against predicted step time."""
    import json
    import statistics

    from rich.table import Table

    recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if not recs:
        raise RuntimeError(f"the run wrote no steps to {log}")
    pred = plan.predicted
    t = Table(title="training steps (rank 0)", title_justify="left")
    for col in ("step", "loss", "step time", "peak RSS"):
        t.add_column(col, justify="right")
    for r in recs:
        t.add_row(
            str(r["step"]),
            f"{r['loss']:.4f}",
            f"{r['step_time_s'] * 1e3:.1f} ms",
            f"{r.get('peak_memory_bytes', 0) / 2**20:.0f} MiB",
        )
    con.print(t)
    steady = [r["step_time_s"] for r in recs[1:]] or [recs[0]["step_time_s"]]
    measured = statistics.median(steady)
    con.print(
        f"step time: measured {measured * 1e3:.1f} ms (median of the steps after the first) vs "
        f"predicted {pred.step_time_s * 1e3:.1f} ms: measured/predicted = "
        f"{measured / pred.step_time_s:.2f}"
    )
    con.print(
        f"memory: predicted peak {pred.peak_memory_bytes / 2**20:.1f} MiB per rank (model state and "
        f"activations); the measured RSS also holds the interpreter and torch itself"
    )


PARTS = {
    "big": ("1. GPT-3 175B on 1024 A100s: plan and explain", part_big),
    "trace": ("2. The tracer's view of a tiny GPT", part_trace),
    "tiny": ("3. A small GPT on this machine: plan, then run it under torchrun", part_tiny),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m planner.demo", description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=list(PARTS), action="append", help="run only these parts")
    p.add_argument("--steps", type=int, default=5, help="training steps of the tiny run")
    p.add_argument("--nproc", type=int, default=4, help="processes of the tiny run")
    p.add_argument("--out", help="keep the plans in this folder")
    p.add_argument("--model", default="gpt-small", help="the bundled model part 3 plans and runs")
    p.add_argument(
        "--hw",
        choices=(LOCAL_PRESET, "cpu"),
        default=LOCAL_PRESET,
        help="hardware of part 3: this host's own calibration (default; measured once, ~30 s, and "
        "cached) or the shipped cpu preset",
    )
    p.add_argument("--width", type=int, default=None)
    args = p.parse_args(argv)
    con = make_console(width=args.width)
    failed = []
    keys = args.only or list(PARTS)
    for key in keys:
        title, fn = PARTS[key]
        con.print(Rule(title))
        try:
            fn(con, args)
        except (SpecError, RuntimeError, subprocess.TimeoutExpired) as e:
            failed.append(key)
            con.print(f"FAILED: {e}", style="bold red", markup=False)
    con.print(Rule())
    con.print(
        f"demo: {len(keys) - len(failed)} of {len(keys)} parts ran"
        + (f", FAILED {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
