"""Predicted vs measured step time AND peak memory on ONE GPU: single-device plans.

    python3 benchmarks/fidelity_gpu.py [-o OUT.json] [--steps 5] [--warmup 3] [--preset NAME]
        [--spec HW.yaml] [--budget-s 270] [--profile]
    python3 benchmarks/fidelity_gpu.py --device cpu --tiny --steps 1 --warmup 1 -o /tmp/fg.json
    .venv/bin/python benchmarks/fidelity_gpu.py --predict-only OUT.json --spec calibrated.yaml

The GPU counterpart of benchmarks/fidelity_single.py (issue 7's single-GPU table). A GPT of
~0.94B parameters (hidden 2048, 16 layers, 16 heads, seq 1024, vocab 32000, untied embeddings;
MODEL_CFG), bf16 mixed precision (fp32 parameters and AdamW states, torch.autocast compute: what
runtime/precision.py does on one device), one process in a 1-process NCCL group on cuda:0,
executed by the runtime (runtime.parallelize on a meta-device model, materialised on the GPU by
init_weights) under single-device plans: micro-batch sizes 1, 2, 4, 8 x recompute none /
selective / full, and two gradient-accumulation plans (PLANS).
  - prediction: planner.plan_from_knobs -> cost_models.estimate_step with a one-device
    HardwareSpec: the bundled preset for the card (dgx-h200 or dgx-h100-80gb, by
    torch.cuda.get_device_name(); --preset overrides) or --spec (a preset reference such as
    "dgx-h100-80gb:1", or a YAML/JSON file, e.g. the output of `autoplan calibrate`);
  - measured step time: the median of `--steps` steps after `--warmup`, each timed between
    torch.cuda.synchronize() calls;
  - measured memory: torch.cuda.max_memory_allocated() (and max_memory_reserved()) over the
    model's build and all its steps (peak stats reset before the build), against the predicted
    peak (prediction.peak_memory_bytes, which includes the cost model's margin) and against the
    predicted tensors alone (peak minus margin). A plan predicted not to fit the device is
    skipped (recorded with the reason); an out-of-memory error is recorded and the next plan runs.
Summary: Spearman rank correlation and median / max |relative error| of step time; for memory
the measured/predicted ratio per plan, and the plans whose measured peak exceeded the prediction.
The JSON (-o; default benchmarks/results/fidelity_gpu.json) is rewritten after every plan, so a
run cut short keeps the plans done; `--budget-s` stops starting new plans after that many seconds.
`--predict-only RESULTS.json` re-predicts the plans of an earlier run with another hardware spec
(--spec / --preset; no GPU needed) and prints the same table and summary (-o writes it).
`--device cpu --tiny` runs a small config on the CPU (gloo, cpu preset) as a smoke test.
`--profile` adds, after each plan's timed steps (and after its memory figures are taken), one
step timed in phases with CUDA events (forward + backward vs optimizer step, host and GPU time,
no profiler) and one step under torch.profiler (CPU + CUDA activities), summarised in the plan's
row as `phases` and `profile` (see `profile_summary`): GPU kernel time in all and by category,
the GPU busy time (union of kernel intervals) against the step's wall time, the top kernels,
the aten ops and kernel launches the host dispatched. On a CPU, CPU op self times by category.

Nothing here tunes the cost model: the prediction uses the preset or spec as given.

Measured on one NVIDIA H200 and one H100 80GB HBM3 (torch 2.11, 2026-11-26; `--profile`):
benchmarks/results/fidelity_gpu_{h200,h100}.json hold the runs with the predictions of the
presets as they were then (efficiency curves read off A100 plots), *_calibrated.json the same
runs re-predicted (`--predict-only`) with the spec `autoplan calibrate --nproc 1` wrote on that
machine (calibration_{h200,h100}.yaml), *_preset.json with the dgx-h200 / dgx-h100-80gb presets
after their efficiency curves were replaced by those microbenchmarks (rescaled to the datasheet
peaks; specs/presets says so):
  - memory: on both cards no plan exceeded its predicted peak (measured max_memory_allocated /
    predicted peak: median 0.71, max 0.95); two plans went past the predicted tensors without the
    allocator margin.
  - step time, old presets: every plan predicted too fast, -25% even where the GPU was busy
    (H200: Spearman 0.90, median |error| 33%; H100: 0.83, 42%).
  - step time, microbenchmark curves (presets now; calibrated specs alike): where the GPU kept
    busy (GPU busy >= 88% of the step) within -3..+8% on the H200 (mb4, mb8, 4x4 accumulation)
    and -1..-10% on the H100; median |error| 8.7% (H200) and 29% (H100). The rest are host-bound
    steps: micro-batch 1-2, and recompute at small micro-batches, whose checkpointing adds host
    work (H200 mb1 selective: 0.12 s with the GPU busy 41% of it; the H100 machine's slower host
    makes more plans host-bound). The cost model has no host-dispatch term on GPUs (the host is
    assumed to run ahead of the kernels), so it predicts those 18-71% too fast;
    calibration_*.measurements.json records the host's time per call (`host_s_per_call`, ~20 us
    per GEMM call) that such a term would use.
  - an earlier calibration timed GPU ops by the host loop (calibration_h200_host_timed...json:
    every GEMM from n=32 to 1024 took ~20 us, the host's issue time), which made the calibrated
    spec predict 2x too slow; runtime/calibrate_gpu.py now times GPU kernels back to back
    with CUDA events.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.fidelity import _load, spearman  # noqa: E402
from benchmarks.fidelity_gpu_profile import (  # noqa: E402
    _sync,
    phase_step,
    profile_line,
    profile_step,
)
from planner.models import lm_loss  # noqa: E402
from planner.models.transformer import Transformer, TransformerConfig  # noqa: E402
from specs import HardwareSpec, Knobs, SpecError  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fidelity_gpu.json"
GIB = 2**30

# ~0.94B parameters; untied embeddings, as benchmarks/fidelity.CFG. Largest plan (mb8, no
# recompute) is predicted at ~39 GiB on the H100 preset (the unfused attention's fp32 softmax
# may take more; see the report), so every plan should fit an 80 GB card.
MODEL_CFG = TransformerConfig(
    vocab_size=32000, hidden=2048, num_layers=16, num_heads=16, seq_len=1024, tie_embeddings=False
)
TINY_CFG = TransformerConfig(
    vocab_size=512, hidden=64, num_layers=2, num_heads=4, seq_len=64, tie_embeddings=False
)
PRECISION = "bf16"
OPTIMIZER = "adamw"

# label -> (knobs, global batch)
PLANS: dict[str, tuple[Knobs, int]] = {}
for _mb in (1, 2, 4, 8):
    for _rec in ("none", "selective", "full"):
        PLANS[f"mb{_mb} {_rec}"] = (
            Knobs(pp=1, dp=1, tp=1, micro_batch_size=_mb, recompute=_rec), _mb
        )
PLANS["mb4x4 accumulation"] = (
    Knobs(pp=1, dp=1, tp=1, micro_batch_size=4, num_micro_batches=4), 16
)
PLANS["mb2x8 accumulation full"] = (
    Knobs(pp=1, dp=1, tp=1, micro_batch_size=2, num_micro_batches=8, recompute="full"), 16
)


# ------------------------------------------------------------------------------ prediction
def example_tokens(cfg: TransformerConfig, batch: int, device: str | torch.device) -> torch.Tensor:
    return torch.zeros(batch, cfg.seq_len, dtype=torch.long, device=device)


def trace_graph(cfg: TransformerConfig):
    from planner import trace

    with torch.device("meta"):
        model = Transformer(cfg)
    return trace(model, (example_tokens(cfg, 1, "meta"),))


def preset_for(device_name: str) -> str:
    name = device_name.upper()
    if "H200" in name:
        return "dgx-h200"
    if "H100" in name:
        return "dgx-h100-80gb"
    if "A100" in name:
        return "dgx-a100-80gb"
    print(f"[fidelity_gpu] no preset for {device_name!r}; using dgx-h100-80gb (--preset overrides)")
    return "dgx-h100-80gb"


def one_device(hw: HardwareSpec) -> HardwareSpec:
    """The spec cut to one device (a 1-process plan needs a 1-device spec)."""
    if hw.num_devices == 1:
        return hw
    if hw.shared_cores is not None:
        raise SpecError(
            f"{hw.name}: a shared-host spec for {hw.num_devices} processes; give a 1-process one "
            f"(e.g. --spec cpu:1)"
        )
    print(f"[fidelity_gpu] {hw}: using one device of it")
    return hw.model_copy(update={"num_nodes": 1, "devices_per_node": 1})


def hardware(args, device_type: str) -> HardwareSpec:
    if args.spec:
        return one_device(HardwareSpec.load(args.spec))
    if args.preset:
        return HardwareSpec.preset(args.preset, devices=1)
    if device_type == "cpu":
        return HardwareSpec.preset("cpu", devices=1)
    return HardwareSpec.preset(preset_for(torch.cuda.get_device_name(0)), devices=1)


def predict(graph, hw: HardwareSpec, knobs: Knobs, batch: int, precision: str, optimizer: str):
    from planner import plan_from_knobs
    from specs import TrainSpec

    train = TrainSpec(global_batch_size=batch, precision=precision, optimizer=optimizer)
    return plan_from_knobs(graph, hw, train, knobs)


def prediction_fields(plan) -> dict:
    pr = plan.predicted
    margin = pr.memory_bytes.get("margin", 0.0)
    return {
        "predicted_step_time_s": pr.step_time_s,
        "predicted_breakdown_s": dict(pr.time_breakdown_s),
        "predicted_mfu": pr.mfu,
        "predicted_peak_memory_bytes": pr.peak_memory_bytes,
        "predicted_tensor_bytes": pr.peak_memory_bytes - margin,
        "predicted_memory_bytes": dict(pr.memory_bytes),
        "predicted_memory_capacity_bytes": pr.memory_capacity_bytes,
        "predicted_fits": pr.fits,
        "predicted_notes": list(pr.notes),
    }


def compare(row: dict) -> dict:
    """Relative error and memory ratios of a row with measurements (in place; returns it)."""
    meas = row.get("measured_step_time_s")
    if meas:
        row["relative_error"] = (row["predicted_step_time_s"] - meas) / meas
    alloc = row.get("measured_peak_allocated_bytes")
    if alloc:
        row["memory_ratio"] = alloc / row["predicted_peak_memory_bytes"]
        row["memory_ratio_vs_tensors"] = alloc / row["predicted_tensor_bytes"]
        row["memory_exceeded_prediction"] = alloc > row["predicted_peak_memory_bytes"]
        reserved = row.get("measured_peak_reserved_bytes")
        if reserved:
            row["reserved_ratio"] = reserved / row["predicted_peak_memory_bytes"]
    return row


# ------------------------------------------------------------------------------- measuring
def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_plan(plan, cfg: TransformerConfig, batch: int, device: torch.device, steps: int,
             warmup: int, gen: torch.Generator, profile: bool = False) -> dict:
    """Build `plan` on `device` (meta model, materialised by the runtime) and time its steps."""
    from runtime import parallelize

    cuda = device.type == "cuda"
    rec: dict = {}
    if cuda:
        rec["baseline_allocated_bytes"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = Transformer(cfg)
    pm = parallelize(model, plan, loss_fn=lm_loss, device=device,
                     example_inputs=(example_tokens(cfg, 1, "meta"),))
    del model
    _sync(device)
    rec["setup_s"] = time.perf_counter() - t0
    if cuda:
        rec["after_setup_allocated_bytes"] = torch.cuda.memory_allocated(device)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=gen).to(device)
    times = []
    loss = None
    for _ in range(warmup + steps):
        _sync(device)
        s = time.perf_counter()
        loss = pm.train_step(pm.local_batch(tokens, tokens))
        _sync(device)
        times.append(time.perf_counter() - s)
    rec["warmup_times_s"] = times[:warmup]
    rec["step_times_s"] = times[warmup:]
    rec["measured_step_time_s"] = statistics.median(times[warmup:])
    rec["last_loss"] = None if loss is None else float(loss)
    if cuda:
        rec["measured_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        rec["measured_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        rec["measured_peak_above_baseline_bytes"] = (
            rec["measured_peak_allocated_bytes"] - rec["baseline_allocated_bytes"]
        )
    if profile:  # after the memory figures: nothing here changes them
        try:
            rec["phases"] = phase_step(pm, pm.local_batch(tokens, tokens), device)
            prof = rec["profile"] = profile_step(pm, pm.local_batch(tokens, tokens), device)
            if prof.get("gpu_busy_s") is not None:  # the GPU's time hardly changes when profiled
                prof["gpu_busy_fraction_of_measured"] = (
                    prof["gpu_busy_s"] / rec["measured_step_time_s"])
        except Exception as e:  # a profiling failure must not lose the plan's measurements
            rec["profile_error"] = f"{type(e).__name__}: {e}"[:800]
    del pm, tokens, loss
    return rec


def _oom_record(device: torch.device, err: BaseException) -> dict:
    rec = {"status": "oom", "error": f"{type(err).__name__}: {err}"[:800]}
    if device.type == "cuda":
        rec["measured_peak_allocated_at_oom_bytes"] = torch.cuda.max_memory_allocated(device)
        rec["measured_peak_reserved_at_oom_bytes"] = torch.cuda.max_memory_reserved(device)
    return rec


# ------------------------------------------------------------------------ table and summary
HEADER = (f"{'plan':<24} {'pred s':>7} {'meas s':>7} {'err':>7} {'pred GiB':>8} {'alloc':>6} "
          f"{'al/pred':>7} {'resvd':>6} {'wall s':>6}  status")


def _g(x: float | None, spec: str, width: int) -> str:
    return f"{x:{spec}}".rjust(width) if x is not None else f"{'-':>{width}}"


def row_line(r: dict) -> str:
    def gib(key: str) -> float | None:
        return r[key] / GIB if r.get(key) is not None else None

    status = r.get("status", "?")
    if r.get("error"):
        status += f" ({r['error'][:60]})"
    elif r.get("reason"):
        status += f" ({r['reason'][:60]})"
    cells = [
        _g(r.get("predicted_step_time_s"), ".3f", 7),
        _g(r.get("measured_step_time_s"), ".3f", 7),
        _g(r.get("relative_error"), "+.1%", 7),
        _g(gib("predicted_peak_memory_bytes"), ".1f", 8),
        _g(gib("measured_peak_allocated_bytes"), ".1f", 6),
        _g(r.get("memory_ratio"), ".2f", 7),
        _g(gib("measured_peak_reserved_bytes"), ".1f", 6),
        _g(r.get("wall_s"), ".1f", 6),
    ]
    return f"{r['label']:<24} {' '.join(cells)}  {status}"


def summarize(rows: list[dict]) -> dict:
    ran = [r for r in rows if r.get("measured_step_time_s")]
    out: dict = {
        "plans_run": len(ran),
        "plans_skipped": [r["label"] for r in rows if r.get("status") == "skipped"],
        "plans_oom": [r["label"] for r in rows if r.get("status") == "oom"],
        "plans_failed": [r["label"] for r in rows if r.get("status") == "error"],
        "oom_but_predicted_to_fit": [r["label"] for r in rows
                                     if r.get("status") == "oom" and r.get("predicted_fits")],
    }
    if ran:
        pred = [r["predicted_step_time_s"] for r in ran]
        meas = [r["measured_step_time_s"] for r in ran]
        errs = [abs(r["relative_error"]) for r in ran]
        out.update(
            spearman=spearman(pred, meas) if len(ran) >= 2 else None,
            median_abs_relative_error=statistics.median(errs),
            max_abs_relative_error=max(errs),
            mean_signed_relative_error=statistics.fmean(r["relative_error"] for r in ran),
        )
    mem = [r for r in ran if r.get("memory_ratio")]
    if mem:
        out.update(
            memory_ratio_by_plan={r["label"]: r["memory_ratio"] for r in mem},
            memory_ratio_vs_tensors_by_plan={r["label"]: r["memory_ratio_vs_tensors"] for r in mem},
            median_memory_ratio=statistics.median(r["memory_ratio"] for r in mem),
            max_memory_ratio=max(r["memory_ratio"] for r in mem),
            memory_spearman=spearman([r["predicted_peak_memory_bytes"] for r in mem],
                                     [r["measured_peak_allocated_bytes"] for r in mem])
            if len(mem) >= 2 else None,
            plans_exceeding_predicted_peak=[r["label"] for r in mem
                                            if r["memory_exceeded_prediction"]],
            plans_exceeding_predicted_tensors=[r["label"] for r in mem
                                               if r["memory_ratio_vs_tensors"] > 1],
            plans_reserved_above_predicted_peak=[r["label"] for r in mem
                                                 if r.get("reserved_ratio", 0) > 1],
        )
    return out


def summary_text(s: dict) -> str:
    lines = [f"{s['plans_run']} plans run; skipped {s['plans_skipped']}; OOM {s['plans_oom']} "
             f"(predicted to fit: {s['oom_but_predicted_to_fit']}); failed {s['plans_failed']}"]
    if "median_abs_relative_error" in s:
        sp = s["spearman"]
        lines.append(
            f"step time: Spearman {sp if sp is None else f'{sp:.3f}'}; median |error| "
            f"{s['median_abs_relative_error']:.1%}; max |error| {s['max_abs_relative_error']:.1%}; "
            f"mean signed error {s['mean_signed_relative_error']:+.1%}")
    if "median_memory_ratio" in s:
        sp = s["memory_spearman"]
        lines.append(
            f"memory: measured/predicted peak median {s['median_memory_ratio']:.2f}, max "
            f"{s['max_memory_ratio']:.2f}; Spearman {sp if sp is None else f'{sp:.3f}'}; "
            f"above predicted peak: {s['plans_exceeding_predicted_peak'] or 'none'}; above "
            f"predicted tensors (peak - margin): "
            f"{s['plans_exceeding_predicted_tensors'] or 'none'}")
    return "\n".join(lines)


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ predict-only
def predict_only(args) -> int:
    """Re-predict the plans of an earlier results JSON with another spec; print and compare."""
    old = json.loads(Path(args.predict_only).read_text())
    model = old["model"]
    cfg = TransformerConfig(**model["config"])
    graph = trace_graph(cfg)
    if args.spec:
        hw = one_device(HardwareSpec.load(args.spec))
    elif args.preset:
        hw = HardwareSpec.preset(args.preset, devices=1)
    else:
        hw = HardwareSpec.model_validate(old["hardware"])
    print(f"re-predicting {len(old['plans'])} plans of {args.predict_only} with {hw}")
    print(HEADER)
    rows = []
    for r in old["plans"]:
        knobs = Knobs(**r["knobs"])
        plan = predict(graph, hw, knobs, r["global_batch_size"], model["precision"],
                       model["optimizer"])
        new = {k: v for k, v in r.items()
               if not k.startswith(("predicted_", "relative_error", "memory_", "reserved_ratio"))}
        new["previous_predicted_step_time_s"] = r.get("predicted_step_time_s")
        new["previous_predicted_peak_memory_bytes"] = r.get("predicted_peak_memory_bytes")
        new.update(prediction_fields(plan))
        rows.append(compare(new))
        print(row_line(new), flush=True)
    summary = summarize(rows)
    print("\n" + summary_text(summary))
    if args.output:
        result = dict(old, hardware=hw.model_dump(mode="json"), summary=summary, plans=rows,
                      repredicted_from=str(args.predict_only),
                      what=old.get("what", "") + " [re-predicted with another hardware spec]")
        write_json(Path(args.output), result)
        print(f"wrote {args.output}")
    return 0


# -------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test)")
    p.add_argument("--backend", default=None, help="process-group backend (default nccl on cuda, "
                   "gloo on cpu)")
    p.add_argument("--tiny", action="store_true", help="a tiny model (smoke test)")
    p.add_argument("--preset", default=None, help="hardware preset (default: by device name)")
    p.add_argument("--spec", default=None, help="HardwareSpec file or preset reference")
    p.add_argument("--only", default=None, help="comma-separated plan labels")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="start no new plan after this many seconds (recorded as skipped)")
    p.add_argument("--predict-only", default=None, metavar="RESULTS_JSON",
                   help="re-predict an earlier run's plans with --spec/--preset; no measuring")
    p.add_argument("--profile", action="store_true",
                   help="per plan one more step in phases (CUDA events) and one under "
                   "torch.profiler: GPU busy time, kernel time by category, top kernels")
    p.add_argument("-o", "--output", default=None)
    args = p.parse_args(argv)
    if args.predict_only:
        return predict_only(args)
    out_path = Path(args.output or RESULTS)

    import torch.distributed as dist

    labels = [s.strip() for s in args.only.split(",")] if args.only else list(PLANS)
    unknown = [x for x in labels if x not in PLANS]
    if unknown:
        p.error(f"unknown plan labels {unknown}; known: {list(PLANS)}")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            p.error("no CUDA device; use --device cpu for a smoke test")
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # the cpu preset's per-process figures are for one thread
    cfg = TINY_CFG if args.tiny else MODEL_CFG
    t0 = time.perf_counter()
    hw = hardware(args, device.type)
    graph = trace_graph(cfg)
    n_params = graph.num_params
    env = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "host": platform.node(), "device": str(device),
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
    device_memory = None
    if cuda:
        props = torch.cuda.get_device_properties(device)
        device_memory = int(props.total_memory)
        env.update(device_name=props.name, device_total_memory_bytes=device_memory,
                   multiprocessors=props.multi_processor_count)
    print(f"[fidelity_gpu] {env.get('device_name', device)}; torch {torch.__version__}; "
          f"hardware {hw}; model {cfg} ({n_params} params); setup {time.perf_counter() - t0:.1f} s",
          flush=True)
    result = {
        "what": "one device: predicted (cost_models via planner.plan_from_knobs, one-device spec) "
        "vs measured (runtime.parallelize, 1-process group) step time and peak memory "
        "(torch.cuda.max_memory_allocated)",
        "model": {"config": dict(cfg.__dict__), "num_params": n_params, "precision": PRECISION,
                  "optimizer": OPTIMIZER, "tiny": args.tiny},
        "steps": args.steps, "warmup": args.warmup,
        "hardware": hw.model_dump(mode="json"),
        "environment": env,
        "load_average_before": _load(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "plans": [],
    }
    if args.profile:
        result["profile"] = True
    rows: list[dict] = result["plans"]
    backend = args.backend or ("nccl" if cuda else "gloo")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=120))
        try:
            gen = torch.Generator().manual_seed(1)
            print(HEADER, flush=True)
            for label in labels:
                knobs, batch = PLANS[label]
                p0 = time.perf_counter()
                row: dict = {"label": label, "knobs": knobs.model_dump(), "plan": str(knobs),
                             "global_batch_size": batch}
                try:
                    plan = predict(graph, hw, knobs, batch, PRECISION, OPTIMIZER)
                except SpecError as e:
                    row.update(status="error", error=f"prediction: {e}"[:800])
                    plan = None
                if plan is not None:
                    row.update(prediction_fields(plan))
                    limit = min(x for x in (plan.predicted.memory_capacity_bytes, device_memory)
                                if x)
                    if time.perf_counter() - t0 > args.budget_s:
                        row.update(status="skipped",
                                   reason=f"time budget ({args.budget_s:.0f} s) spent")
                    elif plan.predicted.peak_memory_bytes > limit:
                        row.update(status="skipped", reason=(
                            f"predicted peak {plan.predicted.peak_memory_bytes / GIB:.1f} GiB > "
                            f"device {limit / GIB:.1f} GiB"))
                    else:
                        rec, err = None, None
                        try:
                            rec = run_plan(plan, cfg, batch, device, args.steps, args.warmup, gen,
                                           profile=args.profile)
                        except torch.cuda.OutOfMemoryError as e:
                            err = _oom_record(device, e)
                        except Exception as e:  # recorded; the next plan runs
                            err = {"status": "error", "error": f"{type(e).__name__}: {e}"[:800]}
                            if os.environ.get("FIDELITY_TRACEBACK"):
                                import traceback

                                traceback.print_exc()
                        row.update(rec or err)
                        if rec is not None:
                            row["status"] = "ok"
                        del rec, err
                        _free(device)
                row["wall_s"] = time.perf_counter() - p0
                rows.append(compare(row))
                result["summary"] = summarize(rows)
                result["wall_s"] = time.perf_counter() - t0
                write_json(out_path, result)
                print(row_line(row), flush=True)
                extra = profile_line(row) if args.profile else None
                if extra:
                    print(extra, flush=True)
        finally:
            dist.destroy_process_group()
    result["load_average_after"] = _load()
    result["summary"] = summarize(rows)
    result["wall_s"] = time.perf_counter() - t0
    result["complete"] = True
    write_json(out_path, result)
    print("\n" + summary_text(result["summary"]))
    print(f"wrote {out_path} in {result['wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
