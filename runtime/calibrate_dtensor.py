"""`autoplan calibrate`: the host time DTensor adds to tensor-parallel ops on a CPU host.

The runtime runs tensor parallelism with DTensor (ColwiseParallel / RowwiseParallel). On a CPU
host the same cores that compute also run DTensor's Python dispatch (sharding propagation,
redistribution bookkeeping, wrapping and unwrapping) and the copies it makes, so a plan with
tp > 1 pays for it on every tensor-parallel op. Measured here on a one-rank mesh, where no
communication happens, so the difference to the plain block is DTensor's own cost:

- a transformer MLP + attention-projection block (Linear h->h colwise, h->h rowwise, h->4h
  colwise, 4h->h rowwise: 4 tensor-parallel ops), plain and parallelized with the same weights;
- forward, and forward + backward, at two token counts; the overheads per op are fitted as
  forward = a_f + c/2 x output bytes, backward = a_b + c/2 x output bytes (c from the two sizes);
- the AdamW step (PyTorch's CPU default: a loop over parameters) over the block's parameters,
  plain and as DTensors: per op's parameters (a Linear's weight and bias). FSDP2 keeps its
  sharded parameters as DTensors too, so the cost model charges this per op with parameters
  wherever the runtime's data parallelism is FSDP2 (cost_models.layout).

Figures are medians of several timed batches (time_op). A sample result on the 2-core dev VM is
in benchmarks/results/calibration_cpu.json ("dtensor").
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from runtime.calibrate_bench import Sizes, time_op

HIDDEN = 256
SEQ = 128
BATCHES = (2, 16)  # x SEQ tokens: 256 and 2048 rows


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


def _output_bytes(batch: int) -> float:
    rows = batch * SEQ
    return 4.0 * rows * (HIDDEN + HIDDEN + 4 * HIDDEN + HIDDEN)  # fp32 outputs of q, o, up, down


def measure_dtensor(sizes: Sizes) -> dict[str, Any]:
    """DTensor's host overhead per tensor-parallel op (see the module docstring), CPU only."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

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
        for b in BATCHES:
            x = torch.randn(b, SEQ, HIDDEN)
            t = {}
            for name, mod in (("plain", plain), ("tp", tp)):
                def fwd(mod=mod):
                    mod(x)  # recording autograd's graph, as in training

                def fwd_bwd(mod=mod):
                    mod(x).sum().backward()

                t[name] = (time_op(fwd, torch.device("cpu"), 2 * sizes.min_time_s),
                           time_op(fwd_bwd, torch.device("cpu"), 2 * sizes.min_time_s))
            f = t["tp"][0] - t["plain"][0]
            bwd = (t["tp"][1] - t["tp"][0]) - (t["plain"][1] - t["plain"][0])
            rows.append({"batch": b, "output_bytes": _output_bytes(b), "forward_s": f, "backward_s": bwd,
                         "plain_s": t["plain"], "tp_s": t["tp"]})
        opt = {}
        for name, mod in (("plain", plain), ("tp", tp)):
            for p in mod.parameters():
                p.grad = torch.zeros_like(p)
            # PyTorch's default on CPU tensors: the per-parameter (single-tensor) loop, as the
            # runtime builds it; every op of it on a DTensor parameter goes through DTensor
            o = torch.optim.AdamW(mod.parameters(), lr=1e-4)
            opt[name] = time_op(o.step, torch.device("cpu"), sizes.min_time_s)
    finally:
        if own_group:
            dist.destroy_process_group()
    (b1, b2) = rows
    tot1, tot2 = b1["forward_s"] + b1["backward_s"], b2["forward_s"] + b2["backward_s"]
    c = max(0.0, (tot2 - tot1) / (b2["output_bytes"] - b1["output_bytes"]))
    a_f = statistics.fmean(max(0.0, r["forward_s"] - c / 2 * r["output_bytes"]) for r in rows) / n_ops
    a_b = statistics.fmean(max(0.0, r["backward_s"] - c / 2 * r["output_bytes"]) for r in rows) / n_ops
    return {"rows": rows, "ops": n_ops, "forward_s": a_f, "backward_s": a_b, "per_output_byte_s": c,
            "optimizer_s": max(0.0, opt["tp"] - opt["plain"]) / n_ops, "optimizer_plain_s": opt["plain"],
            "optimizer_tp_s": opt["tp"]}
