"""`autoplan calibrate`: the CPU time torch.distributed.pipelining adds per pipeline action.

Run by every calibrate worker process (runtime.calibrate_bench.collective_worker, CPU hosts):
the N processes form an N-stage pipeline of MLP stages (Linear h->4h, GELU, Linear 4h->h) and
run the runtime's engine (PipelineStage + Schedule1F1B, M micro-batches, point-to-point sends
of each boundary activation and its gradient); each process then runs the same forwards and
backwards on its stage module alone, one micro-batch's backward right after its forward. The difference in the process's
CPU time (time.process_time: all its threads, gloo's included), over its 2 M actions, is the
engine's host time per action: schedule bookkeeping, receive buffers, the sends and receives,
and the cache misses of running a micro-batch's backward long after its forward.
Reported: the mean over the stages (first and last stages do half the transfers of the middle
ones). The cost model charges it per forward and per backward action on CPU hosts
(HardwareSpec.pipeline_action_overhead_s).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

HIDDEN = 512  # stages at a small transformer's size: 512 KiB activations per micro-batch, GEMMs that
SEQ = 128  # evict the caches between actions (with 64 KiB ones the engine measured ~0.4 ms per action)
MICRO_BATCH = 2
MICRO_BATCHES = 8
STEPS = 7


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def pipeline_action_overhead(rank: int, world: int) -> float:
    """CPU seconds per action the pipelining engine adds (mean over stages; see module docstring)."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    torch.manual_seed(rank)
    mod = nn.Sequential(nn.Linear(HIDDEN, 4 * HIDDEN), nn.GELU(), nn.Linear(4 * HIDDEN, HIDDEN))
    stage = PipelineStage(mod, rank, world, torch.device("cpu"))
    sched = Schedule1F1B(stage, n_microbatches=MICRO_BATCHES, loss_fn=_loss)
    x = torch.randn(MICRO_BATCH * MICRO_BATCHES, SEQ, HIDDEN)
    y = torch.randn(MICRO_BATCH * MICRO_BATCHES, SEQ, HIDDEN)

    def pipe() -> None:
        if rank == 0:
            sched.step(x)
        elif rank == world - 1:
            sched.step(target=y)
        else:
            sched.step()

    def solo() -> None:
        for i in range(MICRO_BATCHES):
            xi = x[i * MICRO_BATCH:(i + 1) * MICRO_BATCH].detach().requires_grad_(rank > 0)
            out = mod(xi)
            if rank == world - 1:
                _loss(out, y[i * MICRO_BATCH:(i + 1) * MICRO_BATCH]).backward()
            else:
                out.backward(torch.ones_like(out))

    for fn in (pipe, solo):
        fn()  # warm-up (the engine's first step also agrees on shapes)
    diffs = []
    for _ in range(STEPS):  # alternating, so drift of the machine's speed hits both alike
        got = []
        for fn in (pipe, solo):
            dist.barrier()
            c = time.process_time()
            fn()
            got.append(time.process_time() - c)
        diffs.append(got[0] - got[1])
    mine = torch.tensor([max(0.0, statistics.median(diffs)) / (2 * MICRO_BATCHES)], dtype=torch.float64)
    dist.all_reduce(mine)
    return float(mine.item()) / world
