"""What every one-launch case file shares (tests/dist_cases.py, coverage_cases.py, loop_cases.py;
benchmarks/planned_runnable.py): start the gloo group, run the cases in order on every rank with a
failing case recorded instead of ending the launch, and write rank 0's results as JSON.

torchrun start-up costs 3-8 s on this machine (FIELD-NOTES), so a test file launches once per world
size and runs all its cases inside; pytest then asserts per case from the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def start(timeout_s: int = 60) -> argparse.Namespace:
    """Parse --out FILE and --only A,B (the names to run; empty: all) and join the gloo group."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    args.only = set(filter(None, args.only.split(",")))
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return args


def run_cases(names: Iterable[str], run: Callable[[str], dict], **extra) -> list[dict]:
    """run(name) for each name on every rank; an exception becomes {"name", "error", "traceback"}
    (printed with the rank), so one broken case does not hide the others. Each record gets the
    case's wall time and `extra`."""
    results = []
    for name in names:
        t0 = time.perf_counter()
        try:
            rec = run(name)
        except Exception as e:  # record and go on
            print(f"[rank {dist.get_rank()}] case {name} failed:\n{traceback.format_exc()}", file=sys.stderr)
            rec = {"name": name, "error": f"{type(e).__name__}: {e}"[:1000],
                   "traceback": traceback.format_exc()[-3000:]}
        results.append({**rec, **extra, "wall_s": round(time.perf_counter() - t0, 2)})
        dist.barrier()
    return results


def on_rank0(fn: Callable[[], T]) -> T:
    """fn() on rank 0 alone, its (picklable) result broadcast to every rank: for work each rank
    would do alike, such as tracing a model and planning it (a plan is made once and handed to
    every rank, as a plan file is). An exception on rank 0 reaches every rank after the
    broadcast, so no rank is left waiting in a collective."""
    box: list = [None, None]
    error = None
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except Exception as e:  # every rank raises below
            error = e
            box = [None, f"{type(e).__name__} on rank 0: {e}"[:1000]]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise RuntimeError(box[1])
    return box[0]


def finish(results: list[dict], out: str) -> None:
    """Rank 0 writes `results` to `out`; then every rank leaves the group (barrier first: without
    it a rank sometimes aborts at exit, FIELD-NOTES)."""
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
