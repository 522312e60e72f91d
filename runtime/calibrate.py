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

Where it lives: the microbenchmarks in runtime.calibrate_bench (GPU timing runtime.calibrate_gpu,
the engines' overheads runtime.calibrate_dtensor and runtime.calibrate_pipeline), the alpha-beta
fits in runtime.calibrate_fit, and what each measurement becomes in the HardwareSpec (peaks,
efficiency curves, links, shared-host figures, `sources`) in runtime.calibrate_spec, whose
docstring says what goes where. This module runs them: `measure` (every microbenchmark, the
collective workers as spawned processes), `run` (measure, build, validate, write) and the CLI.
"""

from __future__ import annotations

import argparse
import datetime as _dt
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
from runtime.calibrate_spec import (  # noqa: F401 (efficiency_curve, mean_rows: re-exported)
    build_spec_data,
    core_efficiency,
    efficiency_curve,
    mean_rows,
    scaled_engine_overheads,
    shared_host_scale,
)
from specs import HardwareSpec, SpecError
from specs._base import validate_model
from specs.hardware import LOCAL_PRESET, host_key, local_spec_path
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
