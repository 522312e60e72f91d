"""The `--profile` attribution of benchmarks/fidelity_gpu.py: one step split into phases by host
clocks and CUDA events (forward + backward vs optimizer step), and one step under torch.profiler
summarised as GPU kernel time by category, GPU busy time (union of kernel intervals), top kernels
and host-side aten ops / launches (on a CPU: CPU op self time by category); `profile_line` prints
a plan's summary. Also `_sync`, the device synchronisation fidelity_gpu's timing uses.
"""

from __future__ import annotations

import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Kernel (or, on a CPU, aten op) name -> category: the first whose lower-case substrings match.
# Order matters: optimizer kernels are elementwise maths too, cuBLAS/CUTLASS template names can
# contain anything, a cast is an elementwise kernel with a copy functor.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("optimizer", ("multi_tensor_apply", "foreach", "adam", "fused_sgd")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "aten::mm", "aten::addmm",
              "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("memset", ("memset", "fillfunctor", "aten::fill_", "aten::zero_")),
    ("copy/cast", ("memcpy", "copy", "catarray", "aten::cat", "aten::to", "aten::_to_copy",
                   "aten::clone", "aten::contiguous")),
    ("softmax", ("softmax",)),
    ("norm/reduce", ("layer_norm", "layernorm", "reduce_kernel", "welford", "reduction", "norm",
                     "nll_loss", "cross_entropy", "aten::sum", "aten::mean")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "aten::add", "aten::mul",
                     "aten::div", "aten::sub", "aten::gelu", "aten::masked_fill", "aten::where",
                     "aten::neg", "aten::relu", "aten::silu", "aten::dropout", "aten::threshold",
                     "aten::sqrt", "aten::rsqrt", "aten::lerp", "aten::addcdiv", "aten::addcmul",
                     "aten::exp", "aten::pow", "aten::tanh")),
)
LAUNCH_APIS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
               "cudaMemcpyAsync", "cudaMemsetAsync", "cudaLaunchCooperativeKernel")
TOP_KERNELS = 15


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def _marked_step(pm, batch, device: torch.device) -> dict:
    """One train_step with host clocks and (on CUDA) events at its start, around the optimizer
    step (ParallelModel._optimizer_step, wrapped for this step only) and at its end."""
    cuda = device.type == "cuda"
    marks: dict[str, tuple[float, object]] = {}

    def mark(label: str) -> None:
        ev = None
        if cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
        marks[label] = (time.perf_counter(), ev)

    wrap = callable(getattr(type(pm), "_optimizer_step", None))
    if wrap:
        inner = pm._optimizer_step

        def optimizer_step() -> None:
            mark("optimizer")
            inner()
            mark("optimizer_end")

        pm._optimizer_step = optimizer_step
    try:
        _sync(device)
        mark("start")
        pm.train_step(batch)
        mark("end")
        _sync(device)
        wall = time.perf_counter() - marks["start"][0]
    finally:
        if wrap:
            pm.__dict__.pop("_optimizer_step", None)
    out: dict = {"wall_s": wall}
    order = ["start", "optimizer", "optimizer_end", "end"] if "optimizer" in marks else [
        "start", "end"]
    names = {"start": "forward_backward", "optimizer": "optimizer", "optimizer_end": "tail"}
    if len(order) == 2:
        names["start"] = "step"
    spans = list(zip(order, order[1:], strict=False))
    out["host_s"] = {names[a]: marks[b][0] - marks[a][0] for a, b in spans}
    # wall - host time of the call: how long the host then waited for the GPU to finish
    out["host_wait_at_end_s"] = wall - (marks["end"][0] - marks["start"][0])
    if cuda:
        out["gpu_s"] = {names[a]: marks[a][1].elapsed_time(marks[b][1]) * 1e-3
                        for a, b in spans}
    return out


def phase_step(pm, batch, device: torch.device) -> dict:
    """One step (no profiler) split into phases: host time from the calls' start to their return
    and (CUDA) GPU time between events recorded at those points (idle gaps included)."""
    return _marked_step(pm, batch, device)


def _raw_events(prof) -> list[tuple[str, bool, float, float]]:
    """(name, on the device, start us, duration us) of every profiler event, from the raw
    kineto results where available (cheap), else from the parsed FunctionEvents."""
    kr = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    cpu = torch.autograd.DeviceType.CPU
    if kr is not None:
        return [(e.name(), e.device_type() != cpu and not _annotation(e, True),
                 e.start_ns() / 1e3, e.duration_ns() / 1e3) for e in kr.events()]
    return [(e.name, e.device_type != cpu and not _annotation(e, False), e.time_range.start,
             e.time_range.elapsed_us()) for e in prof.events()]


# Device-timeline activities that are not GPU work: waits (CUPTI's synchronisation records) and
# the GPU-side spans of record_function ranges (the optimizer's "Optimizer.step#AdamW.step").
NOT_GPU_WORK = ("Stream Sync", "Event Sync", "Context Sync", "Stream Wait Event", "Overhead")


def _annotation(e, raw: bool) -> bool:
    flag = getattr(e, "is_user_annotation", False)
    if raw and callable(flag):
        flag = flag()
    name = e.name() if raw else e.name
    return bool(flag) or name.startswith(NOT_GPU_WORK)


def _union_us(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        busy += e - max(s, end)
        end = e
    return busy


def profile_step(pm, batch, device: torch.device) -> dict:
    """One train_step under torch.profiler (CPU + CUDA activities), summarised."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    with profile(activities=acts) as prof:
        marked = _marked_step(pm, batch, device)
    t0 = time.perf_counter()
    out = profile_summary(prof, marked, cuda)
    out["summarise_s"] = time.perf_counter() - t0
    del prof
    return out


def profile_summary(prof, marked: dict, cuda: bool) -> dict:
    """The profiled step: `wall_s` (its wall time, profiler overhead included: host-bound parts
    run slower than unprofiled) and its phases; on CUDA the device activity (kernels, memcpy,
    memset): `kernels`, `kernel_s` (sum of durations), `gpu_busy_s` (union of their intervals),
    `gpu_busy_fraction` (busy / wall), `by_category` {category: {s, count, share}},
    `top_kernels` [{name (120 chars), count, total_us}]; host side `aten_ops` (aten ops
    dispatched, nested ones included) and `launches` (kernel launch / async memcpy-memset API
    calls). On a CPU: `cpu_self_s_by_category` and `top_cpu_ops` by self CPU time."""
    events = _raw_events(prof)
    wall = marked["wall_s"]
    out: dict = {"wall_s": wall, "phases": {k: v for k, v in marked.items() if k != "wall_s"}}
    host = [e for e in events if not e[1]]
    out["aten_ops"] = sum(1 for e in host if e[0].startswith("aten::"))
    out["launches"] = sum(1 for e in host if e[0] in LAUNCH_APIS)
    out["profiler_events"] = len(events)
    if cuda:
        dev = [e for e in events if e[1] and e[3] > 0]
        kernel_us = sum(e[3] for e in dev)
        busy_us = _union_us([(e[2], e[2] + e[3]) for e in dev])
        by_name: dict[str, list] = {}
        for name, _, _, dur in dev:
            agg = by_name.setdefault(name, [0, 0.0])
            agg[0] += 1
            agg[1] += dur
        cats: dict[str, dict] = {}
        for name, (count, us) in by_name.items():
            c = cats.setdefault(category(name), {"s": 0.0, "count": 0})
            c["s"] += us * 1e-6
            c["count"] += count
        for c in cats.values():
            c["share"] = c["s"] / (kernel_us * 1e-6) if kernel_us else 0.0
        top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:TOP_KERNELS]
        out.update(
            kernels=len(dev), kernel_s=kernel_us * 1e-6, gpu_busy_s=busy_us * 1e-6,
            gpu_busy_fraction=busy_us * 1e-6 / wall if wall else None,
            kernel_fraction=kernel_us * 1e-6 / wall if wall else None,
            by_category=dict(sorted(cats.items(), key=lambda kv: -kv[1]["s"])),
            top_kernels=[{"name": n[:120], "count": c, "total_us": round(us, 1)}
                         for n, (c, us) in top],
        )
    else:
        avgs = [a for a in prof.key_averages() if a.key.startswith("aten::")]
        cats = {}
        for a in avgs:
            c = cats.setdefault(category(a.key), {"s": 0.0, "count": 0})
            c["s"] += a.self_cpu_time_total * 1e-6
            c["count"] += a.count
        total = sum(c["s"] for c in cats.values())
        for c in cats.values():
            c["share"] = c["s"] / total if total else 0.0
        top = sorted(avgs, key=lambda a: -a.self_cpu_time_total)[:TOP_KERNELS]
        out.update(
            cpu_self_s=total,
            cpu_self_s_by_category=dict(sorted(cats.items(), key=lambda kv: -kv[1]["s"])),
            top_cpu_ops=[{"name": a.key[:120], "count": a.count,
                          "self_us": round(a.self_cpu_time_total, 1)} for a in top],
        )
    return out


def profile_line(r: dict) -> str | None:
    """The extra line printed per plan under --profile."""
    if r.get("profile_error"):
        return f"    profile failed: {r['profile_error'][:90]}"
    pr, ph = r.get("profile"), r.get("phases")
    if not pr:
        return None
    if "by_category" in pr:
        busy, of_meas = pr["gpu_busy_fraction"], pr.get("gpu_busy_fraction_of_measured")
        head = (f"GPU busy {pr['gpu_busy_s'] * 1e3:.1f} ms = {busy:.0%} of the profiled step "
                f"({pr['wall_s'] * 1e3:.1f} ms)"
                + (f", {of_meas:.0%} of the measured" if of_meas is not None else "")
                + f"; kernels {pr['kernel_s'] * 1e3:.1f} ms in {pr['kernels']}")
        cats = pr["by_category"]
    else:
        head = f"CPU ops self {pr['cpu_self_s'] * 1e3:.1f} ms of {pr['wall_s'] * 1e3:.1f} ms"
        cats = pr["cpu_self_s_by_category"]
    top = ", ".join(f"{k} {v['share']:.0%}" for k, v in list(cats.items())[:4])
    line = f"    {head}\n    {top}; {pr['aten_ops']} aten ops, {pr['launches']} launches"
    if ph:
        gpu = ph.get("gpu_s") or ph["host_s"]
        parts = " / ".join(f"{k} {v * 1e3:.1f}" for k, v in gpu.items() if k != "tail")
        line += f"\n    phases ({'GPU' if ph.get('gpu_s') else 'host'} ms, unprofiled): {parts}"
        if ph.get("gpu_s"):
            line += (f"; host fwd+bwd {ph['host_s'].get('forward_backward', 0) * 1e3:.1f}, "
                     f"host waits {ph['host_wait_at_end_s'] * 1e3:.1f}")
    return line
