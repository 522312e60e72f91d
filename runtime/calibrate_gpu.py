"""GPU timing for runtime.calibrate_bench: `time_op_gpu` (the GPU's own seconds per call of a
benchmark, and the host's seconds to issue one) and `warm_up_gpu` (clocks up before measuring).
calibrate_bench.time_op hands CUDA devices to time_op_gpu unless told to time the host loop.

Why and how: the efficiency curves describe kernels, so on a GPU the compute and memory
benchmarks time the GPU, not the Python loop that issues the calls. A loop of calls timed on the
host runs at the slower of the GPU and the host's issue rate, and a small kernel is faster
than its issue: on an H200 VM (torch 2.11), timed that way, a bf16 addmm took 19.9-20.7 us per
call for every n from 32 to 1024 (6.6e4 to 2.1e9 FLOPs; at n=1024 ~108 TFLOP/s, 0.1665 of the
n=2048 rate, where the GPU needs a few us), a 1-element add 7 us. So each batch is queued behind a
spin kernel (torch.cuda._sleep) that holds the GPU until the host has issued every call of the
batch (checked: the batch's start event must still be pending when the last call is issued; else
the batch is redone with a longer hold), and timed by CUDA events around the calls: back-to-back
kernels, as a training step's GPU runs them while its host is ahead. The host's issue time per
call is returned beside it. A warm-up (`warm_up_gpu`) brings the clocks up first.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

GPU_MAX_REPS = 256  # calls queued per batch: well inside the GPU's launch queue (~1000 entries)
_SLEEP_CYCLES_PER_S: dict[int, float] = {}


def _sleep_cycles_per_s(device: torch.device) -> float:
    """Cycles per second of torch.cuda._sleep's spin kernel on `device` (measured once)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SLEEP_CYCLES_PER_S:
        torch.cuda._sleep(1000)  # load the kernel
        torch.cuda.synchronize(device)
        cycles = 10_000_000  # ~5 ms at 2 GHz
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _SLEEP_CYCLES_PER_S[key] = cycles / max(start.elapsed_time(end) * 1e-3, 1e-6)
    return _SLEEP_CYCLES_PER_S[key]


def warm_up_gpu(device: torch.device, seconds: float = 0.5) -> None:
    """Keep the GPU busy with large bf16 GEMMs for `seconds` (clocks up, cuBLAS loaded)."""
    with torch.cuda.device(device):
        a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(10):
                torch.mm(a, a)
            torch.cuda.synchronize(device)


def time_op_gpu(
    fn: Callable[..., object], device: torch.device, min_time_s: float, batches: int = 5,
    sets: list[tuple] | None = None,
) -> tuple[float, float]:
    """(GPU seconds per call, host seconds per call) of fn on a CUDA device, medians of `batches`
    batches of back-to-back calls (module docstring); `sets` as in calibrate_bench.time_op.

    Each batch: a spin kernel holds the GPU for about twice the host's time to issue the batch;
    start event, the calls, end event; the batch counts only if its start event was still
    pending when the host had issued every call (no call waited for its issue), else it is redone
    with a longer hold (and, every second retry, half the calls). Calls per batch: enough for
    `min_time_s` of GPU time, at most GPU_MAX_REPS, from a first batch of 4 calls."""
    sets = sets or [()]
    n = len(sets)
    i = 0
    with torch.cuda.device(device):
        cps = _sleep_cycles_per_s(device)

        def batch(reps: int, hold_s: float) -> tuple[float, float, bool]:
            nonlocal i
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(int(hold_s * cps))
            start.record()
            h0 = time.perf_counter()
            for _ in range(reps):
                fn(*sets[i % n])
                i += 1
            end.record()
            host = (time.perf_counter() - h0) / reps
            held = not start.query()  # the GPU had not started the calls when the last was issued
            end.synchronize()
            return start.elapsed_time(end) * 1e-3 / reps, host, held

        for _ in range(3):  # warm-up: cuBLAS heuristics, allocator, first-call setup
            fn(*sets[i % n])
            i += 1
        torch.cuda.synchronize(device)
        gpu, host, _ = batch(4, 2e-3)
        reps = max(1, min(GPU_MAX_REPS, int(min_time_s / max(gpu, 1e-7))))
        per_call: list[float] = []
        issue: list[float] = []
        retries = 0
        while len(per_call) < batches:
            g, h, held = batch(reps, 2.0 * reps * host + 1e-3)
            host = max(host, h)
            if held:
                per_call.append(g)
                issue.append(h)
                continue
            retries += 1
            if retries > 12:
                raise RuntimeError(f"time_op_gpu: the host could not queue {reps} calls ahead "
                                   f"of the GPU ({h * 1e6:.1f} us per call)")
            host *= 2
            if retries % 2 == 0:
                reps = max(1, reps // 2)
    return statistics.median(per_call), statistics.median(issue)
