"""Planned means runnable: every plan the planner returns for a small model runs, and trains to the
numbers one process gets.

    .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 4 \\
        benchmarks/planned_runnable.py [--alternatives K] [--only NAME,...] [--out FILE]

For each model the coverage benchmark can build small (benchmarks/model_coverage.py's Hugging Face
families, ResNet-18, the structures of tests/structure_models.py, the bundled GPT/Llama), built in
float64 from a seeded config: trace it, run `planner.autoplan` for 4 CPU processes (global batch 8,
SGD, fp32 plan; the `cpu` preset), then for the chosen plan and the best K alternatives with other
knobs (`planner.plan_from_knobs`, as a user pinning them would get) train three steps under
`runtime.parallelize` on the 4 processes and alone on rank 0 (tests/coverage_cases.compare).
Each point is counted as: matched (loss and parameters within 1e-9 in float64; 1e-4/1e-5 in float32),
WRONG (ran, numbers differ: the worst outcome), crash (an exception from the runtime), refused (the
planner's own plan_from_knobs refused an alternative: not a runtime failure). Results: the printed
table and `--out` (default benchmarks/results/planned_runnable.json).
"""

from __future__ import annotations

import argparse
import json
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
from coverage_cases import BATCH, TOL, TRAIN, compare  # noqa: E402
from model_coverage import SMALL  # noqa: E402
from structure_models import VARIANTS  # noqa: E402

from planner import autoplan, plan_from_knobs  # noqa: E402
from specs import SpecError  # noqa: E402

# float32 only: HF's MoE grouped matmul has no float64 kernel; T5/BERT are encoder models kept out
# of the LM loss harness (coverage_cases' loss is a causal-LM/classification cross entropy).
FLOAT32 = {"hf/mixtral"}
SKIP = {"hf/t5"}


def models() -> list[str]:
    out = [f"local/{v}" for v in VARIANTS]
    out += [f"hf/{f}" for f in SMALL if f"hf/{f}" not in SKIP]
    out.append("tv/resnet18")
    return out


def points(name: str, dtype: torch.dtype, alternatives: int) -> list[dict]:
    """The chosen plan and up to `alternatives` others, each compared with one process."""
    from coverage_cases import build

    from planner import trace
    from specs import HardwareSpec

    model, example, _, _ = build(name, dtype)
    graph = trace(model, example, name=name)
    hw = HardwareSpec.preset("cpu", devices=dist.get_world_size())
    plan = autoplan(None, hw, graph=graph, train=TRAIN)
    knob_sets = [plan.knobs()]
    for alt in plan.alternatives:
        if len(knob_sets) > alternatives:
            break
        if alt.fits and alt.knobs not in knob_sets:
            knob_sets.append(alt.knobs)
    results = []
    for i, knobs in enumerate(knob_sets):
        label = f"{name} {'plan' if i == 0 else f'alt{i}'} {knobs}"
        rec = {"name": label, "model": name, "chosen": i == 0}
        try:
            if i == 0:
                res = compare(name, dtype, lambda g, h: autoplan(None, h, graph=g, train=TRAIN))
            else:
                res = compare(name, dtype, lambda g, h, k=knobs: plan_from_knobs(g, h, TRAIN, k))
            rec.update(res)
        except SpecError as e:
            rec["error"] = f"SpecError: {e}"[:500]
            rec["refused"] = i > 0 and "knobs:" in str(e)
        except Exception as e:  # noqa: BLE001 - one failing point must not hide the others
            rec["error"] = f"{type(e).__name__}: {e}"[:500]
            rec["traceback"] = traceback.format_exc()[-2000:]
        dist.barrier()
        results.append(rec)
    return results


def verdict(r: dict) -> str:
    if "error" in r:
        return "refused" if r.get("refused") else "crash"
    loss_tol, param_tol = TOL[r["dtype"].replace("torch.", "")]
    ok = r["loss_diff"] <= loss_tol and r["param_diff"] <= param_tol and not r["missing_params"]
    return "matched" if ok else "WRONG"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alternatives", type=int, default=2)
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "planned_runnable.json"))
    args = ap.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    names = [x for x in args.only.split(",") if x] or models()
    t0 = time.perf_counter()
    results = []
    for name in names:
        dtype = torch.float32 if name in FLOAT32 else torch.float64
        try:
            results += points(name, dtype, args.alternatives)
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
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
