"""Benchmark: trace GPT-3 175B (96 layers, hidden 12288, 96 heads, seq 2048, vocab 51200) on the
meta device, with FLOP counts and saved-activation bytes, and check the targets of issue 2 §3:
under 5 s and under 1 GiB of extra RAM.

    .venv/bin/python benchmarks/trace_bench.py [--model gpt3-175b] [--repeats 3]

Wall time: time.perf_counter around planner.trace (the model is built on meta beforehand; a
tiny model is traced first so that one-off lazy imports of torch.fx/FakeTensor code are not
counted; the cold first trace is printed too). Extra RSS: the process's peak resident set
(resource.getrusage ru_maxrss, a high-water mark) after tracing minus the resident set just
before (from /proc/self/statm), so it bounds what tracing added. Exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

TIME_TARGET_S = 5.0
RSS_TARGET_BYTES = 2**30


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt3-175b")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from planner.models import build_model
    from planner.tracer import trace

    t = time.perf_counter()
    tiny = build_model("gpt-tiny", device="meta")
    trace(tiny.module, tiny.example_inputs)
    cold_s = time.perf_counter() - t

    built = build_model(args.model, device="meta")
    rss_before = current_rss_bytes()
    times = []
    graph = None
    for _ in range(args.repeats):
        t = time.perf_counter()
        graph = trace(built.module, built.example_inputs, name=args.model)
        times.append(time.perf_counter() - t)
    extra_rss = peak_rss_bytes() - rss_before

    best, worst = min(times), max(times)
    print(f"model: {args.model} ({graph.num_params / 1e9:.1f}B params, {graph.num_blocks} blocks, "
          f"{len(graph.layer_types)} layer types, traced by {graph.traced_by})")
    print(f"fwd+bwd FLOPs per sample: {graph.fwd_flops_per_sample + graph.bwd_flops_per_sample:.4e}")
    print(f"cold start (first trace in process, gpt-tiny, incl. lazy imports): {cold_s:.2f} s")
    print(f"trace wall time: best {best:.2f} s, worst {worst:.2f} s over {len(times)} runs "
          f"(target < {TIME_TARGET_S:.0f} s)")
    print(f"peak extra RSS: {extra_rss / 2**20:.0f} MiB (target < {RSS_TARGET_BYTES / 2**20:.0f} MiB)")
    ok = worst < TIME_TARGET_S and extra_rss < RSS_TARGET_BYTES
    print("targets: " + ("met" if ok else "MISSED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
