"""Runtime overhead: a plan executed by `runtime.parallelize` vs a hand-written script applying the
same native engines directly (DDP, FSDP2, DTensor TP), side by side in one torchrun job.

    .venv/bin/python benchmarks/runtime_overhead.py [--nproc 4] [--model gpt-small] [--rounds 6]

For each configuration both versions are built from the same weights; then, alternating in
rounds (runtime steps, then hand-written steps, so drift and noise on the shared CPU hit both
alike), each round times `--steps` optimizer steps. Printed: the median step time of each and
their ratio (runtime / hand-written; target <= 1.03). The runtime is run with sync_loss=False,
as the hand-written loop does not all-reduce its loss either.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {  # name -> plan keywords (tests/runtime_plans.make_plan)
    "ddp": dict(dp=4),
    "fsdp2-zero3": dict(dp=4, sharding="zero3"),
    "tp4": dict(tp=4, tp_styles="gpt"),
    "tp2xfsdp2": dict(dp=2, tp=2, sharding="zero3", tp_styles="gpt"),
}


def _hand_written(model, name: str, world: int):
    """What a user would write with PyTorch's engines directly (no runtime code)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )
    from torch.nn.parallel import DistributedDataParallel as DDP

    if name == "ddp":
        return DDP(model, broadcast_buffers=False)
    tp = {"fsdp2-zero3": 1, "tp4": 4, "tp2xfsdp2": 2}[name]
    mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
    if tp > 1:
        layer_plan = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(),
                      "attn.v_proj": ColwiseParallel(), "attn.o_proj": RowwiseParallel(),
                      "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
        for layer in model.layers:
            parallelize_module(layer, mesh["tp"], layer_plan)
        parallelize_module(model, mesh["tp"], {
            "embed.tok": RowwiseParallel(input_layouts=Replicate()),
            "head.lm_head": ColwiseParallel(output_layouts=Replicate()),
        })
        model.head.lm_head.weight = model.embed.tok.weight  # re-tie (both Shard(0) on tp)
    if world // tp > 1:
        for layer in model.layers:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    del dist
    return model


def _measure(pm, hand, loss_fn, xl, yl, args) -> tuple[float, float]:
    """Median seconds per step of the runtime and of the hand-written loop, alternating rounds."""
    import torch
    import torch.distributed as dist

    opt = torch.optim.AdamW(hand.parameters(), lr=1e-4)

    def runtime_step():
        pm.train_step((xl, yl), sync_loss=False)

    def hand_step():
        loss_fn(hand(xl), yl).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        runtime_step()
        hand_step()
    times = {"runtime": [], "hand": []}
    for _ in range(args.rounds):
        for key, fn in (("runtime", runtime_step), ("hand", hand_step)):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            dist.barrier()
            times[key].append((time.perf_counter() - t0) / args.steps)
    return statistics.median(times["runtime"]), statistics.median(times["hand"])


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from planner.models import build_model
    from runtime import parallelize
    from tests.runtime_plans import make_plan

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = args.batch
    rows = []
    for name, kw in CONFIGS.items():
        torch.manual_seed(0)
        built = build_model(args.model, batch=batch)
        twin = copy.deepcopy(built.module)
        plan = make_plan(args.model, global_batch_size=batch, **kw)
        pm = parallelize(built.module, plan, loss_fn=built.loss_fn, example_inputs=built.example_inputs,
                         optimizer_kwargs={"lr": 1e-4})
        hand = _hand_written(twin, name, world)
        dp = plan.mesh.dp
        dp_rank = pm.meshes.dp_rank
        gen = torch.Generator().manual_seed(1)
        x, y = built.make_batch(batch, gen)
        k = batch // dp
        xl, yl = x[dp_rank * k:(dp_rank + 1) * k], y[dp_rank * k:(dp_rank + 1) * k]

        rt, hw = _measure(pm, hand, built.loss_fn, xl, yl, args)
        rows.append((name, str(plan), rt, hw))
    if rank == 0:
        print(f"{args.model}, {world} processes (gloo, CPU), global batch {batch}, median of {args.rounds} rounds "
              f"x {args.steps} steps")
        print(f"{'config':<12} {'plan':<34} {'runtime_s':>10} {'hand_s':>10} {'ratio':>7}")
        for name, plan_str, rt, hw in rows:
            print(f"{name:<12} {plan_str:<34} {rt:>10.4f} {hw:>10.4f} {rt / hw:>7.3f}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--model", default="gpt-small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           __file__, "--worker", *sys.argv[1:]]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    sys.exit(subprocess.call(cmd, cwd=ROOT, env=env))


if __name__ == "__main__":
    main()
