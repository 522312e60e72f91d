"""Planned means runnable: every plan the planner returns for a small model runs, and trains to the
numbers one process gets.

    .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 4 \\
        benchmarks/planned_runnable.py [--alternatives K] [--only NAME,...] [--out FILE]
        [--scale-from dgx-h100-80gb:64]

For each model the coverage benchmark can build small (benchmarks/model_coverage.py's Hugging Face
families, ResNet-18, the structures of tests/structure_models.py, the bundled GPT/Llama), built in
float64 from a seeded config: trace it, run `planner.autoplan` for 4 CPU processes (global batch 8,
SGD, fp32 plan; the `cpu` preset), then for the chosen plan and the best K alternatives with other
knobs (`planner.plan_from_knobs`, as a user pinning them would get) train three steps under
`runtime.parallelize` on the 4 processes and alone on rank 0 (tests/coverage_cases.compare).
With `--scale-from CLUSTER` the plans are the ones autoplan picks for that cluster (global batch 512,
bf16): the chosen one and K alternatives, each scaled down to the 4 processes (tp, then pp kept
where they fit, dp what is left; sharding, sequence parallelism, schedule and recompute kept), so
the structures chosen at scale (tp with sequence parallelism, pipelines) are run here.
Each point is counted as: matched (loss and parameters within 1e-9 in float64; 1e-4/1e-5 in float32),
WRONG (ran, numbers differ: the worst outcome), names-missing (numbers match, but a parameter name
of the model is absent from the full state dict), crash (an exception from the runtime), refused (the
planner's own plan_from_knobs refused an alternative: not a runtime failure). Results: the printed
table and `--out` (default benchmarks/results/planned_runnable.json).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from datetime import timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from case_runner import finish  # noqa: E402
from coverage_cases import BATCH, TRAIN, compare  # noqa: E402
from model_coverage import SMALL  # noqa: E402
from structure_models import VARIANTS  # noqa: E402

from planner import autoplan, plan_from_knobs  # noqa: E402
from specs import Knobs, SpecError  # noqa: E402

# float32 only: HF's MoE grouped matmul has no float64 kernel; T5/BERT are encoder models kept out
# of the LM loss harness (coverage_cases' loss is a causal-LM/classification cross entropy).
FLOAT32 = {"hf/mixtral"}
TOL = {"float64": (1e-9, 1e-9), "float32": (1e-4, 1e-5)}  # (loss, parameter), as tests/test_coverage_runtime.py
SKIP = {"hf/t5"}


def models() -> list[str]:
    out = [f"local/{v}" for v in VARIANTS]
    out += [f"hf/{f}" for f in SMALL if f"hf/{f}" not in SKIP]
    out.append("tv/resnet18")
    return out


def scaled_down(knobs: Knobs, world: int) -> Knobs:
    """A cluster plan's structure on `world` processes: tp and pp kept where they fit (tp first),
    dp what is left, ep as far as it divides that dp; sharding, sp, schedule, recompute kept; BATCH
    split into pp micro-batches."""
    tp = min(knobs.tp, world)
    pp = min(knobs.pp, world // tp)
    dp = world // (tp * pp)
    nmb = pp if pp > 1 else 1
    sharding = knobs.sharding if dp > 1 else "none"
    hsdp = knobs.hsdp_shard_size if sharding == "hsdp" and knobs.hsdp_shard_size and dp % knobs.hsdp_shard_size == 0 \
        and 1 < knobs.hsdp_shard_size < dp else None
    if sharding == "hsdp" and hsdp is None:
        sharding = "zero3"
    ep = math.gcd(knobs.ep, dp)  # expert parallelism kept as far as the dp left allows
    return Knobs(pp=pp, dp=dp, tp=tp, sharding=sharding, hsdp_shard_size=hsdp, micro_batch_size=BATCH // (dp * nmb),
                 num_micro_batches=nmb, schedule=knobs.schedule if pp > 1 else "1f1b", virtual_stages=1,
                 recompute=knobs.recompute if knobs.recompute != "mixed" else "none",
                 sequence_parallel=knobs.sequence_parallel and tp > 1, ep=ep)


def points(name: str, dtype: torch.dtype, alternatives: int, scale_from: str | None = None) -> list[dict]:
    """The chosen plan and up to `alternatives` others, each compared with one process; with
    `scale_from` (a cluster, e.g. dgx-h100-80gb:64) the plans chosen there, scaled down."""
    from coverage_cases import build

    from planner import trace
    from specs import HardwareSpec, TrainSpec

    model, example, _, _ = build(name, dtype)
    graph = trace(model, example, name=name)
    hw = HardwareSpec.preset("cpu", devices=dist.get_world_size())
    if scale_from:
        big = HardwareSpec.load(scale_from)
        cluster = autoplan(None, big, graph=graph, train=TrainSpec(global_batch_size=512, precision="bf16"))
        knob_sets = [scaled_down(cluster.knobs(), dist.get_world_size())]
        for alt in cluster.alternatives[:alternatives]:
            k = scaled_down(alt.knobs, dist.get_world_size())
            if k not in knob_sets:
                knob_sets.append(k)
        return [_run(name, dtype, k, f"{name} {scale_from} {'plan' if i == 0 else f'alt{i}'} {k}", chosen=i == 0,
                     scaled=True) for i, k in enumerate(knob_sets)]
    plan = autoplan(None, hw, graph=graph, train=TRAIN)
    knob_sets = [plan.knobs()]
    for alt in plan.alternatives:
        if len(knob_sets) > alternatives:
            break
        if alt.fits and alt.knobs not in knob_sets:
            knob_sets.append(alt.knobs)
    return [_run(name, dtype, k, f"{name} {'plan' if i == 0 else f'alt{i}'} {k}", chosen=i == 0)
            for i, k in enumerate(knob_sets)]


def _run(name: str, dtype: torch.dtype, knobs: Knobs, label: str, *, chosen: bool, scaled: bool = False) -> dict:
    rec = {"name": label, "model": name, "chosen": chosen}
    try:
        if chosen and not scaled:  # the planner's own plan (its partition), as a user gets it
            res = compare(name, dtype, lambda g, h: autoplan(None, h, graph=g, train=TRAIN))
        else:
            res = compare(name, dtype, lambda g, h: plan_from_knobs(g, h, TRAIN, knobs))
        rec.update(res)
    except SpecError as e:
        rec["error"] = f"SpecError: {e}"[:500]
        # plan_from_knobs refusing a point (the planner's capability rules) is not a runtime failure
        rec["refused"] = "knobs:" in str(e) or "plan:" in str(e)
    except Exception as e:  # noqa: BLE001 - one failing point must not hide the others
        rec["error"] = f"{type(e).__name__}: {e}"[:500]
        rec["traceback"] = traceback.format_exc()[-2000:]
    dist.barrier()
    return rec


def verdict(r: dict) -> str:
    if "error" in r:
        return "refused" if r.get("refused") else "crash"
    loss_tol, param_tol = TOL[r["dtype"].replace("torch.", "")]
    if r["loss_diff"] > loss_tol or r["param_diff"] > param_tol:
        return "WRONG"
    return "names-missing" if r["missing_params"] else "matched"  # a parameter absent from full_state_dict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alternatives", type=int, default=2)
    ap.add_argument("--only", default="")
    ap.add_argument("--scale-from", default=None,
                    help="plan for this cluster (e.g. dgx-h100-80gb:64), run its plans scaled down to this world")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "planned_runnable.json"))
    args = ap.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    names = [x for x in args.only.split(",") if x] or models()
    t0 = time.perf_counter()
    results = []
    for name in names:
        dtype = torch.float32 if name in FLOAT32 else torch.float64
        try:
            got = points(name, dtype, args.alternatives, args.scale_from)
            results += got
            if dist.get_rank() == 0:  # progress, so a run that dies still says how far it got
                print(f"done {name}: " + ", ".join(verdict(r) for r in got), flush=True)
        except Exception as e:  # noqa: BLE001 - the planner itself failed on this model
            results.append({"name": name, "model": name, "chosen": True,
                            "error": f"planning failed: {type(e).__name__}: {e}"[:500]})
            dist.barrier()
    if dist.get_rank() == 0:
        counts: dict[str, int] = {}
        print(f"{'point':<92} verdict")
        for r in results:
            v = verdict(r)
            r["verdict"] = v
            counts[v] = counts.get(v, 0) + 1
            detail = r.get("error", "")[:120] if v in ("crash", "refused") else (
                f"loss {r['loss_diff']:.1e} param {r['param_diff']:.1e}")
            print(f"{r['name'][:92]:<92} {v}  {detail}")
        chosen = [r for r in results if r.get("chosen")]
        print(f"\n{len(names)} models, {len(results)} points ({len(chosen)} chosen plans, batch {BATCH}, "
              f"{dist.get_world_size()} processes), {time.perf_counter() - t0:.0f} s")
        print("counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        print("chosen plans: " + ", ".join(
            f"{k} {sum(1 for r in chosen if r['verdict'] == k)}" for k in ("matched", "WRONG", "crash")))
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    finish(results, args.out)


if __name__ == "__main__":
    main()
