"""Counts the tensor-parallel collectives of one training step of gpt-tiny / llama-tiny at tp=2
(run by tests/test_tp_collectives.py under torchrun, 2 processes) and writes them with the cost
model's count for the same plan (cost_models.sharedhost.sync_points).

    torchrun --standalone --nproc-per-node 2 tests/tp_collectives_case.py --out counts.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor")


def count(name: str, sp: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from cost_models.sharedhost import sync_points
    from planner import plan_from_knobs, trace
    from planner.models import build_model
    from runtime import parallelize
    from specs import HardwareSpec, Knobs, TrainSpec
    from tests.dist_cases import lm_loss64

    torch.manual_seed(0)
    built = build_model(name, dtype=torch.float64)
    one = tuple(x[:1] for x in built.example_inputs)
    graph = trace(built.module, one, name=built.name)
    hw = HardwareSpec.preset("cpu", devices=2)
    train = TrainSpec(global_batch_size=2, precision="fp32", optimizer="adamw")
    knobs = Knobs(pp=1, dp=1, tp=2, micro_batch_size=2, sequence_parallel=sp)
    plan = plan_from_knobs(graph, hw, train, knobs)
    pm = parallelize(built.module, plan, loss_fn=lm_loss64, example_inputs=one)
    tokens = torch.randint(0, 64, (2, built.example_inputs[0].shape[1]), generator=torch.Generator().manual_seed(1))
    batch = pm.local_batch(tokens, tokens)
    pm.train_step(batch)  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        pm.train_step(batch)
    got = Counter()
    for e in prof.events():
        # activation-sized collectives ((batch, tokens, hidden) inputs): the loss's and optimizer's
        # small reductions are not tensor-parallel layer traffic
        if (e.name.startswith("_c10d_functional::") and e.name.split("::")[1] in COLLECTIVES
                and e.input_shapes and len(e.input_shapes[0]) == 3):
            got[e.name.split("::")[1]] += 1
    stages = [(s.first, s.last, s.recompute) for s in plan.pipeline.stages]
    return {"runtime": sum(got.values()), "by_kind": dict(got), "model": sync_points(graph, knobs, stages)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    out = {f"{name} sp={sp}": count(name, sp) for name in ("gpt-tiny", "llama-tiny") for sp in (False,)}
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(out, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
