"""Processes that share a host's cores dynamically (more processes than cores, e.g. 4 gloo
processes on a 2-core machine): the step time.

A shared-host preset (`HardwareSpec.preset("cpu", devices=N)`) sets `hw.shared_cores = C` and
gives each process its fair share of the host, per-core figures x min(1, C / N) (a static
division). When N > C that over-charges whatever is not perfectly balanced: the OS scheduler
hands an idle process's core (a pipeline rank in its bubble, a rank waiting on a receive) to
the busy ones. The model instead:

1. `unshared(hw)`: the same machine with per-core speeds (FLOP/s, memory bandwidth and the host
   optimizer rate x N / C) and no sharing. The critical path T_crit is the estimate (schedule
   simulation included) on it: no process runs faster than a core to itself.
2. CPU work: every process's busy compute (forward, backward, recompute, optimizer step, host
   offload step), summed over all N processes: W. With every core busy, the cores run slower
   than one alone (they share caches and the memory system), so W is timed on `contended(hw)`:
   per-core FLOP/s x e_c and memory bandwidth (and the memory-bound host optimizer rate) x e_m,
   where e_c = hw.shared_core_efficiency and e_m = hw.shared_memory_efficiency are the measured
   aggregate throughputs of N processes busy at once over C x one process alone (`autoplan
   calibrate`: concurrent cold matmuls, concurrent cold copies; 1 where not measured). Each op
   is slowed by the resource its roofline is bound by. The C cores cannot do W faster than W / C.
3. Lockstep communication X: time in which every process waits on communication at once, so
   no core can be lent: with one pipeline stage (pp = 1) every rank runs the same program, so
   all communication on its critical path is lockstep; with pp > 1 only the data-parallel
   sync after the pipeline that all ranks share (the smallest over pp ranks) is counted, and
   in-pipeline communication is assumed to lend its core to other stages.

    step_s = max(T_crit, W / C + X + S d)          (pp = 1)

   With pp > 1 the ranks are not busy at once: the schedule is played with the cores shared
   among the runnable ranks (cost_models.sharedsim, processor sharing: C / (dp x tp) cores per
   pipeline, the contended stage times without their tensor-parallel collectives as work, each
   rank's optimizer step and once-per-step copies as tail work), T_ps, and

    step_s = max(T_crit, T_ps + X + m x TP comm of the busiest rank + S d)   (pp > 1)

4. Synchronisation: when a process blocks on communication with a peer that the scheduler has
   descheduled (N > C), it waits until the peer gets a core again; `autoplan calibrate` measures
   the average extra wait per blocking collective, d = hw.shared_sync_penalty_s (all processes
   alternating a compute chunk with a small all-reduce, minus the two run apart). S counts the
   blocking communication points of the busiest rank in one step (`sync_points`): tensor-parallel
   collectives, pipeline receives, FSDP all-gathers and reduce-scatters, DDP buckets.

With pp = 1 and every op above the launch floor this is the static division again (all
processes busy in lockstep); with pipeline bubbles it is smaller (an idle rank lends its core). GPUs (shared_cores None) and
hosts with at least as many cores as processes are unaffected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from specs import HardwareSpec, Knobs, LayerType, ModelGraph


def oversubscribed(hw: HardwareSpec) -> bool:
    """More processes per node than the cores they share."""
    return hw.shared_cores is not None and hw.devices_per_node > hw.shared_cores


def unshared(hw: HardwareSpec) -> HardwareSpec:
    """`hw` with per-core speeds (device figures x devices_per_node / shared_cores), unshared
    (a CostModel makes it once: CostModel.unshared)."""
    assert hw.shared_cores is not None, "unshared: the hardware shares no cores"
    per_core = hw.devices_per_node / hw.shared_cores  # one core's speed over one process's share
    dev = hw.device.model_copy(update={
        "peak_flops_per_s": {k: v * per_core for k, v in hw.device.peak_flops_per_s.items()},
        "memory_bandwidth_bytes_per_s": hw.device.memory_bandwidth_bytes_per_s * per_core,
    })
    host = hw.host.model_copy(update={"cpu_adam_params_per_s": hw.host.cpu_adam_params_per_s * per_core})
    return hw.model_copy(update={"device": dev, "host": host, "shared_cores": None})


def contended(hw: HardwareSpec) -> HardwareSpec:
    """`unshared(hw)` with every core busy: FLOP/s x shared_core_efficiency, memory bandwidth and
    the host optimizer rate x shared_memory_efficiency (CostModel.contended)."""
    u = unshared(hw)
    e_c, e_m = hw.shared_core_efficiency, hw.shared_memory_efficiency
    dev = u.device.model_copy(update={
        "peak_flops_per_s": {k: v * e_c for k, v in u.device.peak_flops_per_s.items()},
        "memory_bandwidth_bytes_per_s": u.device.memory_bandwidth_bytes_per_s * e_m,
    })
    host = u.host.model_copy(update={"cpu_adam_params_per_s": u.host.cpu_adam_params_per_s * e_m})
    return u.model_copy(update={"device": dev, "host": host})


def shared_step_s(critical_s: float, total_work_s: float, cores: float, lockstep_s: float) -> float:
    """step = max(T_crit, W / cores + X), W timed on `contended(hw)` (see the module docstring)."""
    return max(critical_s, total_work_s / cores + lockstep_s)


def _tp_sites(lt: LayerType) -> tuple[int, int]:
    """(forward, backward) tensor-parallel collective sites of a layer type (as cost_models.blocks
    charges them: row-parallel outputs and vocab embedding in forward; column inputs (one per
    row-parallel pair) and the vocab head in backward)."""
    if not lt.tp_candidates:
        return 0, 0
    n_row = sum(1 for op in lt.ops if op.tp_split == "row")
    n_vemb = sum(1 for op in lt.ops if op.tp_split == "vocab" and op.kind == "embedding")
    n_vhead = sum(1 for op in lt.ops if op.tp_split == "vocab" and op.kind != "embedding")
    return n_row + n_vemb, n_row + n_vhead


def sync_points(graph: ModelGraph, k: Knobs, stages: Sequence[tuple[int, int, str]]) -> int:
    """Blocking communication points of the busiest pipeline rank in one step (see the module
    docstring, item 4), for `stages` = (first, last, recompute) per virtual stage (stage j on
    rank j % pp).

    Per micro-batch: tp collectives of its blocks (x2 with sequence parallelism: all-gather +
    reduce-scatter per site; forward sites again under full recompute); one pipeline receive per
    stage in forward (not the first) and in backward (not the last); FSDP (zero2/zero3/hsdp, one
    unit per block): an all-gather per block in forward, again in backward unless zero2, and a
    reduce-scatter. Per step: DDP's bucketed all-reduce (none/zero1: gradient bytes / 25 MiB
    buckets, fp32 gradients)."""
    from cost_models.memory import DDP_BUCKET_BYTES

    m, pp, S = k.num_micro_batches, k.pp, len(stages)
    per_rank = [0] * pp
    params = [0.0] * pp
    for j, (first, last, rec) in enumerate(stages):
        r = j % pp
        n = 0
        for b in range(first, last + 1):
            lt = graph.layer(b)
            params[r] += lt.num_params
            if k.tp > 1:
                f, bw = _tp_sites(lt)
                f *= 2 if k.sequence_parallel else 1
                bw *= 2 if k.sequence_parallel else 1
                n += f + bw + (f if rec == "full" else 0)
            if k.dp > 1 and k.sharding in ("zero2", "zero3", "hsdp"):
                n += 2 if k.sharding == "zero2" else 3
        n += (j > 0) + (j < S - 1)
        per_rank[r] += m * n
    if k.dp > 1 and k.sharding in ("none", "zero1"):
        for r in range(pp):
            per_rank[r] += math.ceil(4.0 * params[r] / k.tp / DDP_BUCKET_BYTES)
    return max(per_rank)
