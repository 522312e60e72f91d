"""Published, measured large training runs, each pinned and predicted by the cost model.

    .venv/bin/python benchmarks/fidelity_published.py [--only NAME,...] [--no-free-plans]

Each row of RUNS (benchmarks/published_runs.py: one measured run from a public paper, the model
rebuilt to the paper's shape, every knob the paper or the authors' own launch script states, on
the hardware preset the paper used) is traced on the meta device and scored by
planner.plan_from_knobs with explicit pipeline stages laid out as Megatron-LM does (embedding with
the first layer chunk, head with the last; interleaved chunks round-robin over pp ranks:
`megatron_stages`). The measured step time comes from the paper's own FLOP formula
(PublishedRun.measured_step_time_s); measured MFU uses the paper's model-FLOP formula
(`model_flops_per_step`), and predicted MFU uses the same formula over the predicted step time, so
the two MFUs differ only by the step time.

Printed per run: measured and predicted step time, signed error (pred / meas - 1), measured vs
predicted MFU, and whether the model refuses the configuration (SpecError: the runtime cannot run
it; fits=False: predicted not to fit memory) and why; flags where a knob had to be approximated.
Summary per set (FIT, HELD-OUT, ALL; the split is benchmarks/published_runs.py's): median and p90
|error|, Spearman rank correlation of predicted vs measured MFU, refused count. Rows flagged
`comparable=False` are predicted and printed but kept out of the statistics (their setting cannot
be expressed closely enough). Nothing here changes or fits a cost-model constant: every prediction
uses the bundled presets as they are.

Also printed: autoplan's free plan for GPT-3 175B on 1024 A100 (batch 1536), 530B on 2240 A100
(batch 2240) and Llama 3 405B on 16384 H100 (2048 x 8192 tokens) against the published
configuration's prediction, with exposed vs total communication per mesh axis.

Results: benchmarks/results/fidelity_published.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.published_runs import (  # noqa: E402, F401 (KORTHIKANTI_T5: re-exported)
    DROPPED,
    GPT_175B,
    GPT_530B,
    KORTHIKANTI_T5,
    LLAMA3_405B,
    NARAYANAN_T1,
    RUNS,
    PublishedRun,
    build_hardware,
)
from planner.models.transformer import TransformerConfig  # noqa: E402
from specs import Knobs, SpecError, TrainSpec  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fidelity_published.json"


# ----------------------------------------------------------------------------------- prediction
def megatron_stages(num_layers: int, num_blocks: int, pp: int, v: int, recompute: str) -> list[tuple[int, int, str]] | None:
    """Megatron's layout: layers split evenly into pp * v chunks; the embedding block (0) joins the
    first chunk and the head block (num_layers + 1) the last. None when the graph is not embed ->
    layers -> head or the layers do not split evenly (the caller falls back to even_partition)."""
    chunks = pp * v
    if num_blocks != num_layers + 2 or num_layers % chunks:
        return None
    per = num_layers // chunks
    stages = []
    for c in range(chunks):
        first, last = 1 + c * per, (c + 1) * per
        stages.append((0 if c == 0 else first, num_blocks - 1 if c == chunks - 1 else last, recompute))
    return stages


class Predictor:
    """Traces each model shape once (owner of the graph memo) and scores runs."""

    def __init__(self) -> None:
        self._graphs: dict[TransformerConfig, object] = {}

    def graph(self, cfg: TransformerConfig):
        if cfg not in self._graphs:
            import torch

            from planner.api import trace_model
            from planner.models.transformer import Transformer

            with torch.device("meta"):
                module = Transformer(cfg)
            tokens = torch.zeros(1, cfg.seq_len, dtype=torch.long, device="meta")
            self._graphs[cfg] = trace_model(module, (tokens,))
        return self._graphs[cfg]

    def predict(self, run: PublishedRun) -> dict:
        from planner.api import plan_from_knobs
        from planner.capabilities import knob_problem

        hw = build_hardware(run.hardware, run.num_gpus)
        train = TrainSpec(global_batch_size=run.global_batch, precision="bf16")
        graph = self.graph(run.model)
        knobs = run.knobs()
        out: dict = {"knobs": str(knobs), "runtime_rule": knob_problem(
            sharding=knobs.sharding, offload=knobs.offload, pp=knobs.pp, dp=knobs.dp, tp=knobs.tp,
            precision="bf16", schedule=knobs.schedule)}
        stages = megatron_stages(run.model.num_layers, graph.num_blocks, run.pp, run.virtual_stages, run.recompute)
        out["stages"] = "megatron" if stages else "even_partition"
        try:
            plan = plan_from_knobs(graph, hw, train, knobs, stages)
        except SpecError as e:
            out.update(refused=True, why=f"not runnable: {e}")
            return out
        pr = plan.predicted
        peak_flops = hw.device.peak_flops_per_s["bf16"]
        meas = run.measured_step_time_s()
        mflops = run.model_flops_per_step()
        out.update(
            refused=not pr.fits,
            why="" if pr.fits else (f"does not fit: peak {pr.peak_memory_bytes / 2**30:.1f} GiB > "
                                    f"{pr.memory_capacity_bytes / 2**30:.1f} GiB on pp rank {pr.worst_rank_stage}"),
            measured_step_s=meas, predicted_step_s=pr.step_time_s, error=pr.step_time_s / meas - 1,
            measured_mfu=mflops / (meas * run.num_gpus * peak_flops),
            predicted_mfu=mflops / (pr.step_time_s * run.num_gpus * peak_flops),
            model_mfu=pr.mfu, peak_memory_gib=pr.peak_memory_bytes / 2**30,
            breakdown_s={k: round(v, 4) for k, v in pr.time_breakdown_s.items() if v},
            comm={a: {"time_s": c.time_s, "exposed_s": c.exposed_s} for a, c in pr.comm.items()},
            bubble_fraction=pr.bubble_fraction,
        )
        return out


# ----------------------------------------------------------------------------------- statistics
def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho (benchmarks/fidelity.py's: Pearson correlation of tie-averaged ranks); nan
    below 3 points."""
    from benchmarks.fidelity import spearman as rho

    return rho(a, b) if len(a) >= 3 else math.nan


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    s = sorted(xs)
    if not s:
        return math.nan
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(rows: list[tuple[PublishedRun, dict]]) -> dict:
    scored = [(r, p) for r, p in rows if r.comparable and "error" in p]
    errs = [abs(p["error"]) for _, p in scored]
    return {
        "runs": len(rows), "scored": len(scored),
        "median_abs_error": statistics.median(errs) if errs else math.nan,
        "p90_abs_error": percentile(errs, 90),
        "spearman_mfu": spearman([p["predicted_mfu"] for _, p in scored], [p["measured_mfu"] for _, p in scored]),
        "spearman_step_time": spearman([p["predicted_step_s"] for _, p in scored],
                                       [p["measured_step_s"] for _, p in scored]),
        "refused": sum(1 for r, p in rows if p.get("refused")),
        "refused_for_memory": sum(1 for r, p in rows if p.get("refused") and p["why"].startswith("does not fit")),
    }


# ----------------------------------------------------------------------------------- free plans
FREE_CASES = [
    # (name, model, preset, GPUs, batch, the published run whose knobs are the reference)
    ("GPT-3 175B on 1024 A100", GPT_175B, "dgx-a100-80gb", 1024, 1536,
     # Megatron-LM README "GPT-3 Example" (examples/pretrain_gpt3_175B.sh): tp 8, pp 16, global batch 1536;
     # micro-batch 1 and full recompute as Narayanan Table 1; interleaving not stated: 1f1b.
     dict(tp=8, pp=16, dp=8, micro_batch=1, recompute="full")),
    ("GPT 530B on 2240 A100", GPT_530B, "dgx-a100-80gb", 2240, 2240,
     dict(tp=8, pp=35, dp=8, micro_batch=1, recompute="full")),  # Narayanan Table 2, PTD-P 2240-GPU row
    ("Llama 3 405B on 16384 H100", LLAMA3_405B, "dgx-h100-80gb", 16384, 2048,
     dict(tp=8, pp=16, dp=128, micro_batch=1, recompute="none", sharding="zero2", schedule="interleaved_1f1b",
          virtual_stages=2)),  # Dubey et al. 2024 Table 4 row 2, as published_runs.LLAMA3
]


def comm_line(pred) -> str:
    parts = []
    for axis, c in pred.comm.items():
        if c.time_s:
            parts.append(f"{axis}: {c.exposed_s:.3g} s exposed of {c.time_s:.3g} s ({c.volume_bytes / 2**30:.3g} GiB)")
    return "; ".join(parts) or "none"


def free_plans(pred: Predictor) -> list[dict]:
    from planner.api import autoplan, plan_from_knobs

    out = []
    for name, cfg, preset, gpus, batch, ref in FREE_CASES:
        hw = build_hardware(preset, gpus)
        train = TrainSpec(global_batch_size=batch, precision="bf16")
        graph = pred.graph(cfg)
        t0 = time.perf_counter()
        plan = autoplan(None, hw, graph=graph, train=train)
        plan_s = time.perf_counter() - t0
        k = Knobs(pp=ref["pp"], dp=ref["dp"], tp=ref["tp"], sharding=ref.get("sharding", "none"),
                  micro_batch_size=ref["micro_batch"], num_micro_batches=batch // (ref["dp"] * ref["micro_batch"]),
                  schedule=ref.get("schedule", "1f1b"), virtual_stages=ref.get("virtual_stages", 1),
                  recompute=ref["recompute"])
        stages = megatron_stages(cfg.num_layers, graph.num_blocks, k.pp, k.virtual_stages, k.recompute)
        rec: dict = {"case": name, "free_plan": str(plan), "plan_time_s": plan_s}
        print(f"\n{name} (batch {batch}):")
        p = plan.predicted
        print(f"  free plan   {plan}  {p.step_time_s:.3f} s/step  MFU {p.mfu:.1%}  peak {p.peak_memory_bytes / 2**30:.1f} GiB")
        print(f"    comm: {comm_line(p)}  bubble {p.bubble_fraction:.1%}")
        rec.update(free_step_s=p.step_time_s, free_mfu=p.mfu,
                   free_comm={a: {"volume_bytes": c.volume_bytes, "time_s": c.time_s, "exposed_s": c.exposed_s}
                              for a, c in p.comm.items()})
        try:
            ref_plan = plan_from_knobs(graph, hw, train, k, stages)
            r = ref_plan.predicted
            fits = "" if r.fits else f"  DOES NOT FIT ({r.peak_memory_bytes / 2**30:.1f} GiB)"
            print(f"  published   {ref_plan}  {r.step_time_s:.3f} s/step  MFU {r.mfu:.1%}  "
                  f"peak {r.peak_memory_bytes / 2**30:.1f} GiB{fits}")
            print(f"    comm: {comm_line(r)}  bubble {r.bubble_fraction:.1%}")
            print(f"  predicted speedup of the free plan over the published configuration: "
                  f"{r.step_time_s / p.step_time_s:.3f}x")
            rec.update(published=str(ref_plan), published_step_s=r.step_time_s, published_fits=r.fits,
                       published_comm={a: {"volume_bytes": c.volume_bytes, "time_s": c.time_s,
                                           "exposed_s": c.exposed_s} for a, c in r.comm.items()},
                       predicted_speedup=r.step_time_s / p.step_time_s)
        except SpecError as e:
            print(f"  published   {k}: refused: {e}")
            rec.update(published=str(k), published_refused=str(e))
        out.append(rec)
    return out


def zero1_check(pred: Predictor) -> dict:
    """How a pinned zero1 (Megatron's distributed optimizer) with tp > 1 behaves, and its nearest
    expressible setting zero2, on Narayanan Table 1's 145.6B run."""
    from planner.api import autoplan, plan_from_knobs

    run = next(r for r in NARAYANAN_T1 if r.name.endswith("145.6B"))
    hw = build_hardware(run.hardware, run.num_gpus)
    train = TrainSpec(global_batch_size=run.global_batch, precision="bf16")
    graph = pred.graph(run.model)
    stages = megatron_stages(run.model.num_layers, graph.num_blocks, run.pp, run.virtual_stages, run.recompute)
    out = {}
    print(f"\nzero1 (distributed optimizer) with tp={run.tp} pp={run.pp} on {run.name}:")
    for sharding in ("zero1", "zero2"):
        k = run.knobs().model_copy(update={"sharding": sharding})
        from specs import Constraints

        pins = Constraints(**{n: getattr(k, n) for n in ("pp", "dp", "tp", "sharding", "micro_batch_size",
                                                         "num_micro_batches", "schedule", "virtual_stages",
                                                         "recompute", "sequence_parallel", "offload")})
        try:
            a = autoplan(None, hw, graph=graph, train=train, constraints=pins)
            auto = f"autoplan pinned: {a.predicted.step_time_s:.3f} s/step"
        except SpecError as e:
            auto = f"autoplan pinned: refused: {str(e).splitlines()[0][:200]}"
        try:
            p = plan_from_knobs(graph, hw, train, k, stages)
            direct = f"plan_from_knobs: {p.predicted.step_time_s:.3f} s/step, peak {p.predicted.peak_memory_bytes / 2**30:.1f} GiB"
        except SpecError as e:
            direct = f"plan_from_knobs: refused: {e}"
        print(f"  {sharding}: {auto}; {direct}")
        out[sharding] = {"autoplan": auto, "plan_from_knobs": direct}
    return out


# ----------------------------------------------------------------------------------- main
def fmt_pct(x: float) -> str:
    return "   n/a" if x != x else f"{x:6.1%}"


def print_set(title: str, rows: list[tuple[PublishedRun, dict]]) -> dict:
    print(f"\n== {title} ==")
    print(f"{'run':34} {'meas s':>9} {'pred s':>9} {'error':>7} {'MFU meas':>8} {'MFU pred':>8}  knobs / refusal")
    for run, p in rows:
        if "error" in p:
            mark = "" if run.comparable else "  [not scored]"
            print(f"{run.name:34} {p['measured_step_s']:9.3f} {p['predicted_step_s']:9.3f} {p['error']:+7.1%} "
                  f"{p['measured_mfu']:8.1%} {p['predicted_mfu']:8.1%}  {p['knobs']}{mark}")
        else:
            print(f"{run.name:34} {run.measured_step_time_s():9.3f} {'-':>9} {'-':>7} {'':8} {'':8}  {p['knobs']}")
        if p.get("refused"):
            print(f"    REFUSED: {p['why']}")
        if p.get("runtime_rule"):
            print(f"    runtime rule: {p['runtime_rule']}")
        for f in run.flags:
            print(f"    ~ {f}")
    s = summarize(rows)
    print(f"-- {title}: {s['scored']} scored of {s['runs']}; median |error| {fmt_pct(s['median_abs_error'])}, "
          f"p90 |error| {fmt_pct(s['p90_abs_error'])}, Spearman MFU {s['spearman_mfu']:.3f}, "
          f"Spearman step time {s['spearman_step_time']:.3f}, refused {s['refused']} "
          f"({s['refused_for_memory']} for memory)")
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated run names")
    ap.add_argument("--no-free-plans", action="store_true", help="skip the three autoplan free plans")
    args = ap.parse_args(argv)
    runs = [r for r in RUNS if not args.only or r.name in args.only.split(",")]
    pred = Predictor()
    t0 = time.perf_counter()
    rows = [(r, pred.predict(r)) for r in runs]
    fit = [x for x in rows if not x[0].held_out]
    held = [x for x in rows if x[0].held_out]
    summary = {"fit": print_set("FIT (Narayanan 2021 Table 1, Korthikanti 2022 Table 5)", fit),
               "held_out": print_set("HELD-OUT (Narayanan 2021 Table 2, Zhao 2023, torchtitan, Llama 3)", held),
               "all": print_set("ALL", rows)}
    print("\nDropped (not pinned or not expressible):")
    for d in DROPPED:
        print(f"  - {d}")
    extra: dict = {}
    if not args.no_free_plans and not args.only:
        extra["zero1_check"] = zero1_check(pred)
        extra["free_plans"] = free_plans(pred)
    print(f"\n(wall {time.perf_counter() - t0:.1f} s)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if not args.only:
        RESULTS.write_text(json.dumps({
            "summary": summary, "dropped": DROPPED, **extra,
            "runs": [{"name": r.name, "source": r.source, "held_out": r.held_out, "comparable": r.comparable,
                      "hardware": r.hardware, "num_gpus": r.num_gpus, "flags": list(r.flags), **p}
                     for r, p in rows],
        }, indent=1, default=float))
        print(f"results: {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
