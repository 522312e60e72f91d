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
        Path(args.out).mkdir(parents=True, exist_ok=True)
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
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "gpt-tiny.yaml"
    plan.to_file(path)
    log = tmp / "train-log.jsonl"
    log.unlink(missing_ok=True)
    run_plan(con, path, args.nproc, args.steps, log)
    report_run(con, plan, log)


def run_plan(con, path: Path, nproc: int, steps: int, log: Path) -> None:
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
        "gpt-tiny",
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
