"""`make demo` (`python -m planner.demo`): the whole story on bundled defaults, in a few minutes.

1. Plan GPT-3 175B for 1024 A100s (dgx-a100-80gb, 128 nodes, global batch 1536, bf16) and
   explain the plan: layout, where the step time goes, memory, timeline, alternatives.
2. Trace a tiny GPT and print the tracer's block table.
3. Plan that tiny GPT for this machine (the `cpu` preset, 4 processes) and run the plan for a
   few steps under torchrun (`python -m torch.distributed.run --standalone --nproc-per-node 4
   -m runtime.launch PLAN --model gpt-tiny --steps K`), printing its loss and the measured
   against the predicted step time.

Each part says what it runs; a part whose piece of autoplan is not in this build is skipped
with the reason, and the demo exits non-zero if a part fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.rule import Rule

from planner.explain.render import make_console, render_explain
from specs import HardwareSpec, SpecError, TrainSpec

ROOT = Path(__file__).resolve().parents[1]


class Skip(Exception):
    """This part needs a piece of autoplan that the build lacks."""


def _need(module: str, name: str | None = None):
    if importlib.util.find_spec(module) is None:
        raise Skip(f"{module} is not in this build yet")
    mod = importlib.import_module(module)
    if name is not None and not hasattr(mod, name):
        raise Skip(f"{module}.{name} is not in this build yet")
    return getattr(mod, name) if name else mod


def part_big(con, args) -> None:
    autoplan = _need("planner", "autoplan")
    hw = HardwareSpec.preset("dgx-a100-80gb", nodes=128)
    train = TrainSpec(global_batch_size=1536, precision="bf16")
    con.print(f"autoplan('gpt3-175b', {hw}, global batch 1536, bf16)")
    t0 = time.perf_counter()
    plan = autoplan("gpt3-175b", hw, train=train)
    con.print(f"planned in {time.perf_counter() - t0:.1f} s\n")
    render_explain(plan, con)
    if args.out:
        plan.to_file(Path(args.out) / "gpt3-175b.yaml")


def part_trace(con, args) -> None:
    trace_model = _need("planner.api", "trace_model")
    block_table_text = _need("planner.trace_report", "block_table_text")
    graph = trace_model("gpt-tiny", None)
    con.print(block_table_text(graph))


def part_tiny(con, args) -> None:
    autoplan = _need("planner", "autoplan")
    _need("runtime.launch")
    hw = HardwareSpec.preset("cpu", devices=args.nproc)
    train = TrainSpec(global_batch_size=16, precision="fp32")
    plan = autoplan("gpt-tiny", hw, train=train)
    con.print(f"plan for this machine: {plan.summary()}")
    tmp = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="autoplan-demo-"))
    path = tmp / "gpt-tiny.yaml"
    plan.to_file(path)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(args.nproc),
        "-m",
        "runtime.launch",
        str(path),
        "--model",
        "gpt-tiny",
        "--steps",
        str(args.steps),
    ]
    con.print("$ " + " ".join(cmd[1:]))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    out = (proc.stdout or "").rstrip()
    if out:
        con.print(out, markup=False, highlight=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
        raise RuntimeError(f"torchrun exited with {proc.returncode}:\n{tail}")
    pred = plan.predicted.step_time_s if plan.predicted else float("nan")
    con.print(
        f"predicted step time {pred * 1e3:.1f} ms (the launcher's output above has the measured "
        f"one); {args.steps} steps took {wall:.1f} s of wall clock including start-up"
    )


PARTS = {
    "big": ("1. GPT-3 175B on 1024 A100s: plan and explain", part_big),
    "trace": ("2. The tracer's view of a tiny GPT", part_trace),
    "tiny": ("3. A tiny GPT on this machine: plan, then run it under torchrun", part_tiny),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m planner.demo", description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=list(PARTS), action="append", help="run only these parts")
    p.add_argument("--steps", type=int, default=5, help="training steps of the tiny run")
    p.add_argument("--nproc", type=int, default=4, help="processes of the tiny run")
    p.add_argument("--out", help="keep the plans in this folder")
    p.add_argument("--width", type=int, default=None)
    args = p.parse_args(argv)
    con = make_console(width=args.width)
    failed, skipped = [], []
    for key in args.only or list(PARTS):
        title, fn = PARTS[key]
        con.print(Rule(title))
        try:
            fn(con, args)
        except Skip as e:
            skipped.append(key)
            con.print(f"(skipped: {e})", style="yellow")
        except (SpecError, RuntimeError, subprocess.TimeoutExpired) as e:
            failed.append(key)
            con.print(f"FAILED: {e}", style="bold red", markup=False)
    con.print(Rule())
    con.print(
        f"demo: {len(PARTS) - len(failed) - len(skipped)} parts ran"
        + (f", skipped {', '.join(skipped)}" if skipped else "")
        + (f", FAILED {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
