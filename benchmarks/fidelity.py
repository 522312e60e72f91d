"""Predicted vs measured step time on this machine: does the cost model rank and size plans right?

    .venv/bin/python benchmarks/fidelity.py [--nproc 4] [--rounds 3] [--steps 2] [--warmup 2] [--only LABEL,...]

For a small GPT (8 layers, hidden 384, seq 128, vocab 2048, untied embeddings, fp32, AdamW, global batch 16) and the
`cpu` hardware preset at `--nproc` processes (the calibrated spec: HardwareSpec.preset("cpu",
devices=N), whose shared_host scaling gives each of N processes min(1, cores / N) of a core),
each plan in PLANS is
  1. built and scored by planner.plan_from_knobs -> cost_models.estimate_step (the prediction);
  2. executed by the runtime (runtime.parallelize + ParallelModel.train_step) under one
     `torchrun --standalone` launch that runs every plan in turn (start-up dominates otherwise),
     in `--rounds` interleaved rounds: each round builds every plan afresh and times `--steps`
     steps after `--warmup` warm-up steps, so that the machine's speed drifting during the run
     (10-20% within minutes on the shared dev VM) hits every plan alike; a step is timed from a
     barrier before it to a barrier after it (the slowest rank), and the measured figure is the
     median of a plan's steps over all rounds. Each process's CPU time per step is recorded too
     (the share of the host's cores the plan kept busy).
Summary: Spearman rank correlation of predicted vs measured, and the median absolute relative
error |pred - meas| / meas. Targets (issue 7): Spearman >= 0.9, median error <= 15%.
Results: benchmarks/results/fidelity_cpu.json (per plan: knobs, prediction and its breakdown,
every measured step time, the machine load before and after).

Nothing here tunes the cost model: the prediction uses the bundled preset as calibrated.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from planner.models import lm_loss  # noqa: E402
from planner.models.transformer import Transformer, TransformerConfig  # noqa: E402
from specs import Knobs, Plan  # noqa: E402

# Untied embeddings: runtime.pipeline's tied-gradient sum fails under pp x tp (a tp-sharded
# head gradient meets the full embedding gradient); see the issue-7 report.
CFG = TransformerConfig(
    vocab_size=2048, hidden=384, num_layers=8, num_heads=8, seq_len=128, tie_embeddings=False
)
GLOBAL_BATCH = 16
RESULTS = ROOT / "benchmarks" / "results" / "fidelity_cpu.json"


def K(**kw) -> Knobs:
    return Knobs(**kw)


# label -> knobs; global batch = dp * micro_batch_size * num_micro_batches = 16.
PLANS: dict[str, Knobs] = {
    "ddp mb4": K(pp=1, dp=4, tp=1, micro_batch_size=4),
    "ddp mb2x2": K(pp=1, dp=4, tp=1, micro_batch_size=2, num_micro_batches=2),
    "ddp ckpt": K(pp=1, dp=4, tp=1, micro_batch_size=4, recompute="full"),
    "zero1": K(pp=1, dp=4, tp=1, sharding="zero1", micro_batch_size=4),
    "zero2": K(pp=1, dp=4, tp=1, sharding="zero2", micro_batch_size=4),
    "zero3": K(pp=1, dp=4, tp=1, sharding="zero3", micro_batch_size=4),
    "zero3 ckpt": K(pp=1, dp=4, tp=1, sharding="zero3", micro_batch_size=4, recompute="full"),
    "tp2xdp2": K(pp=1, dp=2, tp=2, micro_batch_size=8),
    "tp2xdp2 ckpt": K(pp=1, dp=2, tp=2, micro_batch_size=8, recompute="full"),
    "tp4": K(pp=1, dp=1, tp=4, micro_batch_size=16),
    "pp2xdp2 gpipe mb2": K(
        pp=2, dp=2, tp=1, micro_batch_size=2, num_micro_batches=4, schedule="gpipe"
    ),
    "pp2xdp2 1f1b mb2": K(
        pp=2, dp=2, tp=1, micro_batch_size=2, num_micro_batches=4, schedule="1f1b"
    ),
    "pp2xdp2 1f1b mb4": K(
        pp=2, dp=2, tp=1, micro_batch_size=4, num_micro_batches=2, schedule="1f1b"
    ),
    "pp2xtp2 1f1b": K(pp=2, dp=1, tp=2, micro_batch_size=4, num_micro_batches=4, schedule="1f1b"),
    "pp4 1f1b": K(pp=4, dp=1, tp=1, micro_batch_size=2, num_micro_batches=8, schedule="1f1b"),
    "pp4 interleaved": K(
        pp=4,
        dp=1,
        tp=1,
        micro_batch_size=4,
        num_micro_batches=4,
        schedule="interleaved_1f1b",
        virtual_stages=2,
    ),
}


def example_tokens(batch: int, device: str = "cpu") -> torch.Tensor:
    return torch.zeros(batch, CFG.seq_len, dtype=torch.long, device=device)


# ------------------------------------------------------------------------------- prediction
def predict(labels: list[str], nproc: int) -> dict[str, Plan]:
    from planner import plan_from_knobs, trace
    from specs import HardwareSpec, TrainSpec

    with torch.device("meta"):
        model = Transformer(CFG)
    graph = trace(model, (example_tokens(1, "meta"),))
    hw = HardwareSpec.preset("cpu", devices=nproc)
    train = TrainSpec(global_batch_size=GLOBAL_BATCH, precision="fp32", optimizer="adamw")
    return {label: plan_from_knobs(graph, hw, train, PLANS[label]) for label in labels}


# ---------------------------------------------------------------------------------- worker
def worker(plan_dir: Path, steps: int, warmup: int, rounds: int) -> None:
    """Runs under torchrun: every plan in plan_dir, in `rounds` interleaved rounds (each round
    builds every plan afresh, runs `warmup` + `steps` steps, and moves on), so that drift of the
    machine's speed during the run hits every plan alike; rank 0 writes measured.json."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))
    rank = dist.get_rank()
    order = json.loads((plan_dir / "order.json").read_text())
    out: dict[str, dict] = {label: {"step_times_s": [], "warmup_times_s": [], "losses": [], "setup_s": []}
                            for label in order}
    cpu: dict[str, list[float]] = {label: [] for label in order}
    probe = _cpu_probe(rank)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, CFG.seq_len), generator=gen)
    for r in range(rounds):
        for i, label in enumerate(order):
            rec = out[label]
            if "error" in rec:
                continue
            try:
                _run_plan(Plan.from_file(plan_dir / f"{i}.yaml"), tokens, steps, warmup, rec, cpu[label])
            except Exception as e:  # recorded, and the next plan runs
                rec["error"] = f"{type(e).__name__}: {e}"[:500]
                if os.environ.get("FIDELITY_TRACEBACK"):
                    import traceback

                    traceback.print_exc()
            if rank == 0:
                got = statistics.median(rec["step_times_s"]) if rec["step_times_s"] else None
                print(f"[fidelity] round {r + 1}/{rounds} {label}: {rec.get('error', got)}", flush=True)
            dist.barrier()
    for label in order:
        rec = out[label]
        # CPU seconds per step of each process (median over measured steps): with the host's
        # cores, the share of the step the cores were busy
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, cpu[label])
        if "error" not in rec:
            rec["cpu_s_per_step_by_rank"] = [statistics.median(c) for c in per_rank]
            rec["measured_step_time_s"] = statistics.median(rec["step_times_s"])
    probe_after = _cpu_probe(rank)
    if rank == 0:
        out["_cpu_probe"] = {"before_flops_per_s": probe["median"], "after_flops_per_s": probe_after["median"],
                             "before": probe, "after": probe_after}
        (plan_dir / "measured.json").write_text(json.dumps(out, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def _run_plan(plan: Plan, tokens: torch.Tensor, steps: int, warmup: int, rec: dict, cpu: list[float]) -> None:
    """Build `plan` with the runtime and time `warmup` + `steps` steps (barrier to barrier, the
    slowest rank); appends to rec's lists and to `cpu` (this process's CPU seconds per step, all
    its threads, gloo's too)."""
    import torch.distributed as dist

    from runtime import parallelize

    torch.manual_seed(0)
    model = Transformer(CFG)
    t_setup = time.perf_counter()
    pm = parallelize(model, plan, loss_fn=lm_loss, example_inputs=(example_tokens(1),))
    rec["setup_s"].append(time.perf_counter() - t_setup)
    for k in range(warmup + steps):
        dist.barrier()
        t0 = time.perf_counter()
        c0 = time.process_time()
        loss = pm.train_step(pm.local_batch(tokens, tokens))
        c1 = time.process_time()
        dist.barrier()
        (rec["warmup_times_s"] if k < warmup else rec["step_times_s"]).append(time.perf_counter() - t0)
        if k >= warmup:
            cpu.append(c1 - c0)
        rec["losses"].append(None if loss is None else float(loss))
    del pm


def _cpu_probe(rank: int) -> dict[str, float]:
    """fp32 matmul FLOP/s for 0.6 s by rank 0 alone, then by every rank at once ({"alone",
    "median", "sum"}): what the machine actually gave each process, to compare with the preset's
    per-process peak (other jobs on a shared host show up here, not in the preset)."""
    import torch.distributed as dist

    from runtime.calibrate_bench import Sizes, _concurrent_matmul

    return _concurrent_matmul(rank, dist.get_world_size(), torch.device("cpu"), Sizes())


# ------------------------------------------------------------------------------ statistics
def ranks(xs: list[float]) -> list[float]:
    """1-based ranks, ties get their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Pearson correlation of the ranks."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / (va * vb) ** 0.5 if va and vb else float("nan")


def _load() -> list[float]:
    try:
        return list(os.getloadavg())
    except OSError:
        return []


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="measured steps per plan and round")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per plan and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all plans")
    p.add_argument("--only", default=None, help="comma-separated plan labels")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("-o", "--output", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.worker:
        worker(Path(args.worker), args.steps, args.warmup, args.rounds)
        return 0

    labels = [s.strip() for s in args.only.split(",")] if args.only else list(PLANS)
    unknown = [x for x in labels if x not in PLANS]
    if unknown:
        p.error(f"unknown plan labels {unknown}; known: {list(PLANS)}")
    t0 = time.perf_counter()
    plans = predict(labels, args.nproc)
    load_before = _load()
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "order.json").write_text(json.dumps(labels))
        for i, label in enumerate(labels):
            plan = plans[label]
            if plan.mesh.pp > 1 and plan.mesh.tp > 1 and plan.tensor_parallel.loss_parallel:
                # Workaround: runtime.pipeline broadcasts the last stage's loss, which under
                # loss_parallel is a DTensor (c10d.broadcast_ has no sharding strategy); the plan
                # is data, so run it with gathered logits and say so.
                tpc = plan.tensor_parallel.model_copy(update={"loss_parallel": False})
                plan = plan.model_copy(update={"tensor_parallel": tpc})
                notes[label] = (
                    "run with loss_parallel off (runtime.pipeline cannot broadcast a DTensor loss)"
                )
            plan.to_file(d / f"{i}.yaml")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={args.nproc}",
            __file__,
            "--worker",
            str(d),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--rounds",
            str(args.rounds),
        ]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(cmd, env=env, cwd=ROOT)
        measured_path = d / "measured.json"
        if not measured_path.exists():
            print(
                f"fidelity: the torchrun job failed (exit {proc.returncode}) before writing results"
            )
            return 1
        measured = json.loads(measured_path.read_text())
    load_after = _load()

    probe = measured.pop("_cpu_probe", {})
    peak = plans[labels[0]].hardware.device.peak_flops_per_s["fp32"]
    if probe:
        print(
            f"CPU probe: each process got {probe['before_flops_per_s'] / 1e9:.3g} (before) / "
            f"{probe['after_flops_per_s'] / 1e9:.3g} (after) GFLOP/s of fp32 matmul; the preset's "
            f"per-process peak is {peak / 1e9:.3g} (ratio {probe['before_flops_per_s'] / peak:.2f} / "
            f"{probe['after_flops_per_s'] / peak:.2f}; below 1 = other load or oversubscription cost)"
        )
    rows, pred_ok, meas_ok = [], [], []
    cores = os.cpu_count() or 1
    print(f"\n{'plan':<20} {'knobs':<52} {'pred s':>8} {'meas s':>8} {'err':>7} {'cpu s':>6} {'busy':>5}")
    for label in labels:
        pr = plans[label].predicted
        m = measured.get(label, {})
        row = {
            "label": label,
            "knobs": PLANS[label].model_dump(),
            "plan": str(PLANS[label]),
            "predicted_step_time_s": pr.step_time_s,
            "predicted_breakdown_s": pr.time_breakdown_s,
            "predicted_bubble_fraction": pr.bubble_fraction,
            "note": notes.get(label, ""),
            **m,
        }
        if "measured_step_time_s" in m:
            meas = m["measured_step_time_s"]
            row["relative_error"] = (pr.step_time_s - meas) / meas
            pred_ok.append(pr.step_time_s)
            meas_ok.append(meas)
            # CPU seconds of all processes per step, and the share of the host's cores they kept busy
            cpu = sum(m.get("cpu_s_per_step_by_rank", [float("nan")]))
            row["cpu_s_per_step"] = cpu
            row["host_busy_fraction"] = cpu / (cores * meas)
            print(
                f"{label:<20} {str(PLANS[label]):<52} {pr.step_time_s:8.3f} {meas:8.3f} {row['relative_error']:+7.1%}"
                f" {cpu:6.2f} {row['host_busy_fraction']:5.0%}"
            )
        else:
            print(
                f"{label:<20} {str(PLANS[label]):<52} {pr.step_time_s:8.3f} {'FAILED':>8}  {m.get('error', 'no result')}"
            )
        rows.append(row)
    summary = {"plans_run": len(pred_ok), "plans_failed": len(labels) - len(pred_ok)}
    if len(pred_ok) >= 2:
        errs = [abs(a - b) / b for a, b in zip(pred_ok, meas_ok, strict=True)]
        summary.update(
            spearman=spearman(pred_ok, meas_ok),
            median_abs_relative_error=statistics.median(errs),
            mean_signed_relative_error=statistics.fmean(
                (a - b) / b for a, b in zip(pred_ok, meas_ok, strict=True)
            ),
        )
        print(
            f"\nSpearman {summary['spearman']:.3f} (target >= 0.9); median |error| "
            f"{summary['median_abs_relative_error']:.1%} (target <= 15%); mean signed error "
            f"{summary['mean_signed_relative_error']:+.1%}; {summary['plans_failed']} failed"
        )
    result = {
        "what": "predicted (cost_models.estimate_step via planner.plan_from_knobs, cpu preset) vs measured "
        "(runtime.parallelize, torchrun gloo) step time",
        "model": {
            "config": CFG.__dict__ if hasattr(CFG, "__dict__") else str(CFG),
            "global_batch_size": GLOBAL_BATCH,
            "precision": "fp32",
            "optimizer": "adamw",
        },
        "nproc": args.nproc,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "hardware": plans[labels[0]].hardware.model_dump(mode="json"),
        "cpu_probe_flops_per_s": probe,
        "preset_peak_fp32_flops_per_s_per_process": peak,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "wall_s": time.perf_counter() - t0,
        "summary": summary,
        "plans": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {args.output} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
