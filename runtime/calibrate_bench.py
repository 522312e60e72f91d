"""Microbenchmarks behind `autoplan calibrate` (runtime.calibrate assembles them into a spec).

What is timed, and how each figure is counted:
- matmul: `torch.mm` of two n x n matrices, FLOPs = 2 n^3, per dtype.
- attention: `F.scaled_dot_product_attention` forward, FLOPs = 4 B H T^2 d (QK^T and PV).
- conv: `F.conv2d` 3x3, stride 1, padding 1, FLOPs = 2 N C_out H W C_in 9.
- memory: `dst.copy_(src)`, bytes moved = 2 x size (one read, one write).
- elementwise: `a + b` (3 x size bytes) and `gelu(a)` (2 x size bytes).
- other (reductions/normalisations): `softmax` and `layer_norm` over the last dim (2 x size bytes).
- launch floor: one `torch.add` of 1-element tensors (dispatcher + kernel launch overhead).
- optimizer: `torch.optim.Adam` (foreach) step on CPU, parameters per second.
- collectives (one process per device, `collective_worker`): all-reduce, all-gather,
  reduce-scatter, broadcast over the whole group, and a ping-pong send/recv between ranks 0 and 1
  (one-way time = round trip / 2). Message size S is the full buffer (nccl-tests convention:
  the all-gather output, the reduce-scatter input). The time of one call is the slowest rank's.

Every time is the *median* of five batches, each batch long enough (`min_time_s`) to swamp the
timer (on a GPU: see "GPU timing" below). Not the best: the cost model predicts a typical step
(benchmarks/fidelity.py compares it with the median of measured steps), and on a shared or
virtualised host the undisturbed speed itself wanders (this 2-core VM: one calibrate run measured
205 GFLOP/s at n = 1024, the same measurement minutes later 172), so the fastest batch is an
upward-biased estimate of what a run gets, while the median ignores the odd disturbed or lucky
batch. CPU measurements run with one intra-op thread per process, as under `torchrun` (which sets
OMP_NUM_THREADS=1).

Cold caches: a training step's working set (weights, activations, gradients) is far larger than
any cache, so an op in a step reads its operands from DRAM/HBM, not from a cache a previous call
of the same op warmed. Compute and memory-bound microbenchmarks therefore rotate over copies of
their operands spanning `Sizes.flush_bytes` (256 MiB by default), so consecutive calls never hit
the previous call's data: the figure triton.testing.do_bench gets by clearing a 256 MB buffer
between runs, and NVBench by flushing L2 (without timing the flush). Measured on this 2-core VM
(one thread): fp32 gelu on 3 MiB 323 us hot vs 652 us cold vs 735 us inside a GPT training step;
bmm 32x(128x48x128) 156 vs 107 vs 101 GFLOP/s; a 512x384x1536 mm 186 vs 175 vs 172 GFLOP/s.

GPU timing: the efficiency curves describe kernels, so on a GPU the compute and memory benchmarks
time the GPU's back-to-back kernels, not the Python loop that issues the calls (`time_op` hands
them to runtime.calibrate_gpu.time_op_gpu; that module's docstring says how and why). The host's
issue time per call is recorded beside it (`host_s_per_call` in the measurements). Larger GEMMs
(`matmul_n_gpu`, up to n=8192) and longer attention (`attention_t_gpu`) are added on a GPU, so
the peak (the best rate) comes from a size that saturates the tensor cores, not from n=2048. A
warm-up (`warm_up_gpu`) brings the clocks up first. `kernel_launch_s` stays the host-loop rate of
a tiny op (the per-op floor: what a step pays per op when its host is the bottleneck), and the
PCIe copy (256 MiB) is timed the host way (the host's time per copy is negligible).

Only this module, runtime.calibrate_gpu and runtime.calibrate touch devices and
torch.distributed (runtime/ may).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# the GPU timing; warm_up_gpu re-exported for runtime.calibrate
from runtime.calibrate_gpu import time_op_gpu, warm_up_gpu  # noqa: F401

DTYPES = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "p2p")


@dataclass(frozen=True)
class Sizes:
    """What to measure. `quick()` is for tests (seconds); the defaults fit < 3 min on 2 cores."""

    matmul_n: dict[str, tuple[int, ...]] = field(
        default_factory=lambda: {
            "fp32": (32, 64, 128, 256, 512, 1024, 2048),
            "fp64": (64, 256, 1024),
            "bf16": (32, 64, 128, 256, 512, 1024, 2048),
            "fp16": (64, 256, 1024),
        }
    )
    attention_t: tuple[int, ...] = (64, 128, 256, 512, 1024)
    conv_hw: tuple[int, ...] = (8, 16, 32, 56)
    memory_bytes: tuple[int, ...] = (2**12, 2**16, 2**20, 2**24, 2**28, 2**30)
    elementwise_bytes: tuple[int, ...] = (2**12, 2**16, 2**20, 2**24, 2**27)
    collective_bytes: tuple[int, ...] = (2**12, 2**16, 2**18, 2**20, 2**22, 2**24, 2**26)
    min_time_s: float = 0.08
    collective_min_time_s: float = 0.1
    # operand copies each compute / memory benchmark rotates over (see the module docstring)
    flush_bytes: int = 256 * 2**20
    # GPUs only (the module docstring, "GPU timing"): GEMM sizes added to bf16 / fp16 / fp32, and
    # attention lengths added; the tensor cores need n >= 4096 or so to reach their best rate
    matmul_n_gpu: tuple[int, ...] = (4096, 8192)
    attention_t_gpu: tuple[int, ...] = (2048, 4096)
    # CPU: measure the engines' host overheads (DTensor, pipelining: ~15 s of the run); without,
    # runtime.calibrate scales the bundled preset's by this host's per-op time
    engine_overheads: bool = True

    @staticmethod
    def quick() -> Sizes:
        return Sizes(
            matmul_n={"fp32": (32, 128, 256), "fp64": (64,), "bf16": (64, 128), "fp16": (64,)},
            attention_t=(32, 64),
            conv_hw=(8,),
            memory_bytes=(2**12, 2**20, 2**22),
            elementwise_bytes=(2**12, 2**20),
            collective_bytes=(2**10, 2**14, 2**18),
            min_time_s=0.005,
            collective_min_time_s=0.005,
            flush_bytes=8 * 2**20,
            matmul_n_gpu=(),
            attention_t_gpu=(),
        )

    @staticmethod
    def host() -> Sizes:
        """`autoplan calibrate --local`: what a small model's prediction on this host depends on,
        in about half a minute on 2 cores. The small end of every curve (a tiny GPT's GEMMs are
        ~1-4 MFLOP, its activations ~32 KiB: per-op host time dominates), shorter batches, the
        collectives up to 4 MiB, the full concurrency figures (core and memory efficiency, sync
        penalty: the shared-host terms of a 4-process step); the engines' overheads scaled, not
        measured (`engine_overheads`). Large GEMMs stop at n = 1024 (the peak ~5% under n = 2048's)."""
        return Sizes(
            matmul_n={"fp32": (32, 64, 128, 256, 512, 1024), "fp64": (256,), "bf16": (64, 256, 1024),
                      "fp16": (256,)},
            attention_t=(32, 64, 128, 256),
            conv_hw=(8, 16),
            memory_bytes=(2**12, 2**16, 2**20, 2**24, 2**27),
            elementwise_bytes=(2**12, 2**16, 2**20, 2**24),
            collective_bytes=(2**12, 2**16, 2**20, 2**22),
            min_time_s=0.02,
            collective_min_time_s=0.03,
            matmul_n_gpu=(4096,),
            attention_t_gpu=(2048,),
            engine_overheads=False,
        )

    def matmul_sizes(self, name: str, device_type: str) -> tuple[int, ...]:
        """The n of the square GEMMs measured in dtype `name` on this kind of device."""
        ns = self.matmul_n[name]
        if device_type != "cuda":
            return ns
        if name == "fp64":
            return ns[:1]  # fp64 on GPUs is a side figure (FP64 units), one size is enough
        return tuple(sorted(set(ns) | set(self.matmul_n_gpu)))

    def attention_lengths(self, device_type: str) -> tuple[int, ...]:
        if device_type != "cuda":
            return self.attention_t
        return tuple(sorted(set(self.attention_t) | set(self.attention_t_gpu)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MAX_OPERAND_SETS = 512  # tiny ops: enough copies that a call's operands left L1/L2 long ago


def operand_sets(tensors: tuple[torch.Tensor, ...], flush_bytes: int) -> list[tuple[torch.Tensor, ...]]:
    """`tensors` and clones of them, enough sets to span `flush_bytes` (at least one set, at most
    MAX_OPERAND_SETS): rotate over them so no call finds its operands in cache."""
    size = sum(t.numel() * t.element_size() for t in tensors)
    n = max(1, min(MAX_OPERAND_SETS, -(-flush_bytes // max(size, 1))))
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(n - 1)]


def time_op(
    fn: Callable[..., object], device: torch.device, min_time_s: float, batches: int = 5,
    sets: list[tuple] | None = None, *, host_loop: bool = False, host_out: list | None = None,
) -> float:
    """Seconds per call of fn: median of `batches` batches, each >= min_time_s (after one warm-up).

    With `sets`, call i is fn(*sets[i % len(sets)]), i counting across warm-up and batches, so
    every call reads operands no recent call touched (cold caches, see the module docstring).
    On a GPU the GPU's time (`time_op_gpu`; its host issue time per call is appended to
    `host_out`), unless `host_loop`: then, as on a CPU, the wall time of the calling loop."""
    if device.type == "cuda" and not host_loop and hasattr(torch.cuda, "_sleep"):
        gpu_s, host_s = time_op_gpu(fn, device, min_time_s, batches, sets)
        if host_out is not None:
            host_out.append(host_s)
        return gpu_s
    sets = sets or [()]
    n = len(sets)
    i = 0
    fn(*sets[i % n])
    i += 1
    _sync(device)
    t0 = time.perf_counter()
    fn(*sets[i % n])
    i += 1
    _sync(device)
    one = max(time.perf_counter() - t0, 1e-7)
    reps = max(1, min(100_000, int(min_time_s / one)))
    per_call = []
    for _ in range(batches):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn(*sets[i % n])
            i += 1
        _sync(device)
        per_call.append((time.perf_counter() - t0) / reps)
    return statistics.median(per_call)


def _linear_gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.addmm(bias, x, w.t())


def measure_matmul(
    device: torch.device, sizes: Sizes, tick: Callable[[str], None], host: dict | None = None
) -> dict[str, list]:
    """dtype -> [(flops, flops_per_s)] for square GEMMs in the form nn.Linear runs them:
    addmm(bias, x, W^T) (a transposed weight view and a bias epilogue: on the 2-core dev VM, cold
    operands, 130 / 154 / 169 GFLOP/s at n = 256 / 384 / 512 against 149 / 171 / 176 for a bare
    mm(a, b); the models' GEMMs are mostly Linears). Sizes: Sizes.matmul_sizes (more on a GPU).
    With `host` (GPU): host["matmul"][dtype] = [(flops, host seconds to issue one call)]."""
    out: dict[str, list] = {}
    for name in sizes.matmul_n:
        dt = DTYPES[name]
        rows = []
        for n in sizes.matmul_sizes(name, device.type):
            a = torch.randn(n, n, device=device, dtype=dt)
            w = torch.randn(n, n, device=device, dtype=dt)
            c = torch.randn(n, device=device, dtype=dt)
            sets = operand_sets((a, w, c), sizes.flush_bytes)
            issue: list[float] = []
            t = time_op(_linear_gemm, device, sizes.min_time_s, sets=sets, host_out=issue)
            del sets, a, w, c
            rows.append((2.0 * n**3, 2.0 * n**3 / t))
            if host is not None and issue:
                host.setdefault("matmul", {}).setdefault(name, []).append((2.0 * n**3, issue[0]))
            tick(f"matmul {name} {n}x{n}")
        out[name] = rows
    return out


def measure_attention(device: torch.device, dtype: torch.dtype, sizes: Sizes, tick,
                      host: dict | None = None) -> list:
    """[(flops, flops_per_s)] for scaled-dot-product attention forward, head_dim 64.
    With `host` (GPU): host["attention"] = [(flops, host seconds to issue one call)]."""
    rows = []
    b, h, d = 2, 4, 64
    for t_len in sizes.attention_lengths(device.type):
        qkv = tuple(torch.randn(b, h, t_len, d, device=device, dtype=dtype) for _ in range(3))
        issue: list[float] = []
        t = time_op(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=False),
            device,
            sizes.min_time_s,
            sets=operand_sets(qkv, sizes.flush_bytes),
            host_out=issue,
        )
        flops = 4.0 * b * h * t_len * t_len * d
        rows.append((flops, flops / t))
        if host is not None and issue:
            host.setdefault("attention", []).append((flops, issue[0]))
        tick(f"attention T={t_len}")
    return rows


def measure_conv(device: torch.device, dtype: torch.dtype, sizes: Sizes, tick) -> list:
    """[(flops, flops_per_s)] for 3x3 conv2d, 64 -> 64 channels, batch 8."""
    rows = []
    n, c = 8, 64
    w = torch.randn(c, c, 3, 3, device=device, dtype=dtype)
    for hw in sizes.conv_hw:
        x = torch.randn(n, c, hw, hw, device=device, dtype=dtype)
        t = time_op(lambda x: F.conv2d(x, w, padding=1), device, sizes.min_time_s,
                    sets=operand_sets((x,), sizes.flush_bytes))
        flops = 2.0 * n * c * hw * hw * c * 9
        rows.append((flops, flops / t))
        tick(f"conv {hw}x{hw}")
    return rows


def measure_memory(device: torch.device, sizes: Sizes, tick, host: dict | None = None) -> list:
    """[(bytes_moved, bytes_per_s)] for copies (read + write).
    With `host` (GPU): host["memory"] = [(bytes_moved, host seconds to issue one call)]."""
    rows = []
    for nbytes in sizes.memory_bytes:
        src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
        dst = torch.empty_like(src).fill_(0.0)  # touch the pages before timing
        sets = operand_sets((src, dst), sizes.flush_bytes)
        issue: list[float] = []
        t = time_op(lambda s, d: d.copy_(s), device, sizes.min_time_s, sets=sets, host_out=issue)
        rows.append((2.0 * nbytes, 2.0 * nbytes / t))
        if host is not None and issue:
            host.setdefault("memory", []).append((2.0 * nbytes, issue[0]))
        tick(f"copy {nbytes / 2**20:.3g} MiB")
        del src, dst, sets
    return rows


def measure_elementwise(
    device: torch.device, dtype: torch.dtype, sizes: Sizes, tick, host: dict | None = None
) -> dict[str, list]:
    """op -> [(bytes_moved, bytes_per_s)] for add, gelu (elementwise) and softmax, layer_norm
    (other). With `host` (GPU): host["elementwise"][op] = [(bytes_moved, host seconds to issue
    one call)]."""
    out: dict[str, list] = {"add": [], "gelu": [], "softmax": [], "layer_norm": []}
    esize = torch.finfo(dtype).bits // 8
    for nbytes in sizes.elementwise_bytes:
        numel = nbytes // esize
        width = min(1024, numel)
        a = torch.randn(numel // width, width, device=device, dtype=dtype)
        b = torch.randn_like(a)
        sets = operand_sets((a, b), sizes.flush_bytes)
        ops = {
            "add": (lambda a, b: torch.add(a, b), 3),
            "gelu": (lambda a, b: F.gelu(a), 2),
            "softmax": (lambda a, b: torch.softmax(a, dim=-1), 2),
            "layer_norm": (lambda a, b, w=width: F.layer_norm(a, (w,)), 2),
        }
        for name, (fn, streams) in ops.items():
            issue: list[float] = []
            t = time_op(fn, device, sizes.min_time_s, sets=sets, host_out=issue)
            moved = float(streams * a.numel() * esize)
            out[name].append((moved, moved / t))
            if host is not None and issue:
                host.setdefault("elementwise", {}).setdefault(name, []).append((moved, issue[0]))
        tick(f"elementwise {nbytes / 2**20:.3g} MiB")
    return out


def measure_launch(device: torch.device, sizes: Sizes) -> float:
    """Seconds of one tiny op (1-element add): the per-op floor. Timed as a host loop on a GPU too:
    the rate at which the host issues ops, what a step whose host is the bottleneck pays per op."""
    a = torch.ones(1, device=device)
    b = torch.ones(1, device=device)
    return time_op(lambda: torch.add(a, b), device, max(sizes.min_time_s, 0.02), host_loop=True)


def measure_adam(sizes: Sizes) -> float:
    """Parameters per second of a CPU AdamW step (torch's default implementation choice and weight
    decay 0.01, as the runtime builds it) on fp32 parameters whose parameter, gradient and two
    moments span `flush_bytes` (16M parameters by default), as tensors of 1M parameters (a weight
    matrix of a small model; the per-tensor passes of torch's CPU implementation reuse the cache
    within a tensor): the step streams them from DRAM, as it does in training (cold caches, see the
    module docstring)."""
    numel = max(2**16, sizes.flush_bytes // 16)
    each = min(numel, 2**20)
    params = [torch.nn.Parameter(torch.randn(each)) for _ in range(numel // each)]
    for p in params:
        p.grad = torch.randn(each)
    numel = each * len(params)
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step()  # create the states outside the timing
    t = time_op(opt.step, torch.device("cpu"), sizes.min_time_s)
    return numel / t


def measure_pcie(device: torch.device, sizes: Sizes) -> float:
    """Host->device bytes/s from pinned memory (GPU only), 256 MiB (16 MiB in quick mode)."""
    nbytes = 2**24 if sizes.min_time_s < 0.01 else 2**28
    src = torch.empty(nbytes // 4, dtype=torch.float32).pin_memory()
    dst = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    t = time_op(lambda: dst.copy_(src, non_blocking=True), device, sizes.min_time_s, host_loop=True)
    return nbytes / t


# ---------------------------------------------------------------- collectives (one process per rank)
def collective_worker(
    rank: int, world: int, init_file: str, backend: str, sizes: Sizes, queue
) -> None:
    """Entry of each spawned process: time every collective at every size; rank 0 reports.

    Messages on `queue`: ("tick", text) per finished measurement, ("result", dict) at the end,
    ("error", text) on failure.
    """
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)  # as under torchrun (OMP_NUM_THREADS=1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu")
        dist.init_process_group(
            backend, init_method=f"file://{init_file}", rank=rank, world_size=world
        )
        res = _run_collectives(rank, world, device, sizes, queue)
        res["shared_host_matmul_flops_per_s"] = _concurrent_matmul(rank, world, device, sizes)
        if device.type == "cpu":
            res["sync_penalty_s"] = _sync_penalty(world, device, sizes)
        if device.type == "cpu" and sizes.engine_overheads:
            from runtime.calibrate_pipeline import pipeline_action_overhead

            res["pipeline_action_s"] = pipeline_action_overhead(rank, world)
        if rank == 0:
            queue.put(("result", res))
        dist.barrier()
        dist.destroy_process_group()
    except Exception as e:  # reported to the parent, which raises it with the rank
        queue.put(("error", f"rank {rank}: {type(e).__name__}: {e}"))
        raise


def _timed_collective(fn, device, min_time_s) -> float:
    """Seconds per call, the slowest rank's, median of 5 batches (batch length agreed by all ranks)."""
    import torch.distributed as dist

    fn()
    _sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    _sync(device)
    one = torch.tensor(
        [time.perf_counter() - t0], dtype=torch.float64, device=device
    )  # NCCL needs it on the GPU
    dist.all_reduce(one, op=dist.ReduceOp.MAX)
    reps = max(1, min(1000, int(min_time_s / max(one.item(), 1e-7))))
    per_call = []
    for _ in range(5):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        el = torch.tensor([(time.perf_counter() - t0) / reps], dtype=torch.float64, device=device)
        dist.all_reduce(el, op=dist.ReduceOp.MAX)
        per_call.append(el.item())
    return statistics.median(per_call)


def _run_collectives(rank, world, device, sizes: Sizes, queue) -> dict:
    import torch.distributed as dist

    # torch >= 2.12 renamed the tensor forms (the old names warn); same collectives either way.
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    out: dict[str, list] = {name: [] for name in COLLECTIVES}
    for nbytes in sizes.collective_bytes:
        numel = max(world, nbytes // 4) // world * world  # divisible by the world size
        full = torch.ones(numel, device=device)
        shard = torch.ones(numel // world, device=device)
        ops = {
            "all_reduce": lambda f=full: dist.all_reduce(f),
            "all_gather": lambda f=full, s=shard: all_gather(f, s),
            "reduce_scatter": lambda f=full, s=shard: reduce_scatter(s, f),
            "broadcast": lambda f=full: dist.broadcast(f, src=0),
        }
        for name, fn in ops.items():
            t = _timed_collective(fn, device, sizes.collective_min_time_s)
            out[name].append((float(numel * 4), t))
        out["p2p"].append((float(numel * 4), _p2p_one_way(rank, full, device, sizes)))
        if rank == 0:
            queue.put(("tick", f"collectives {nbytes / 2**20:.3g} MiB"))
    return out


def _p2p_one_way(rank, buf, device, sizes: Sizes) -> float:
    """One-way seconds of a send/recv between ranks 0 and 1 (ping-pong / 2); others wait."""
    import torch.distributed as dist

    def pingpong():
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)

    if rank > 1:
        pingpong = lambda: None  # noqa: E731 - idle ranks still join the timing reductions
    return _timed_collective(pingpong, device, sizes.collective_min_time_s) / 2


def _concurrent_matmul(rank, world, device, sizes: Sizes) -> dict[str, float]:
    """fp32 matmul FLOP/s (operands rotated, cold caches) timed the same way (fixed wall time) by
    rank 0 alone (the others wait in a barrier) and then by all `world` processes at once: {"alone", "median", "sum"} (per-process
    median and the sum over processes while all run).

    Checks the shared-host assumption (per-process throughput = single * min(1, cores / N)), and
    gives the host's aggregate throughput with every process busy (the effective cores). On a CPU
    the same for cold 1 MiB copies ({"copy_alone", "copy_sum"}, bytes/s read + written) and for
    a transformer MLP block's forward + backward ({"block_alone", "block_sum"}, GEMM FLOP/s).
    """
    import torch.distributed as dist

    n = 256 if sizes.min_time_s < 0.01 else 512
    duration_s = max(sizes.min_time_s * 10, 0.05) if sizes.min_time_s < 0.01 else 0.6
    a = torch.randn(n, n, device=device)
    sets = operand_sets((a,), sizes.flush_bytes)  # cold operands, as for the single-process figures
    torch.mm(a, a)

    def run() -> float:
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < duration_s:
            x = sets[reps % len(sets)][0]
            torch.mm(x, x)
            reps += 1
        _sync(device)
        return 2.0 * n**3 * reps / (time.perf_counter() - t0)

    def both(fn) -> tuple[float, list[float]]:
        dist.barrier()
        alone = fn() if rank == 0 else 0.0
        dist.barrier()
        mine = torch.tensor([fn()], dtype=torch.float64, device=device)
        gathered = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(world)]
        dist.all_gather(gathered, mine)
        return alone, sorted(g.item() for g in gathered)

    alone, vals = both(run)
    out = {"alone": alone, "median": vals[len(vals) // 2], "sum": sum(vals)}
    if device.type == "cpu":
        # memory-bound work shares the host's memory system too: cold 1 MiB copies, same timing
        src = torch.ones(2**18, device=device)
        csets = operand_sets((src, torch.zeros_like(src)), sizes.flush_bytes)

        def copy() -> float:
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < duration_s:
                s, d = csets[reps % len(csets)]
                d.copy_(s)
                reps += 1
            return 2.0 * src.numel() * src.element_size() * reps / (time.perf_counter() - t0)

        c_alone, c_vals = both(copy)
        out.update(copy_alone=c_alone, copy_sum=sum(c_vals))
        # a training-like op mix: a transformer MLP block's forward + backward (LayerNorm, Linear
        # h -> 4h, GELU, Linear 4h -> h) on T tokens; oversubscribed cores also lose time to
        # context switches and to each other's cache footprint, which a matmul loop barely shows
        h, t_len = (64, 64) if sizes.min_time_s < 0.01 else (512, 512)
        block = torch.nn.Sequential(torch.nn.LayerNorm(h), torch.nn.Linear(h, 4 * h), torch.nn.GELU(),
                                    torch.nn.Linear(4 * h, h)).to(device)
        xs = [torch.randn(t_len, h, device=device, requires_grad=True) for _ in range(8)]
        block(xs[0]).sum().backward()
        block_flops = 3 * 2 * t_len * h * 4 * h * 2  # fwd + bwd (2x fwd) of the two GEMMs

        def mix() -> float:
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 2 * duration_s:
                block(xs[reps % len(xs)]).sum().backward()
                reps += 1
            return block_flops * reps / (time.perf_counter() - t0)

        b_alone, b_vals = both(mix)
        out.update(block_alone=b_alone, block_sum=sum(b_vals))
    return out


def cpu_count() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _sync_penalty(world, device, sizes: Sizes) -> float:
    """Average extra wait per blocking collective when every process alternates a compute chunk
    with a small all-reduce (4 KiB): per iteration, t(compute + all-reduce) - t(compute) -
    t(all-reduce), each loop run by all processes at once and timed by the slowest rank; median
    of 5 repetitions, clamped at 0. On a host with fewer cores than processes a blocked process
    often waits for a descheduled peer, and finds its caches refilled by the others when it runs
    again: this is that cost (cost_models.sharedhost). The chunk is a transformer MLP block's
    forward at a small model's size (256 tokens, h = 512: 8 MiB of weights, ~5-10 ms on one core),
    so the caches it refills are a training step's (with a 512x512 matmul, 1 MiB, the penalty
    measured 0-1.4 ms; the engines' waits in the fidelity runs were several ms)."""
    import torch.distributed as dist

    quick = sizes.min_time_s < 0.01
    h, rows = (64, 32) if quick else (512, 256)
    iters = 5 if quick else 20
    w1 = torch.randn(4 * h, h, device=device) / h**0.5
    w2 = torch.randn(h, 4 * h, device=device) / (4 * h) ** 0.5
    x = torch.randn(rows, h, device=device)
    small = torch.ones(1024, device=device)

    def chunk() -> None:
        torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, w1)), w2)

    def loop(compute: bool, comm: bool) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            if compute:
                chunk()
            if comm:
                dist.all_reduce(small)
        el = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64, device=device)
        dist.all_reduce(el, op=dist.ReduceOp.MAX)
        return el.item()

    loop(True, True)  # warm-up
    excess = []
    for _ in range(5):
        excess.append(loop(True, True) - loop(True, False) - loop(False, True))
    return max(0.0, statistics.median(excess))
