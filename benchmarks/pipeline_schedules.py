"""Step time of each pipeline schedule (runtime.pipeline) against one process, same global batch.

    torchrun --standalone --nproc-per-node 2 benchmarks/pipeline_schedules.py [--model gpt-small]
        [--micro-batches 8] [--micro-batch-size 2] [--steps 5]

Every rank runs each schedule (one warm-up step, then --steps timed steps, forward + backward +
AdamW); then rank 0 alone runs the unsplit model on the same batch with the same micro-batches
accumulated (the others wait at a barrier). Prints the mean step time (slowest rank) and the
ratio to one process. Every process runs one thread (torchrun sets OMP_NUM_THREADS=1): P pipeline
ranks use up to P cores where the one process uses one, so on an idle machine with >= P cores the
ideal ratio is about 1/P plus the bubble. On this 2-core machine shared with other jobs the
figures are noisy: check `uptime` and repeat.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from planner.models import build_model  # noqa: E402
from runtime.pipeline import build_pipeline  # noqa: E402
from tests.plan_builders import make_plan  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt-small")
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n, mb = args.micro_batches, args.micro_batch_size
    gen = torch.Generator().manual_seed(0)
    built = build_model(args.model)
    x, y = built.make_batch(n * mb, gen)
    rows = []
    for sched in ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"):
        v = 2 if sched == "interleaved_1f1b" else 1
        torch.manual_seed(0)
        b = build_model(args.model)
        plan = make_plan(args.model, pp=world, schedule=sched, virtual_stages=v,
                         micro_batch_size=mb, num_micro_batches=n, model=b.module)
        runner = build_pipeline(b.module, plan, None, loss_fn=b.loss_fn, device="cpu")
        opt = torch.optim.AdamW(runner.parameters(), lr=1e-4)
        times = []
        for i in range(args.steps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            runner.step(x, y)
            opt.step()
            opt.zero_grad()
            if i:
                times.append(time.perf_counter() - t0)
        t = torch.tensor(sum(times) / len(times))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        rows.append((f"{sched}" + (f"(v={v})" if v > 1 else ""), t.item()))
    single = 0.0
    if rank == 0:
        torch.manual_seed(0)
        b = build_model(args.model)
        opt = torch.optim.AdamW(b.module.parameters(), lr=1e-4)
        times = []
        for i in range(args.steps + 1):
            t0 = time.perf_counter()
            for xm, ym in zip(x.chunk(n), y.chunk(n), strict=True):
                (b.loss_fn(b.module(xm), ym) / n).backward()
            opt.step()
            opt.zero_grad()
            if i:
                times.append(time.perf_counter() - t0)
        single = sum(times) / len(times)
        print(f"{args.model}: pp={world}, {n} micro-batches x {mb}, {args.steps} timed steps, "
              f"torch {torch.__version__}, {os.cpu_count()} cores")
        print(f"{'schedule':<22}{'step s':>10}{'vs 1 proc':>11}")
        print(f"{'one process':<22}{single:>10.4f}{1.0:>11.2f}")
        for name, t in rows:
            print(f"{name:<22}{t:>10.4f}{t / single:>11.2f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
