"""Measurements -> HardwareSpec data for `autoplan calibrate` (runtime/calibrate.py): pure, no
timing and no torch.distributed. `build_spec_data` turns `runtime.calibrate.measure`'s raw
measurements into the preset-form spec data (with `sources` for every figure), and
`shared_host_scale` turns that into a plain HardwareSpec for N processes on the host.
`core_efficiency` and `scaled_engine_overheads` derive the figures `measure` and `--local` add.

What goes where (the microbenchmarks are in runtime.calibrate_bench, the fits in runtime.calibrate_fit):
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

import math
from typing import Any

from runtime import calibrate_bench as bench
from runtime.calibrate_fit import RING, fit_alpha_beta, fit_link
from specs.hardware import apply_shared_host


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
