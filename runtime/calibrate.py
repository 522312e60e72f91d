"""`autoplan calibrate`: measure this machine and write a specs.HardwareSpec.

    autoplan calibrate [--nproc N] [-o myhw.yaml] [--preset-form] [--quick]
    autoplan calibrate --local [--nproc N]     (this host, for `--hw local`; ~30 s, cached)
    python -m runtime.calibrate ...            (the same, without the CLI)

`--local` is the quick host calibration behind `HardwareSpec.preset("local")`: the sizes of
`Sizes.host()` (the small end of every curve, where a small model's ops live, the collectives
up to 4 MiB and the full shared-host concurrency figures), written in preset form to
specs.hardware.local_spec_path() (<cache home>/hosts/<host key>.yaml, the key naming the CPU
model, cores, torch version and GPU). It does not time the engines' overheads (DTensor, the
pipelining engine: ~15 s): it takes the bundled cpu preset's and scales them by this host's
per-op time over the preset host's (`scaled_engine_overheads`), and says so in `sources`.

What goes where (the microbenchmarks are in runtime.calibrate_bench):
- `device.peak_flops_per_s[dtype]`: the best matmul FLOP/s over the sizes measured (each size's
  figure the median of its batches, operands cold: runtime.calibrate_bench; on a GPU the GPU's
  own time of back-to-back calls, not the host loop's, and GEMMs up to n = 8192).
- `device.memory_bandwidth_bytes_per_s`: the best copy bandwidth over the sizes measured (up to
  1 GiB, operands rotated past the caches), and the `memory` curve gives the fraction reached
  at each size.
- `device.kernel_launch_s`: time of one tiny op.
- `efficiency` (op kind -> [(size, fraction of peak)], what the cost model interpolates):
  matmul, attention, conv: size in FLOPs, fraction of the primary dtype's matmul peak
  (fp32 on CPU, bf16 on GPU; the schema keeps one curve per kind, not per dtype);
  memory (copies), elementwise (mean of add and gelu), other (mean of softmax and layer_norm):
  size in bytes moved, fraction of the memory bandwidth.
- Collectives: for each collective c an alpha-beta fit of the measured times
      t_c(S) = steps_c(n) * alpha_c + bus_c(n) * S / B_c
  with the ring conventions of nccl-tests' bus bandwidth: all-reduce steps 2(n-1), bus 2(n-1)/n;
  all-gather and reduce-scatter steps n-1, bus (n-1)/n; broadcast steps n-1, bus 1 (pipelined
  ring); p2p steps 1, bus 1 (`fit_alpha_beta`, least squares on relative error). These are
  reported in `sources`. The cost model, however, sees ONE link (alpha, bandwidth x
  collective_efficiency) for every collective, so `fit_link` fits that pair jointly to every
  collective and size with the cost model's own formulas (cost_models/comm.py: ring, tree where
  better): `intra_node.latency_s` = the joint alpha, `intra_node.bandwidth_bytes_per_s` = the p2p
  busbw (the raw link), `collective_efficiency` = joint busbw / p2p busbw.
  One host cannot measure a network: `inter_node` repeats `intra_node` and says so.
- CPU hosts: processes share the cores. With `--preset-form` the output is the bundled-preset form
  (specs/presets/cpu.yaml): a `shared_host` entry plus per-process figures for a process that has a
  core to itself; `HardwareSpec.preset("cpu", devices=N)` multiplies FLOP/s and memory bandwidth by
  min(1, cores / N) and divides host memory by N. Without it, the output is a plain HardwareSpec for
  exactly `--nproc` processes, with that scaling already applied (`shared_host_scale`).
  The collective workers also run matmuls concurrently to check that scaling; the result is
  printed and recorded in `sources`. The preset scaling also sets `shared_cores` (the cost model
  then lets processes share cores dynamically, cost_models.estimate) and scales
  `host.cpu_adam_params_per_s` like FLOP/s.
- `collectives`: the per-collective fits above (alpha, busbw), used by cost_models.comm for
  groups inside a node in place of the one joint link.
- CPU: `comm_overlaps_compute: false` (gloo runs on the compute cores) and
  `device_is_host_cpu: true` (the optimizer step runs at the measured Adam rate).
- CPU: the engines' own host time, which the same cores pay: `dtensor_overhead` (per
  tensor-parallel op in forward and backward, per DTensor op's parameters in the optimizer step;
  runtime/calibrate_dtensor.py) and `pipeline_action_overhead_s` (per pipeline action, measured by
  the collective workers as an N-stage pipeline; runtime/calibrate_pipeline.py). Both are small
  differences of larger times on a shared VM: they vary by ~+-30% between runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from runtime import calibrate_bench as bench
from runtime.calibrate_fit import RING, fit_alpha_beta, fit_link, model_time_s  # noqa: F401 (re-exported)
from specs import HardwareSpec, SpecError
from specs._base import validate_model
from specs.hardware import LOCAL_PRESET, apply_shared_host, host_key, local_spec_path
from specs.io import dump_data, load_data

PRESET_HEADER = """\
# This kind of machine: one host, N processes (gloo) sharing its cores and memory.
# Written by `autoplan calibrate --preset-form` (runtime/calibrate.py); rerun it to refresh.
# Figures are per process for a process with a core to itself (one intra-op thread, as under
# torchrun); HardwareSpec.preset("cpu", devices=N) multiplies FLOP/s and memory bandwidth by
# min(1, cores / N) and divides host memory among the N processes (shared_host); it also sets
# shared_cores, with which the cost model lets processes share the cores dynamically
# (cost_models/sharedhost.py; core_efficiency / memory_efficiency = measured aggregate throughput
# of N busy processes over cores x one alone: a transformer MLP block's fwd+bwd / cold copies). The link figures were measured with devices_per_node processes;
# `collectives` holds each collective's own fit. comm_overlaps_compute is false: gloo runs on
# the compute cores.
"""

LOCAL_HEADER = """\
# This host, as `HardwareSpec.preset("local", devices=N)` / `--hw local:N` sees it: written by
# `autoplan calibrate --local` (runtime/calibrate.py, the quick host calibration), in the form of
# specs/presets/cpu.yaml (whose header explains the fields). Delete this file to re-measure.
"""

# ------------------------------------------------------------------------------- pure helpers
def efficiency_curve(rows: list[tuple[float, float]], peak: float) -> list[dict[str, float]]:
    """[(size, achieved)] -> sorted [{size, efficiency}] with efficiency = achieved / peak in (0, 1]."""
    pts = {}
    for size, achieved in rows:
        pts[float(size)] = max(1e-4, min(1.0, achieved / peak))
    return [{"size": s, "efficiency": round(e, 4)} for s, e in sorted(pts.items())]


def mean_rows(*series: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Elementwise mean of several [(size, value)] series measured at the same sizes."""
    return [(rows[0][0], sum(r[1] for r in rows) / len(rows)) for rows in zip(*series, strict=True)]


def shared_host_scale(data: dict[str, Any], devices: int) -> dict[str, Any]:
    """Preset-form data -> plain HardwareSpec data for `devices` processes on the host.

    The same scaling as HardwareSpec.preset (specs.hardware.apply_shared_host).
    """
    data = dict(data)
    shared = data.pop("shared_host", None)
    data["num_nodes"], data["devices_per_node"] = 1, devices
    return apply_shared_host(data, shared) if shared else data


def core_efficiency(aggregate: float, alone: float, cores: int, nproc: int) -> float:
    """Aggregate matmul throughput of nproc processes at once over what min(cores, nproc) cores
    would give at one process's rate (both timed the same way), clamped to (0, 1]."""
    if alone <= 0:
        return 1.0
    return _sig(min(1.0, max(1e-3, aggregate / (min(cores, nproc) * alone))))


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def scaled_engine_overheads(launch_s: float, preset: dict[str, Any]) -> dict[str, Any]:
    """The bundled cpu preset's engine overheads (DTensor per op, pipelining per action) scaled
    to a host whose tiny op takes `launch_s`: both are Python dispatch on the host, which runs
    at the speed a tiny op shows. The ratio is clamped to [0.25, 4] (a disturbed timing of a
    1-microsecond op must not scale them tenfold). Returns the measurement fields `measure`
    would have filled ("dtensor", "pipeline_action_s") and "engine_overheads_scaled" (the ratio
    and the preset host's key, for `sources`)."""
    ratio = min(4.0, max(0.25, launch_s / preset["device"]["kernel_launch_s"]))
    dt = preset["dtensor_overhead"]
    return {
        "dtensor": {k: dt[k] * ratio for k in ("forward_s", "backward_s", "optimizer_s")},
        "pipeline_action_s": preset["pipeline_action_overhead_s"] * ratio,
        "engine_overheads_scaled": {"ratio": ratio, "from": preset.get("sources", {}).get("host_key", "?")},
    }


def build_spec_data(m: dict[str, Any], *, nproc: int, date: str, host: str) -> dict[str, Any]:
    """Measurements (see `measure`) -> HardwareSpec data in preset form (`shared_host` on CPU)."""
    gpu = m["device_type"] == "cuda"
    primary = "bf16" if gpu else "fp32"
    where = f"measured by autoplan calibrate on {date}, this machine ({host})"
    peaks = {dt: max(r[1] for r in rows) for dt, rows in m["matmul"].items()}
    if gpu and "tf32" in m:
        peaks["tf32"] = m["tf32"]
    mem = m["memory"]
    # Peak = the best copy rate at any size; the "memory" curve carries the rate at each size
    # (efficiency x peak = the measured median there), so the choice of peak does not bias times.
    mem_bw = max(r[1] for r in mem)
    fits = {}
    for name, (steps_f, bus_f) in RING.items() if m["collectives"] else ():
        n = 2 if name == "p2p" else nproc
        alpha, bw = fit_alpha_beta(m["collectives"][name], steps_f(n), bus_f(n))
        fits[name] = (alpha, bw)
    if not m["collectives"]:  # one device: placeholder link (never used by a 1-device plan)
        alpha, bus_bw, rms = m["launch_s"], mem_bw, 0.0
        fits["none"] = (alpha, bus_bw)
    else:
        alpha, bus_bw, rms = fit_link(m["collectives"], nproc)
        # The joint fit may not claim more bandwidth than any collective's own fit supports (with
        # messages too small to resolve it, its grid search runs to the edge: 10+ TB/s).
        bus_bw = min(bus_bw, max(b for _, b in fits.values()))
    link_bw = max(bus_bw, fits.get("p2p", (0.0, 0.0))[1])
    coll_eff = min(1.0, bus_bw / link_bw)
    fit_text = "; ".join(
        f"{k}: alpha {a * 1e6:.1f} us, busbw {b / 1e9:.3g} GB/s" for k, (a, b) in fits.items()
    )
    eff = {
        "matmul": efficiency_curve(m["matmul"][primary], peaks[primary]),
        "attention": efficiency_curve(m["attention"], peaks[primary]),
        "conv": efficiency_curve(m["conv"], peaks[primary]),
        "memory": efficiency_curve(mem, mem_bw),
        "elementwise": efficiency_curve(
            mean_rows(m["elementwise"]["add"], m["elementwise"]["gelu"]), mem_bw
        ),
        "other": efficiency_curve(
            mean_rows(m["elementwise"]["softmax"], m["elementwise"]["layer_norm"]), mem_bw
        ),
    }
    link = {"bandwidth_bytes_per_s": _sig(link_bw), "latency_s": _sig(alpha)}
    if gpu:
        name = m["device_name"]
        memory_bytes = m["device_memory_bytes"]
        pcie = m["pcie_bytes_per_s"]
    else:
        name = f"cpu-{m['cores']}core"
        memory_bytes = int(m["host_memory_bytes"] * 0.8 / nproc)
        pcie = mem_bw  # "offload" on a CPU host is a copy in host memory
    check = m.get("shared_host_check")
    data: dict[str, Any] = {
        "name": "cpu" if not gpu else name,
        "num_nodes": 1,
        "devices_per_node": nproc,
    }
    if not gpu:
        data["shared_host"] = {
            "cores": m["cores"],
            "memory_bytes": m["host_memory_bytes"],
            "usable_fraction": 0.8,
        }
        if check and "core_efficiency" in check:
            data["shared_host"]["core_efficiency"] = check["core_efficiency"]
        if check and "memory_efficiency" in check:
            data["shared_host"]["memory_efficiency"] = check["memory_efficiency"]
        if "sync_penalty_s" in m and m["cores"] < nproc:
            data["shared_host"]["sync_penalty_s"] = _sig(m["sync_penalty_s"])
    data["device"] = {
        "name": name,
        "memory_bytes": memory_bytes,
        "peak_flops_per_s": {k: _sig(v) for k, v in peaks.items()},
        "memory_bandwidth_bytes_per_s": _sig(mem_bw),
        "kernel_launch_s": _sig(m["launch_s"]),
    }
    data["intra_node"] = link
    data["inter_node"] = dict(link)
    data["host"] = {
        "memory_bytes": m["host_memory_bytes"],
        "pcie_bandwidth_bytes_per_s": _sig(pcie),
        "cpu_adam_params_per_s": _sig(m["adam_params_per_s"]),
    }
    data["efficiency"] = eff
    data["collective_efficiency"] = _sig(max(coll_eff, 1e-4))
    if m["collectives"]:
        data["collectives"] = {
            k: {"bandwidth_bytes_per_s": _sig(b), "latency_s": _sig(a)} for k, (a, b) in fits.items()
        }
    if not gpu:
        data["comm_overlaps_compute"] = False
        data["device_is_host_cpu"] = True
    threads = "one thread per process (as under torchrun)" if not gpu else "one process per GPU"
    data["sources"] = {
        "device": f"{where}: best square-matmul FLOP/s per dtype ({threads}), best copy bandwidth "
        f"(read+write bytes; DRAM rate {mem[-1][1] / 1e9:.3g} GB/s at {mem[-1][0] / 2**20:.0f} MiB moved), "
        f"1-element add for kernel_launch_s",
        "efficiency": f"{where}: achieved/peak by size (runtime/calibrate_bench.py); matmul, "
        f"attention and conv relative to the {primary} matmul peak; memory/elementwise/other "
        f"relative to the copy bandwidth"
        + ("; GPU time of back-to-back calls queued ahead of the GPU (CUDA events), not the host's "
           "issue rate (kernel_launch_s: the host-loop time of a 1-element add)" if gpu else ""),
        "intra_node": f"{where}: {nproc} processes, {'NCCL' if gpu else 'gloo'}; alpha-beta fits "
        f"(ring conventions, nccl-tests busbw) per collective: {fit_text}. The cost model uses one link for "
        f"all: joint fit of its formulas (cost_models/comm.py) to every size and collective: alpha "
        f"{alpha * 1e6:.1f} us, busbw {bus_bw / 1e9:.3g} GB/s (rms error x{math.exp(rms):.2f}); "
        f"bandwidth = the p2p busbw, collective_efficiency = joint busbw / p2p busbw. `collectives` holds "
        f"each collective's own (alpha, busbw) above, which cost_models.comm uses inside a node",
        "inter_node": "not measurable on one host: repeats intra_node",
        "host": f"{where}: host memory from the OS; AdamW (fp32, torch default implementation, 1M-parameter tensors spanning 256 MiB) step on the CPU; "
        + (
            "pinned host->device copy"
            if gpu
            else "pcie = host copy bandwidth (no device link on a CPU host)"
        ),
    }
    if not gpu and "pipeline_action_s" in m:
        data["pipeline_action_overhead_s"] = _sig(m["pipeline_action_s"])
        data["sources"]["pipeline_action_overhead_s"] = (
            f"{where}: {nproc} processes as a {nproc}-stage Schedule1F1B pipeline of small MLP stages, CPU time "
            f"of a step minus the same forwards/backwards run alone, per action, mean over stages "
            f"(runtime/calibrate_pipeline.py)"
        )
    if not gpu and "dtensor" in m:
        dt = m["dtensor"]
        data["dtensor_overhead"] = {k: _sig(dt[k]) for k in ("forward_s", "backward_s", "optimizer_s")}
    if not gpu and "dtensor" in m and "ops" in m["dtensor"]:
        dt = m["dtensor"]
        data["sources"]["dtensor_overhead"] = (
            f"{where}: a block of {dt['ops']} tensor-parallel Linears (Colwise/RowwiseParallel) on a one-rank "
            f"mesh against the same block plain (runtime/calibrate_dtensor.py): forward, forward + backward at "
            f"{len(dt['rows'])} sizes and the AdamW step; per op"
        )
    scaled = m.get("engine_overheads_scaled")
    if not gpu and scaled:
        text = (
            f"not measured (autoplan calibrate --local): the bundled cpu preset's (host {scaled['from']}) x "
            f"{scaled['ratio']:.3g}, this host's tiny-op time over that host's (runtime.calibrate."
            f"scaled_engine_overheads); `autoplan calibrate --preset-form` measures it"
        )
        data["sources"]["dtensor_overhead"] = data["sources"]["pipeline_action_overhead_s"] = text
    if not gpu:
        data["sources"]["comm_overlaps_compute"] = (
            "gloo on a CPU host runs collectives (copies, reductions, TCP loopback) on the same cores as "
            "compute, and the runtime issues them from the training thread: no overlap"
        )
        data["sources"]["device_is_host_cpu"] = "no accelerator: the optimizer step runs on the CPU (host.cpu_adam_params_per_s)"
    if not m["collectives"]:
        data["sources"]["intra_node"] = (
            f"{where}: one device, no link measured: placeholder (launch floor, memory bandwidth); "
            f"a 1-device plan never communicates. Calibrate with --nproc >= 2 to measure links"
        )
    if not gpu:
        data["sources"]["shared_host"] = (
            f"{where}: {m['cores']} cores (sched_getaffinity), {m['host_memory_bytes']} bytes of memory; "
            f"80% usable (the rest: OS, Python, torch)"
        )
    if check:
        data["sources"]["shared_host_check"] = (
            f"{where}: {check['procs']} processes running fp32 matmuls at once: {check['per_process'] / 1e9:.3g} "
            f"GFLOP/s each vs {check['single'] / 1e9:.3g} alone (ratio {check['ratio']:.2f}; "
            f"shared_host predicts {check['predicted']:.2f})"
        )
        if "core_efficiency" in check:
            data["sources"]["shared_host_check"] += (
                f"; timed the same way, one process alone {check['alone'] / 1e9:.3g} GFLOP/s, all at once "
                f"{check['aggregate'] / 1e9:.3g} GFLOP/s in all"
            )
            if "block_alone" in check:
                data["sources"]["shared_host_check"] += (
                    f" (matmul efficiency {check['matmul_core_efficiency']}); a transformer MLP block's forward + "
                    f"backward, one process alone {check['block_alone'] / 1e9:.3g} GFLOP/s, all at once "
                    f"{check['block_aggregate'] / 1e9:.3g} GFLOP/s in all"
                )
            data["sources"]["shared_host_check"] += (
                f": shared_host.core_efficiency = {check['core_efficiency']} of {min(m['cores'], nproc)} cores "
                f"(cost_models.sharedhost)"
            )
        if "sync_penalty_s" in data.get("shared_host", {}):
            data["sources"]["shared_host_check"] += (
                f"; all processes alternating a transformer MLP block forward (256 tokens, hidden 512) with a "
                f"4 KiB all-reduce wait "
                f"{data['shared_host']['sync_penalty_s'] * 1e3:.3g} ms per all-reduce beyond the two run apart: "
                f"shared_host.sync_penalty_s"
            )
        if "memory_efficiency" in check:
            data["sources"]["shared_host_check"] += (
                f"; cold copies (rotating 1 MiB buffers over {bench.Sizes().flush_bytes >> 20} MiB) one process "
                f"alone {check['copy_alone'] / 1e9:.3g} GB/s, all at once {check['copy_aggregate'] / 1e9:.3g} GB/s "
                f"in all: shared_host.memory_efficiency = {check['memory_efficiency']}"
            )
    return data


# ---------------------------------------------------------------------------- measurement
def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def _count_ticks(sizes: bench.Sizes, device_type: str = "cpu") -> int:
    return (
        sum(len(sizes.matmul_sizes(k, device_type)) for k in sizes.matmul_n)
        + len(sizes.attention_lengths(device_type))
        + len(sizes.conv_hw)
        + len(sizes.memory_bytes)
        + len(sizes.elementwise_bytes)
        + 3
        + len(sizes.collective_bytes)
    )


def measure(nproc: int, sizes: bench.Sizes, device_type: str, progress=None) -> dict[str, Any]:
    """Run every microbenchmark; returns the raw measurements (JSON-able)."""
    task = (progress.add_task("calibrating", total=_count_ticks(sizes, device_type))
            if progress else None)

    def tick(text: str) -> None:
        if progress is not None:
            progress.update(task, advance=1, description=text)

    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    threads = torch.get_num_threads()
    m: dict[str, Any] = {
        "device_type": device.type,
        "nproc": nproc,
        "cores": bench.cpu_count(),
        "host_memory_bytes": _host_memory_bytes(),
    }
    try:
        if device.type == "cpu":
            torch.set_num_threads(1)
        primary = torch.bfloat16 if device.type == "cuda" else torch.float32
        # GPU: the host's time to issue one call of each benchmark (the curves are GPU time)
        host: dict[str, Any] | None = {} if device.type == "cuda" else None
        if device.type == "cuda":
            bench.warm_up_gpu(device)
        m["matmul"] = bench.measure_matmul(device, sizes, tick, host=host)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            n = max(sizes.matmul_sizes("fp32", device.type))
            a = torch.randn(n, n, device=device)
            m["tf32"] = 2.0 * n**3 / bench.time_op(lambda: torch.mm(a, a), device, sizes.min_time_s)
            del a
            torch.backends.cuda.matmul.allow_tf32 = False
            props = torch.cuda.get_device_properties(device)
            m["device_name"], m["device_memory_bytes"] = props.name, int(props.total_memory)
            m["pcie_bytes_per_s"] = bench.measure_pcie(device, sizes)
        m["attention"] = bench.measure_attention(device, primary, sizes, tick, host=host)
        m["conv"] = bench.measure_conv(device, primary, sizes, tick)
        m["memory"] = bench.measure_memory(device, sizes, tick, host=host)
        m["elementwise"] = bench.measure_elementwise(device, primary, sizes, tick, host=host)
        if host is not None:
            m["host_s_per_call"] = host
        m["launch_s"] = bench.measure_launch(device, sizes)
        tick("launch floor")
        m["adam_params_per_s"] = bench.measure_adam(sizes)
        tick("cpu adam")
        if device.type == "cpu" and sizes.engine_overheads:  # a GPU's host dispatch runs ahead of its kernels
            from runtime.calibrate_dtensor import measure_dtensor

            m["dtensor"] = measure_dtensor(sizes)
        tick("dtensor overhead")
    finally:
        torch.set_num_threads(threads)
    if nproc == 1:  # one device has no link to measure; a 1-device plan never communicates
        tick("collectives skipped (one device)")
        m["collectives"] = {}
        return m
    coll = measure_collectives(nproc, sizes, "nccl" if device.type == "cuda" else "gloo", tick)
    m["collectives"] = {k: v for k, v in coll.items() if k in bench.COLLECTIVES}
    if "sync_penalty_s" in coll:
        m["sync_penalty_s"] = coll["sync_penalty_s"]
    if "pipeline_action_s" in coll:
        m["pipeline_action_s"] = coll["pipeline_action_s"]
    single = (
        max(r[1] for r in m["matmul"]["fp32"] if r[0] >= 2.0 * 256**3)
        if device.type == "cpu"
        else None
    )
    if single:
        got = coll["shared_host_matmul_flops_per_s"]
        per = got["median"]
        m["shared_host_check"] = {
            "procs": nproc,
            "per_process": per,
            "single": single,
            "ratio": per / single,
            "predicted": min(1.0, m["cores"] / nproc),
            "alone": got["alone"],
            "aggregate": got["sum"],
            "core_efficiency": core_efficiency(got["sum"], got["alone"], m["cores"], nproc),
        }
        if got.get("block_alone"):
            # the core efficiency the cost model uses: the training-like mix, not bare matmuls
            m["shared_host_check"].update(
                block_alone=got["block_alone"], block_aggregate=got["block_sum"],
                matmul_core_efficiency=m["shared_host_check"]["core_efficiency"],
                core_efficiency=core_efficiency(got["block_sum"], got["block_alone"], m["cores"], nproc),
            )
        if got.get("copy_alone"):
            m["shared_host_check"].update(
                copy_alone=got["copy_alone"], copy_aggregate=got["copy_sum"],
                memory_efficiency=core_efficiency(got["copy_sum"], got["copy_alone"], m["cores"], nproc),
            )
    return m


def measure_collectives(nproc: int, sizes: bench.Sizes, backend: str, tick) -> dict[str, Any]:
    """Spawn `nproc` processes running runtime.calibrate_bench.collective_worker; rank 0's results."""
    import torch.multiprocessing as mp

    if nproc < 2:
        raise SpecError(f"--nproc: collectives need at least 2 processes (got {nproc})")
    if backend == "nccl" and torch.cuda.device_count() < nproc:
        raise SpecError(
            f"--nproc {nproc}: only {torch.cuda.device_count()} GPUs visible; use --nproc <= that"
        )
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = mp.start_processes(
            bench.collective_worker,
            args=(nproc, init_file, backend, sizes, q),
            nprocs=nproc,
            join=False,
            start_method="spawn",
        )
        result = None
        while True:
            while not q.empty():
                kind, payload = q.get()
                if kind == "tick":
                    tick(payload)
                elif kind == "result":
                    result = payload
                else:
                    raise RuntimeError(f"calibrate collectives failed: {payload}")
            if procs.join(timeout=0.1):
                break
        while not q.empty():
            kind, payload = q.get()
            if kind == "result":
                result = payload
    if result is None:
        raise RuntimeError("calibrate collectives: rank 0 returned no result")
    return result


def run(
    nproc: int | None = None,
    output: str | os.PathLike | None = None,
    *,
    preset_form: bool = False,
    quick: bool = False,
    device_type: str | None = None,
    show_progress: bool = True,
    measurements: str | os.PathLike | None = None,
    local: bool = False,
) -> dict[str, Any]:
    """Measure, build the spec data, validate it as a HardwareSpec, write it; returns the data.

    `local`: the quick host calibration (module docstring): Sizes.host(), preset form named
    "local", written to specs.hardware.local_spec_path() unless `output` says elsewhere."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if nproc is None:
        nproc = torch.cuda.device_count() if device_type == "cuda" else 4
    if nproc < 1:
        raise SpecError(f"--nproc: must be >= 1 (got {nproc})")
    if local:
        preset_form = True
        output = output if output is not None else local_spec_path()
        Path(output).parent.mkdir(parents=True, exist_ok=True)
    sizes = bench.Sizes.quick() if quick else bench.Sizes.host() if local else bench.Sizes()
    load_before, pressure_before = _load(), _cpu_pressure()
    t0 = time.perf_counter()
    with Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        disable=not show_progress,
        transient=False,
    ) as progress:
        m = measure(nproc, sizes, device_type, progress)
    if not sizes.engine_overheads and device_type == "cpu":
        bundled = load_data(Path(str(resources.files("specs") / "presets" / "cpu.yaml")))
        m.update(scaled_engine_overheads(m["launch_s"], bundled))
    date = _dt.date.today().isoformat()
    data = build_spec_data(
        m,
        nproc=nproc,
        date=date,
        host=f"{platform.node() or 'host'}, {platform.processor() or platform.machine()}",
    )
    if local:
        data["name"] = LOCAL_PRESET
        data["sources"] = {"host_key": host_key(), **data["sources"],
                           "host_load": f"1-minute load average {load_before:.2f} before, {_load():.2f} after, on "
                           f"{m['cores']} cores; CPU pressure (PSI some avg10) {pressure_before} before (other "
                           f"work running during a calibration slows what it measures)"}
    plain = shared_host_scale(data, nproc)
    validate_model(HardwareSpec, plain, "calibrate output")  # raises SpecError if anything is off
    out = data if preset_form else plain
    if output is not None:
        dump_data(out, output)
        if preset_form and not str(output).endswith(".json"):
            text = Path(output).read_text(encoding="utf-8")
            header = LOCAL_HEADER if local else PRESET_HEADER
            Path(output).write_text(header + text, encoding="utf-8")
    if output is not None or measurements is not None:
        dump_data(m, measurements or _measurements_path(output))
    out = dict(out)
    out["_elapsed_s"] = time.perf_counter() - t0
    out["_measurements"] = m
    return out


def _load() -> float:
    """The host's 1-minute load average (0 where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0.0


def _cpu_pressure() -> float | None:
    """Share of the last 10 s in which some runnable task waited for a CPU (Linux PSI,
    /proc/pressure/cpu 'some avg10', in [0, 1]); None where the kernel does not report it. Unlike
    the load average it does not count tasks blocked on I/O."""
    try:
        with open("/proc/pressure/cpu", encoding="utf-8") as f:
            first = f.readline().split()
        return float(dict(kv.split("=") for kv in first[1:])["avg10"]) / 100.0
    except (OSError, KeyError, ValueError):
        return None


def _measurements_path(output: str | os.PathLike) -> Path:
    return Path(output).with_suffix(".measurements.json")


def summary(data: dict[str, Any]) -> str:
    dev = data["device"]
    flops = ", ".join(f"{k} {v / 1e9:.4g}" for k, v in dev["peak_flops_per_s"].items())
    lines = [
        f"device {dev['name']}: peak GFLOP/s {flops}",
        f"memory bandwidth {dev['memory_bandwidth_bytes_per_s'] / 1e9:.3g} GB/s, op floor {dev['kernel_launch_s'] * 1e6:.2f} us",
        f"link: {data['intra_node']['bandwidth_bytes_per_s'] / 1e9:.3g} GB/s, latency "
        f"{data['intra_node']['latency_s'] * 1e6:.1f} us, collective_efficiency {data['collective_efficiency']}",
        data["sources"]["intra_node"].split("fits ")[-1],
    ]
    if "shared_host_check" in data["sources"]:
        lines.append(data["sources"]["shared_host_check"].split("): ", 1)[-1])
    if "_elapsed_s" in data:
        lines.append(f"calibrated in {data['_elapsed_s']:.1f} s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="processes for the collectives (default: 4 on CPU, the GPU count on GPU)",
    )
    p.add_argument(
        "-o", "--output", default=None, help="write the HardwareSpec here (YAML or JSON)"
    )
    p.add_argument(
        "--preset-form",
        action="store_true",
        help="write the bundled-preset form (shared_host, per-core figures), as specs/presets/cpu.yaml",
    )
    p.add_argument(
        "--measurements",
        default=None,
        help="write the raw measurements here (default: next to -o, *.measurements.json)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes (seconds; for tests, not for planning)"
    )
    p.add_argument(
        "--cpu", action="store_true", help="calibrate the CPU even when a GPU is present"
    )
    p.add_argument(
        "--local",
        action="store_true",
        help="quick calibration of this host (~30 s) for `--hw local`, cached under the user's cache "
        "directory (-o: elsewhere)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    if args.local:
        return calibrate_local(args.nproc, args.output, device_type="cpu" if args.cpu else None)
    data = run(
        args.nproc,
        args.output,
        preset_form=args.preset_form,
        quick=args.quick,
        device_type="cpu" if args.cpu else None,
        measurements=args.measurements,
    )
    print(summary(data))
    if args.output:
        print(f"wrote {args.output}")
    if args.output or args.measurements:
        print(f"raw measurements: {args.measurements or _measurements_path(args.output)}")
    return 0


def calibrate_local(
    nproc: int | None = None, output: str | os.PathLike | None = None, *, device_type: str | None = None
) -> int:
    """`autoplan calibrate --local`: one line before (what, how long), one after (where, how long)."""
    path = Path(output) if output is not None else local_spec_path()
    print(f"calibrating this host ({host_key()}) for --hw {LOCAL_PRESET}: about half a minute, once; "
          f"cached in {path}", flush=True)
    pressure = _cpu_pressure()
    busy = (f"tasks waited for a CPU {pressure:.0%} of the last 10 s" if pressure is not None and pressure > 0.3
            else f"1-minute load average {_load():.1f} on {bench.cpu_count()} cores"
            if pressure is None and _load() > 0.5 * bench.cpu_count() else None)
    if busy:
        print(f"note: the host is busy ({busy}); the calibration measures it as busy. Rerun "
              f"`autoplan calibrate --local` when it is quiet to refresh it", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    run(nproc, path, local=True, device_type=device_type, show_progress=False,
        measurements=path.with_suffix(".measurements.json"))
    # the collective workers' CPU time is theirs, not this process's: wall time is the figure
    print(f"calibrated this host in {time.perf_counter() - t0:.1f} s "
          f"({time.process_time() - c0:.1f} s CPU in this process): {path}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="autoplan calibrate", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    try:
        return run_from_args(p.parse_args(argv))
    except SpecError as e:
        print(f"error: {e}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
