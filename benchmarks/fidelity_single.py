"""Predicted vs measured step time for ONE process: the compute model on its own.

    .venv/bin/python benchmarks/fidelity_single.py [--steps 5] [--warmup 2]

benchmarks/fidelity.py runs 4 gloo processes on this 2-core machine, where core sharing,
synchronisation and the distributed engines add their own effects. This script isolates the
part they all rest on: the same small GPT (benchmarks/fidelity.CFG), one process, one thread
(as under torchrun), executed by the runtime (runtime.parallelize in a 1-process gloo group)
under single-device plans: micro-batch sizes 1..16, recompute none / selective / full, and
gradient accumulation — the CPU analogue of issue 7's single-GPU table. The prediction is
planner.plan_from_knobs -> cost_models.estimate_step with HardwareSpec.preset("cpu", devices=1);
the measured figure is the median of `--steps` steps after `--warmup`. Peak memory is not
compared here (the CPU allocator has no max_memory_allocated counterpart).
Results: benchmarks/results/fidelity_cpu_single.json. Nothing here tunes the cost model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.fidelity import CFG, _load, example_tokens, spearman  # noqa: E402
from planner.models import lm_loss  # noqa: E402
from planner.models.transformer import Transformer  # noqa: E402
from specs import Knobs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fidelity_cpu_single.json"

# label -> (knobs, global batch)
PLANS: dict[str, tuple[Knobs, int]] = {}
for _mb in (1, 2, 4, 8, 16):
    for _rec in ("none", "selective", "full"):
        PLANS[f"mb{_mb} {_rec}"] = (Knobs(pp=1, dp=1, tp=1, micro_batch_size=_mb, recompute=_rec), _mb)
PLANS["mb4x4 accumulation"] = (Knobs(pp=1, dp=1, tp=1, micro_batch_size=4, num_micro_batches=4), 16)
PLANS["mb2x8 accumulation full"] = (
    Knobs(pp=1, dp=1, tp=1, micro_batch_size=2, num_micro_batches=8, recompute="full"), 16
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("-o", "--output", default=str(RESULTS))
    args = p.parse_args(argv)

    import torch.distributed as dist

    from planner import plan_from_knobs, trace
    from runtime import parallelize
    from specs import HardwareSpec, TrainSpec

    torch.set_num_threads(1)  # as under torchrun (OMP_NUM_THREADS=1)
    with torch.device("meta"):
        meta = Transformer(CFG)
    graph = trace(meta, (example_tokens(1, "meta"),))
    hw = HardwareSpec.preset("cpu", devices=1)
    t0 = time.perf_counter()
    load_before = _load()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=120))
        try:
            gen = torch.Generator().manual_seed(1)
            print(f"{'plan':<26} {'knobs':<44} {'pred s':>8} {'meas s':>8} {'err':>7}")
            for label, (knobs, batch) in PLANS.items():
                train = TrainSpec(global_batch_size=batch, precision="fp32", optimizer="adamw")
                plan = plan_from_knobs(graph, hw, train, knobs)
                torch.manual_seed(0)
                pm = parallelize(Transformer(CFG), plan, loss_fn=lm_loss, example_inputs=(example_tokens(1),))
                tokens = torch.randint(0, CFG.vocab_size, (batch, CFG.seq_len), generator=gen)
                times = []
                for _ in range(args.warmup + args.steps):
                    s = time.perf_counter()
                    pm.train_step(pm.local_batch(tokens, tokens))
                    times.append(time.perf_counter() - s)
                del pm
                meas = statistics.median(times[args.warmup:])
                pred = plan.predicted.step_time_s
                err = (pred - meas) / meas
                rows.append({
                    "label": label, "plan": str(knobs), "global_batch_size": batch,
                    "predicted_step_time_s": pred, "predicted_breakdown_s": plan.predicted.time_breakdown_s,
                    "step_times_s": times[args.warmup:], "warmup_times_s": times[:args.warmup],
                    "measured_step_time_s": meas, "relative_error": err,
                })
                print(f"{label:<26} {str(knobs):<44} {pred:8.3f} {meas:8.3f} {err:+7.1%}", flush=True)
        finally:
            dist.destroy_process_group()
    pred = [r["predicted_step_time_s"] for r in rows]
    meas = [r["measured_step_time_s"] for r in rows]
    errs = [abs(r["relative_error"]) for r in rows]
    summary = {
        "plans_run": len(rows),
        "spearman": spearman(pred, meas),
        "median_abs_relative_error": statistics.median(errs),
        "max_abs_relative_error": max(errs),
        "mean_signed_relative_error": statistics.fmean(r["relative_error"] for r in rows),
    }
    print(f"\nSpearman {summary['spearman']:.3f}; median |error| {summary['median_abs_relative_error']:.1%}; "
          f"max |error| {summary['max_abs_relative_error']:.1%}; mean signed error "
          f"{summary['mean_signed_relative_error']:+.1%}")
    result = {
        "what": "one process, one thread: predicted (cost_models via planner.plan_from_knobs, cpu preset, "
        "devices=1) vs measured (runtime.parallelize, 1-process gloo group) step time",
        "model": {"config": CFG.__dict__, "precision": "fp32", "optimizer": "adamw"},
        "steps": args.steps, "warmup": args.warmup,
        "hardware": hw.model_dump(mode="json"),
        "load_average_before": load_before, "load_average_after": _load(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "wall_s": time.perf_counter() - t0,
        "summary": summary,
        "plans": rows,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
