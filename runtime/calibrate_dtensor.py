"""`autoplan calibrate`: the host time DTensor adds to tensor-parallel ops on a CPU host.

The runtime runs tensor parallelism with DTensor (ColwiseParallel / RowwiseParallel). On a CPU
host the same cores that compute also run DTensor's Python dispatch (sharding propagation,
redistribution bookkeeping, wrapping and unwrapping) and the copies it makes, so a plan with
tp > 1 pays for it on every tensor-parallel op. Measured here on a one-rank mesh, where no
communication happens, so the difference to the plain block is DTensor's own cost:

- a transformer MLP + attention-projection block (Linear h->h colwise, h->h rowwise, h->4h
  colwise, 4h->h rowwise: 4 tensor-parallel ops), plain and parallelized with the same weights;
- forward, and forward + backward, at two token counts, of a block at a small transformer's size
  (h = 512: big enough that its GEMMs evict the caches between DTensor's dispatches, as in a
  model; at h = 256 the same overhead measured 1.2 ms per op against 2.5 ms at h = 512); per op:
  the mean over the two sizes of (parallel - plain) / ops for forward + backward, and of the
  forward alone, clamped to [0, total] (the forward-only difference is the noisier one). No
  size-dependent part is fitted: a profile of the GPT in benchmarks/fidelity.py at micro-batch 16
  shows DTensor's cost in its dispatches (776 per step, ~105 us each) and tensor wrapping, not in
  extra kernels;
- the AdamW step (PyTorch's CPU default: a loop over parameters) over the block's parameters,
  plain and as DTensors: per op's parameters (a Linear's weight and bias). FSDP2 keeps its
  sharded parameters as DTensors too, so the cost model charges this per op with parameters
  wherever the runtime's data parallelism is FSDP2 (cost_models.layout).

Plain and parallel are timed alternately, ROUNDS times, and the medians of the differences
kept (the dev VM's speed drifts by 10-20% within a minute). A sample result on the 2-core dev VM is
in benchmarks/results/calibration_cpu.json ("dtensor").
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from runtime.calibrate_bench import Sizes, time_op

HIDDEN = 512
SEQ = 128
BATCHES = (2, 8)  # x SEQ tokens: 256 and 1024 rows
ROUNDS = 5


class _Block(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.norm = nn.LayerNorm(h)  # a parameter tensor parallelism leaves plain (as in a transformer)
        self.q = nn.Linear(h, h)
        self.o = nn.Linear(h, h)
        self.up = nn.Linear(h, 4 * h)
        self.down = nn.Linear(4 * h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.o(torch.relu(self.q(self.norm(x))))
        return x + self.down(torch.relu(self.up(x)))


def measure_dtensor(sizes: Sizes) -> dict[str, Any]:
    """DTensor's host overhead per tensor-parallel op (see the module docstring), CPU only."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        plain = _Block(HIDDEN)
        tp = _Block(HIDDEN)
        tp.load_state_dict(plain.state_dict())
        parallelize_module(tp, mesh, {"q": ColwiseParallel(), "o": RowwiseParallel(),
                                      "up": ColwiseParallel(), "down": RowwiseParallel()})
        n_ops = 4
        rows = []
        cpu = torch.device("cpu")
        for b in BATCHES:
            x = torch.randn(b, SEQ, HIDDEN)

            def fwd(mod, x=x):
                mod(x)  # recording autograd's graph, as in training

            def fwd_bwd(mod, x=x):
                mod(x).sum().backward()

            # plain and parallel alternate, ROUNDS times: drift of the machine's speed hits both
            diffs_f, diffs_fb = [], []
            for _ in range(ROUNDS):
                t = {name: (time_op(lambda m=mod: fwd(m), cpu, sizes.min_time_s, batches=1),
                            time_op(lambda m=mod: fwd_bwd(m), cpu, sizes.min_time_s, batches=1))
                     for name, mod in (("plain", plain), ("tp", tp))}
                diffs_f.append(t["tp"][0] - t["plain"][0])
                diffs_fb.append(t["tp"][1] - t["plain"][1])
            f, fb = statistics.median(diffs_f), statistics.median(diffs_fb)
            rows.append({"batch": b, "forward_s": f, "backward_s": fb - f})
        opt = {"plain": [], "tp": []}
        steppers = {}
        for name, mod in (("plain", plain), ("tp", tp)):
            for p in mod.parameters():
                p.grad = torch.zeros_like(p)
            # PyTorch's default on CPU tensors: the per-parameter (single-tensor) loop, as the
            # runtime builds it; every op of it on a DTensor parameter goes through DTensor
            steppers[name] = torch.optim.AdamW(mod.parameters(), lr=1e-4)
        for _ in range(ROUNDS):
            for name, o in steppers.items():
                opt[name].append(time_op(o.step, cpu, sizes.min_time_s, batches=1))
        opt_diff = statistics.median(a - b for a, b in zip(opt["tp"], opt["plain"], strict=True))
    finally:
        if own_group:
            dist.destroy_process_group()
    total = statistics.fmean(r["forward_s"] + r["backward_s"] for r in rows) / n_ops
    total = max(0.0, total)
    fwd = min(total, max(0.0, statistics.fmean(r["forward_s"] for r in rows) / n_ops))
    return {"rows": rows, "ops": n_ops, "forward_s": fwd, "backward_s": total - fwd,
            "optimizer_s": max(0.0, opt_diff) / n_ops, "optimizer_plain_s": statistics.median(opt["plain"]),
            "optimizer_tp_s": statistics.median(opt["tp"])}
