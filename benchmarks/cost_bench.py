"""Per-candidate cost of scoring plans with CostModel.estimate, for GPT-3 175B on 1024 A100s.

Enumerates a search-like space (tp x pp x dp = 1024, micro-batch size, ZeRO stage, recompute,
sequence parallelism, schedule) with an even stage partition, and scores every candidate:

- cold: each candidate once with a fresh CostModel (what a search pays the first time it sees a
  candidate: block costs per layer type are shared, pipeline simulations are shared only
  between candidates with the same pipeline and the same stage times, e.g. none and zero1);
  `--repeat` passes (default 5), each with a new CostModel, and their median;
- warm: the same candidates again on the same CostModel (the fixed overhead per call);
- the pipeline simulations on their own (count and mean time).

The ~50 us per-candidate bar of an earlier issue is retired (scoring is ~15% of a search; issue
16): this is a profile, not a target. Planning time end to end is benchmarks/plan_bench.py.

Like the search (planner.search.Search.run), the benchmark moves everything alive before scoring
out of the cyclic garbage collector's reach with gc.freeze() and pauses the collector while it
scores; `--no-freeze` measures with the collector as it is.

The simulations run with the compiled kernel when it is cached (cost_models.kernels; loaded
before the timing); `AUTOPLAN_JIT=0 .venv/bin/python benchmarks/cost_bench.py` times the
Python passes. Times are CPU time of this process (time.process_time).
Run: .venv/bin/python benchmarks/cost_bench.py
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cost_models import CostModel, kernels  # noqa: E402
from cost_models.simulator import compile_schedule, play  # noqa: E402
from cost_models.stages import layout  # noqa: E402
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
    jit_s = kernels.warm_up() if kernels.cache_ready() else 0.0
    compiled = kernels.ready
    if not args.no_freeze:
        gc.freeze()
        gc.disable()

    # cold passes, each on a new CostModel; the figure is their median (this VM's speed drifts)
    colds = []
    for _ in range(args.repeat):
        cm = CostModel(graph, hw, train, compiled=compiled)
        t0 = time.process_time()
        results = [cm.estimate(k, s) for k, s in cands]
        colds.append((time.process_time() - t0) / len(cands))
    cold = statistics.median(colds)
    num_sims = sum(1 for key in cm.simulation_memo if len(key) == 5)

    reps = 3
    t0 = time.process_time()
    for _ in range(reps):
        for k, s in cands:
            cm.estimate(k, s)
    warm = (time.process_time() - t0) / (reps * len(cands))

    # the distinct simulations (memoised per stage-time set), re-played with their compiled schedules
    distinct = {}
    for k, s in cands:
        lay = layout(cm, k, s)
        distinct.setdefault((lay.schedule, k.pp, k.num_micro_batches, k.virtual_stages, lay.times_id), lay.times)
    assert len(distinct) == num_sims, (len(distinct), num_sims)
    comps = {key[:4]: compile_schedule(*key[:4], compiled=compiled) for key in distinct}
    t0 = time.process_time()
    for key, times in distinct.items():
        play(comps[key[:4]], times, key[0] == "zero_bubble", compiled=compiled)
    sim_mean = (time.process_time() - t0) / max(1, len(distinct))

    fits = [(r.step_time_s, str(k), r) for (k, _), r in zip(cands, results, strict=True) if r.fits]
    print(f"model {graph.name} ({graph.num_params / 1e9:.1f}B params, {graph.num_blocks} blocks, "
          f"traced_by={graph.traced_by}); {hw}; global batch {train.global_batch_size}")
    print(f"candidates scored:          {len(cands)} ({len(fits)} fit in memory)")
    print(f"simulation kernel:          {'numba' if compiled else 'pure Python (not cached, numba missing or AUTOPLAN_JIT=0)'}; "
          f"loaded once per process in {jit_s * 1e3:.0f} ms (before the timing)")
    print(f"garbage collector:          {'as is' if args.no_freeze else 'frozen and paused, as in the search'}")
    print(f"per candidate, cold:        {cold * 1e6:8.1f} us  (CPU time; median of {len(colds)} passes, each on "
          f"a new CostModel: {', '.join(f'{c * 1e6:.1f}' for c in colds)})")
    print(f"per candidate, warm:        {warm * 1e6:8.1f} us")
    print(f"pipeline simulations:       {num_sims} distinct, {sim_mean * 1e6:8.1f} us each on average")
    print(f"cold time without simulations: {(cold * len(cands) - sim_mean * num_sims) / len(cands) * 1e6:8.1f} us per candidate")
    if fits:
        fits.sort(key=lambda x: x[0])
        step, name, best = fits[0]
        print(f"fastest plan that fits: {name}: {step:.2f} s/step, MFU {best.mfu:.1%}, "
              f"{best.peak_memory_bytes / 2**30:.1f} GiB peak")
        print("  " + ", ".join(f"{k}={v:.3g}" for k, v in best.time_breakdown_s.items()))


if __name__ == "__main__":
    main()
