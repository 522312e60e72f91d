"""Every StepEstimate field over a fixed space of candidates, written once and compared later.

The space: benchmarks/cost_bench.py's (GPT-3 175B on 1024 A100, tp x pp x dp, micro-batch size,
ZeRO stage, recompute, sequence parallelism, schedules), plus HSDP shard sizes and CPU offload
on the same machine, plus a small GPT on the 4-process CPU preset (a shared host: the
core-sharing composition) with every sharding and schedule. For each candidate every field of
the estimate (`StepEstimate.to_prediction()` and the raw per-rank tuples) and the search's lower
bound are recorded.

    .venv/bin/python benchmarks/estimate_equality.py --write /tmp/estimates_before.json
    ... change the cost model ...
    .venv/bin/python benchmarks/estimate_equality.py --check /tmp/estimates_before.json

`--every N` takes every N-th candidate of each group; a `.gz` path is read and written gzipped
(tests/test_estimate_golden.py keeps `--every 20` of the space as tests/data/estimates_golden.json.gz:
a change of any estimate fails it until the golden file is rewritten on purpose).

`--check` prints, per field, how many candidates differ bit for bit and the largest relative
difference, and exits 1 when any field differs by more than `--rtol` (default 0: bit-equal).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cost_bench import candidates, even_stages  # noqa: E402
from specs import HardwareSpec, Knobs, TrainSpec  # noqa: E402


def _space():
    """(name, graph, hw, train, [(knobs, stages)]) per group of the space."""
    from tests.graphs import gpt_graph_from_config

    big = gpt_graph_from_config("gpt3-175b")
    hw = HardwareSpec.preset("dgx-a100-80gb", nodes=128)
    train = TrainSpec(global_batch_size=1536, precision="bf16")
    yield "175b", big, hw, train, list(candidates(big.num_blocks, hw.num_devices, train.global_batch_size))
    extra = []
    for tp, pp in ((8, 1), (8, 8), (4, 16)):
        dp = hw.num_devices // (tp * pp)
        m = train.global_batch_size // dp
        for shard in (8, 16, 32):
            if dp % shard == 0:
                for rec in ("selective", "full"):
                    extra.append((Knobs(pp=pp, dp=dp, tp=tp, sharding="hsdp", hsdp_shard_size=shard,
                                        num_micro_batches=m, recompute=rec, sequence_parallel=True),
                                  even_stages(big.num_blocks, pp, rec)))
        for sharding in ("zero2", "zero3"):
            extra.append((Knobs(pp=pp, dp=dp, tp=tp, sharding=sharding, offload="cpu", num_micro_batches=m,
                                recompute="full"), even_stages(big.num_blocks, pp, "full")))
    yield "175b-hsdp-offload", big, hw, train, extra

    small = gpt_graph_from_config("gpt-small") if _has("gpt-small") else gpt_graph_from_config("gpt-tiny")
    cpu = HardwareSpec.preset("cpu", devices=4)
    ctrain = TrainSpec(global_batch_size=16, precision="fp32", optimizer="adamw")
    cands = []
    for tp, pp in ((1, 1), (2, 1), (1, 2), (2, 2), (1, 4), (4, 1)):
        dp = 4 // (tp * pp)
        for mb in (1, 2):
            if ctrain.global_batch_size % (dp * mb):
                continue
            m = ctrain.global_batch_size // (dp * mb)
            scheds = [("1f1b", 1)] if pp == 1 else [("1f1b", 1), ("gpipe", 1), ("zero_bubble", 1)]
            if pp > 1 and m % pp == 0 and small.num_blocks >= 2 * pp:
                scheds.append(("interleaved_1f1b", 2))
            for sched, v in scheds:
                for sharding in ("none", "zero1", "zero2", "zero3", "hsdp"):
                    if sharding == "zero1" and (tp > 1 or pp > 1):
                        continue
                    if sharding == "hsdp" and dp < 2:
                        continue
                    if sched == "zero_bubble" and sharding in ("zero3", "hsdp"):
                        continue
                    for rec in ("none", "full"):
                        cands.append((Knobs(pp=pp, dp=dp, tp=tp, sharding=sharding,
                                            hsdp_shard_size=(dp if sharding == "hsdp" else None),
                                            micro_batch_size=mb, num_micro_batches=m, schedule=sched,
                                            virtual_stages=v, recompute=rec), even_stages(small.num_blocks, pp * v, rec)))
    yield "cpu4-shared", small, cpu, ctrain, cands


def _has(name: str) -> bool:
    try:
        from planner.models.transformer import gpt_config

        gpt_config(name)
        return True
    except Exception:
        return False


def _fields(e) -> dict:
    p = e.to_prediction().model_dump(mode="json")
    p["memory_by_rank"] = [list(r) for r in e.memory_by_rank_raw]
    p["peak_in_flight"] = list(e.peak_in_flight)
    return p


def _flatten(x, prefix: str = ""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, x


def collect(every: int = 1) -> dict:
    """Every candidate's fields, scored in order on one CostModel per group (its memos shared, as
    in a search); `fresh` below re-scores a sample each on a new CostModel."""
    try:
        from cost_models import CostModel

        def model(graph, hw, train):
            return CostModel(graph, hw, train)
    except ImportError:  # before the CostModel object: the module functions and their caches
        from cost_models import estimate_knobs, step_lower_bound_knobs

        class model:  # noqa: N801
            def __init__(self, graph, hw, train):
                self.args = graph, hw, train

            def estimate(self, k, stages):
                graph, hw, train = self.args
                return estimate_knobs(graph, k, stages, hw, train)

            def lower_bound(self, k, stages):
                graph, hw, train = self.args
                return step_lower_bound_knobs(graph, k, stages, hw, train)

    out = {}
    for name, graph, hw, train, cands in _space():
        cm = model(graph, hw, train)
        for i, (k, stages) in enumerate(cands):
            if i % every:
                continue
            key = f"{name}/{i}/{k}"
            if i % 50 == 7:  # a sample on a model of its own: sharing must not change a result
                cm_i = model(graph, hw, train)
                alone = (_fields(cm_i.estimate(k, stages)), cm_i.lower_bound(k, stages))
            try:
                e = cm.estimate(k, stages)
                rec = _fields(e)
                rec["lower_bound_s"] = cm.lower_bound(k, stages)
                if i % 50 == 7:
                    assert alone == (_fields(e), rec["lower_bound_s"]), f"{key}: differs on a fresh model"
            except Exception as exc:  # a refusal is a result too
                rec = {"error": f"{type(exc).__name__}: {exc}"}
            out[key] = rec
    return out


def compare(before: dict, after: dict, rtol: float) -> int:
    if before.keys() != after.keys():
        print(f"candidate sets differ: {len(before.keys() - after.keys())} only before, "
              f"{len(after.keys() - before.keys())} only after")
        return 1
    diffs: dict[str, list] = {}
    worst_bad = 0
    for key in before:
        a, b = dict(_flatten(before[key])), dict(_flatten(after[key]))
        for f in a.keys() | b.keys():
            x, y = a.get(f), b.get(f)
            if x == y:
                continue
            fname = f.split("[")[0]
            if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
                rel = abs(x - y) / max(abs(x), abs(y), 1e-300)
            else:
                rel = math.inf
            got = diffs.setdefault(fname, [0, 0.0, key, x, y])
            got[0] += 1
            if rel > got[1]:
                got[1:] = [rel, key, x, y]
            if rel > rtol:
                worst_bad += 1
    print(f"{len(before)} candidates compared")
    if not diffs:
        print("every field bit-equal")
    for f, (n, rel, key, x, y) in sorted(diffs.items()):
        print(f"  {f}: {n} differ, largest relative {rel:.3g} at {key}: {x!r} -> {y!r}")
    return 1 if worst_bad else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", type=Path)
    g.add_argument("--check", type=Path)
    ap.add_argument("--rtol", type=float, default=0.0)
    ap.add_argument("--every", type=int, default=1, help="every n-th candidate of each group (tests: 20)")
    args = ap.parse_args()
    t0 = time.process_time()
    got = collect(args.every)
    print(f"{len(got)} candidates estimated in {time.process_time() - t0:.1f} s CPU")
    if args.write:
        write(args.write, got)
        print(f"wrote {args.write}")
        return
    sys.exit(compare(read(args.check), got, args.rtol))


def write(path: Path, got: dict) -> None:
    text = json.dumps(got, sort_keys=True)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode(), mtime=0))
    else:
        path.write_text(text)


def read(path: Path) -> dict:
    data = path.read_bytes()
    return json.loads(gzip.decompress(data) if path.suffix == ".gz" else data)


if __name__ == "__main__":
    main()
