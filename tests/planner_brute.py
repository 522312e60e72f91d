"""Brute-force enumeration of the planner's space, written independently of planner.search.

It restates the space's rules (DESIGN.md, planner.search docstring) in the most literal way:
every factorization, every sharding, every micro-batch split, every schedule, every contiguous
partition at the cut points and every per-stage checkpointing mode, each scored by the backend.
Only usable on tiny spaces; the tests compare the planner's answer with its minimum.
"""

from __future__ import annotations

from itertools import combinations, product

from specs import Constraints, HardwareSpec, Knobs, ModelGraph, TrainSpec


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _ok_schedule(s: str, pp: int, m: int) -> bool:
    # torch.distributed.pipelining: Schedule1F1B needs m >= pp; interleaved schedules need m to be
    # a multiple of max(1, m // pp).
    if s == "1f1b":
        return m >= pp
    # cost_models.schedules: Megatron-LM's interleaved schedule needs a multiple of pp.
    if s == "interleaved_1f1b":
        return m % pp == 0
    if s == "zero_bubble":
        return m % max(1, m // pp) == 0
    return True


def brute_force(graph: ModelGraph, hw: HardwareSpec, train: TrainSpec, backend,
                constraints: Constraints | None = None):
    """(best step time, knobs, stages, number of points scored) over every fitting point."""
    c = constraints or Constraints()
    pins = c.pins()
    n, batch = hw.num_devices, train.global_batch_size
    cap = hw.device.memory_bytes * (1 - c.memory_headroom_fraction)
    ends = sorted({cp.after_block for cp in graph.cut_points if cp.after_block < graph.num_blocks - 1})
    ends.append(graph.num_blocks - 1)
    if "recompute" in pins:
        modes = [pins["recompute"]]
    else:
        modes = ["none", "selective", "full"] if train.allow_checkpointing else ["none"]
    divs = [cd.divisor for lt in graph.layer_types.values() for cd in lt.tp_candidates]
    best = (float("inf"), None, None)
    count = 0
    for tp, pp in product(_divisors(n), _divisors(n)):
        if n % (tp * pp):
            continue
        dp = n // (tp * pp)
        if any(k in pins and pins[k] != val for k, val in (("pp", pp), ("dp", dp), ("tp", tp))):
            continue
        if (c.max_tp and tp > c.max_tp) or (c.max_pp and pp > c.max_pp):
            continue
        if tp > 1 and (hw.devices_per_node % tp and not c.tp_across_nodes or any(d % tp for d in divs)):
            continue
        if batch % dp or pp > len(ends):
            continue
        if pp > 1 and tp > 1 and (graph.pipeline_split or graph.traced_by) == "export":
            continue  # the export split's stages hold no nn.Linear for tensor parallelism
        shardings = [("none", None)]
        if dp > 1:
            shardings += [("zero1", None), ("zero2", None), ("zero3", None)]
            shardings += [("hsdp", s) for s in _divisors(dp) if 1 < s < dp]
        elif pins.get("sharding") in ("zero1", "zero2", "zero3"):
            shardings = [(pins["sharding"], None)]  # a pin is honoured at dp = 1 too (a no-op sharding)
        offloads = ["none", "cpu"] if train.allow_offload else ["none"]
        if train.precision == "fp16" and pp > 1:
            continue  # the runtime has no fp16 loss scaling inside a pipeline
        if tp > 1 and any(st == "conv_out" for lt in graph.layer_types.values() for cd in lt.tp_candidates
                          for st in cd.modules.values()):
            continue  # the runtime cannot split convolutions yet
        for (sh, hs), off in product(shardings, offloads):
            if pins.get("sharding", sh) != sh or pins.get("offload", off) != off:
                continue
            if sh == "zero1" and dp > 1 and (tp > 1 or pp > 1):
                continue  # ZeroRedundancyOptimizer composes only with plain DDP in the runtime
            if off == "cpu" and sh in ("none", "zero1"):
                continue  # the runtime offloads through FSDP2 only
            for mb in _divisors(batch // dp):
                if mb < graph.min_micro_batch_size:
                    continue  # BatchNorm cannot train on one value per channel
                m = batch // dp // mb
                if m > 1 and pp == 1 and not train.allow_grad_accumulation:
                    continue
                if pins.get("micro_batch_size", mb) != mb or pins.get("num_micro_batches", m) != m:
                    continue
                unsplit = any(lt.unsplit_attention for lt in graph.layer_types.values()) or any(
                    op.param_bytes > 0 and op.tp_split == "replicate" and op.kind != "embedding"
                    for lt in graph.layer_types.values() for op in lt.ops)
                for sp in ([False, True] if tp > 1 and not unsplit else [False]):
                    if pins.get("sequence_parallel", sp) != sp:
                        continue
                    if pp == 1:
                        scheds = [(pins.get("schedule", "1f1b"), 1)]
                    else:
                        scheds = [("gpipe", 1), ("1f1b", 1), ("zero_bubble", 1)]
                        scheds += [("interleaved_1f1b", v) for v in range(2, 9) if pp * v <= len(ends)]
                    for s, v in scheds:
                        if pp > 1 and not _ok_schedule(s, pp, m):
                            continue
                        if s == "zero_bubble" and pp > 1 and dp > 1 and sh in ("zero3", "hsdp"):
                            continue  # FSDP2 resharding breaks the split backward: the runtime refuses it
                        if pins.get("schedule", s) != s or pins.get("virtual_stages", v) != v:
                            continue
                        num = pp * v
                        for cut in combinations(range(len(ends) - 1), num - 1):
                            bounds = [ends[i] for i in cut] + [ends[-1]]
                            ranges, first = [], 0
                            for b in bounds:
                                ranges.append((first, b))
                                first = b + 1
                            for ms in product(modes, repeat=num):
                                stages = [(a, b, mm) for (a, b), mm in zip(ranges, ms, strict=True)]
                                rec = ms[0] if len(set(ms)) == 1 else "mixed"
                                k = Knobs(pp=pp, dp=dp, tp=tp, sharding=sh, hsdp_shard_size=hs, offload=off,
                                          micro_batch_size=mb, num_micro_batches=m, schedule=s,
                                          virtual_stages=v, recompute=rec, sequence_parallel=sp)
                                est = backend.score(k, stages)
                                count += 1
                                if est.fits and est.peak_memory_bytes <= cap and est.step_time_s < best[0]:
                                    best = (est.step_time_s, k, stages)
    return (*best, count)
