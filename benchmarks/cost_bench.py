"""Per-candidate cost of scoring plans with estimate_knobs, for GPT-3 175B on 1024 A100s.

Enumerates a search-like space (tp x pp x dp = 1024, micro-batch size, ZeRO stage, recompute,
sequence parallelism, schedule) with an even stage partition, and scores every candidate:

- cold: each candidate once, from empty caches (what a search pays the first time it sees a
  candidate: block costs per layer type are shared, pipeline simulations are shared only
  between candidates with the same pipeline and the same stage results, e.g. none and zero1);
  `--repeat` passes (default 5), each after cost_models.clear_caches(), and their median;
- warm: the same candidates again with every cache hot (the fixed overhead per call);
- estimate_knobs returns with the score's fields set (step time, memory peak, fits) and computes
  the others on first access: "every field read" adds that, for every candidate;
- the pipeline simulations on their own (count and mean time).

Cold includes compiling each schedule structure once (cost_models.periodic: the round structure
for the smallest equivalent micro-batch count) and playing each distinct simulation with the
steady-phase fast-forward; "cold time without simulations" subtracts the simulations re-played
with the compiled structures cached.

Like the search (planner.search.Search.run), the benchmark moves everything alive before scoring
(imports, the graph) out of the cyclic garbage collector's reach with gc.freeze() and pauses the
collector while it scores (scoring makes no reference cycles; the young-generation collections
would otherwise walk every object the caches keep: ~10% of the cold time); `--no-freeze` measures
with the collector as it is (full collections then also walk the ~200k objects of torch and the
graph whenever the growing caches trigger one: +-30 us per candidate, depending on when they fall).

The simulation passes run as numba kernels (cost_models.kernels; loaded before the timing, as a
search loads them once it has spent their load time in Python; the load time is printed);
`AUTOPLAN_JIT=0 .venv/bin/python benchmarks/cost_bench.py` times the pure-Python passes.

The issue's bar is ~50 us per candidate; the last lines say how cold and warm compare with it.

Times are CPU time of this process (time.process_time), so other load on a shared machine
inflates them less than wall-clock would. Run: .venv/bin/python benchmarks/cost_bench.py
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cost_models import (
    clear_caches,  # noqa: E402
    estimate_knobs,  # noqa: E402
    kernels,  # noqa: E402
)
from cost_models import simulator as sim_mod  # noqa: E402
from cost_models.blocks import context  # noqa: E402
from cost_models.layout import _layout_for  # noqa: E402
from specs import HardwareSpec, Knobs, TrainSpec  # noqa: E402


def even_stages(num_blocks: int, n: int, rec: str) -> list[tuple[int, int, str]]:
    out, b = [], 0
    for j in range(n):
        c = num_blocks // n + (1 if j < num_blocks % n else 0)
        out.append((b, b + c - 1, rec))
        b += c
    return out


def candidates(num_blocks: int, world: int, batch: int):
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4, 8, 16, 32):
            if world % (tp * pp):
                continue
            dp = world // (tp * pp)
            for mb in (1, 2):
                if batch % (dp * mb):
                    continue
                m = batch // (dp * mb)
                scheds = [("1f1b", 1)]
                if pp > 1:
                    scheds.append(("zero_bubble", 1))
                    if m % pp == 0 and num_blocks >= 2 * pp * 2:
                        scheds.append(("interleaved_1f1b", 2))
                for sched, v in scheds:
                    for sharding in ("none", "zero1", "zero2", "zero3"):
                        for rec in ("none", "selective", "full"):
                            for sp in ((False, True) if tp > 1 else (False,)):
                                knobs = Knobs(pp=pp, dp=dp, tp=tp, sharding=sharding, micro_batch_size=mb,
                                              num_micro_batches=m, schedule=sched, virtual_stages=v,
                                              recompute=rec, sequence_parallel=sp)
                                yield knobs, even_stages(num_blocks, pp * v, rec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traced", action="store_true", help="trace the bundled gpt3-175b (planner.trace) "
                    "instead of the analytic graph (tests/graphs.py)")
    ap.add_argument("--repeat", type=int, default=5, help="cold passes (each from empty caches); the "
                    "figure is their median")
    ap.add_argument("--no-freeze", action="store_true", help="leave the garbage collector as it is "
                    "(the search freezes what exists before it starts and pauses the collector)")
    args = ap.parse_args()
    if args.traced:
        from planner import trace
        from planner.models import build_model

        bm = build_model("gpt3-175b", device="meta")
        graph = trace(bm.module, bm.example_inputs)
    else:
        from tests.graphs import gpt_graph_from_config

        graph = gpt_graph_from_config("gpt3-175b")
    hw = HardwareSpec.preset("dgx-a100-80gb", nodes=128)
    train = TrainSpec(global_batch_size=1536)
    cands = list(candidates(graph.num_blocks, hw.num_devices, train.global_batch_size))
    jit_s = kernels.warm_up()  # once per process, as the search does before it starts
    if not args.no_freeze:
        gc.freeze()
        gc.disable()

    # cold passes, each from empty caches (cost_models.clear_caches: contexts, layouts, simulations,
    # compiled schedules); the figure is their median (this VM's speed drifts 10-20% within minutes)
    colds = []
    for _ in range(args.repeat):
        clear_caches()
        t0 = time.process_time()
        results = [estimate_knobs(graph, k, s, hw, train) for k, s in cands]
        colds.append((time.process_time() - t0) / len(cands))
    cold = statistics.median(colds)
    num_sims = len(sim_mod._CACHE)
    t0 = time.process_time()
    for r in results:  # the fields besides the score, computed on first access
        _ = r.time_breakdown_s
    details = (time.process_time() - t0) / len(cands)

    reps = 3
    t0 = time.process_time()
    for _ in range(reps):
        for k, s in cands:
            estimate_knobs(graph, k, s, hw, train)
    warm = (time.process_time() - t0) / (reps * len(cands))

    # the distinct simulations (memoised per stage-time set: layout.times_id), re-played by value
    ctx = context(graph, hw, train)
    distinct = {}
    for k, s in cands:
        lay, sched = _layout_for(ctx, graph, k, s, hw)
        distinct.setdefault((sched, k.pp, k.num_micro_batches, k.virtual_stages, lay.times_id), lay.times)
    assert len(distinct) == num_sims, (len(distinct), num_sims)
    sim_mod._CACHE.clear()
    t0 = time.process_time()
    for (name, pp, m, v, _), times in distinct.items():
        sim_mod.simulate_cached(name, pp, m, v, times)
    sim_mean = (time.process_time() - t0) / max(1, len(distinct))

    fits = [(r.step_time_s, str(k), r) for (k, _), r in zip(cands, results, strict=True) if r.fits]
    print(f"model {graph.name} ({graph.num_params / 1e9:.1f}B params, {graph.num_blocks} blocks, "
          f"traced_by={graph.traced_by}); {hw}; global batch {train.global_batch_size}")
    print(f"candidates scored:          {len(cands)} ({len(fits)} fit in memory)")
    print(f"simulation kernels:         {'numba' if kernels.ready else 'pure Python (numba missing or AUTOPLAN_JIT=0)'}; "
          f"loaded once per process in {jit_s * 1e3:.0f} ms (before the timing)")
    print(f"garbage collector:          {'as is' if args.no_freeze else 'frozen and paused, as in the search'}")
    print(f"per candidate, cold caches: {cold * 1e6:8.1f} us  (CPU time; median of {len(colds)} passes from "
          f"empty caches: {', '.join(f'{c * 1e6:.1f}' for c in colds)})")
    print(f"  + every field read:       {(cold + details) * 1e6:8.1f} us  (breakdowns, throughput, ...: computed "
          f"on first access, {details * 1e6:.1f} us; a search reads them for the plans it reports)")
    print(f"per candidate, warm caches: {warm * 1e6:8.1f} us")
    print(f"pipeline simulations:       {num_sims} distinct, {sim_mean * 1e6:8.1f} us each on average")
    print(f"cold time without simulations: {(cold * len(cands) - sim_mean * num_sims) / len(cands) * 1e6:8.1f} us per candidate")
    for label, t in (("cold", cold), ("warm", warm)):
        print(f"bar ~50 us per candidate, {label}: {'met' if t <= 50e-6 else 'MISSED'} ({t * 1e6:.1f} us)")
    if fits:
        fits.sort(key=lambda x: x[0])
        step, name, best = fits[0]
        print(f"fastest plan that fits: {name}: {step:.2f} s/step, MFU {best.mfu:.1%}, "
              f"{best.peak_memory_bytes / 2**30:.1f} GiB peak")
        print("  " + ", ".join(f"{k}={v:.3g}" for k, v in best.time_breakdown_s.items()))


if __name__ == "__main__":
    main()
