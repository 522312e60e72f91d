"""autoplan cost models: pure estimators of step time and memory for a Plan.

Pure functions of (ModelGraph, Plan or knobs, HardwareSpec, TrainSpec) returning frozen
breakdowns. No torch.distributed, no device queries. Contract used by the planner and explainer:

- `estimate_step(graph, plan, hw, train) -> StepEstimate` — full estimate of one Plan.
  `StepEstimate.to_prediction() -> specs.Prediction` for storing in the Plan.
- `estimate_knobs(graph, knobs, stages, hw, train) -> StepEstimate` — the same without building a
  pydantic Plan (the search's fast path). `stages`: list of (first, last, recompute) tuples.
- `step_lower_bound_knobs(graph, knobs, stages, hw, train) -> float` — a lower bound on
  `estimate_knobs(...).step_time_s` without the schedule simulation (the search prunes by it).
- `block_costs(graph, hw, train, *, tp, sequence_parallel, micro_batch_size, recompute)`
  -> per-block times and memory (cached per layer type), for the planner's stage partition DP.
- `estimate_data_parallel_single_process(graph, hw, train, num_devices) -> StepEstimate` —
  single-process nn.DataParallel, so the explainer can say why DDP wins.
- `clear_caches()` — forget the memos (values unchanged; the next estimates start cold).
- `build_schedule(name, pp, num_micro_batches, virtual_stages)` -> per-rank action lists;
  `simulate(schedule, stage_times) -> ScheduleResult` (step time, bubble, peak in-flight
  micro-batches per rank, timeline).

Conventions: virtual stage j runs on pp rank j % pp (loop style); `zero_bubble` is ZB-H1
(Qi et al. 2023) with one stage per rank; `interleaved_1f1b` needs a multiple of pp
micro-batches. Memory follows PyTorch-native mixed precision (fp32 parameters are the master
weights, bf16 compute copies are transients; cost_models.memory), the engines the runtime uses.

Modules, in pipeline order: efficiency (default curves, sources) -> compute (roofline) ->
comm (alpha-beta collectives, topology) -> memory (bytes by category) -> blocks (per-block
costs, cached per layer type) -> schedules (action lists) -> simulator (event simulation) ->
estimate (one step, term by term) -> dataparallel (single-process nn.DataParallel).
"""

from cost_models.blocks import BlockCost, BlockCosts, block_costs
from cost_models.caches import clear_caches
from cost_models.comm import GroupLink, group_link
from cost_models.dataparallel import estimate_data_parallel_single_process
from cost_models.estimate import (
    AxisCommEstimate,
    StepEstimate,
    estimate_knobs,
    estimate_step,
    step_lower_bound_knobs,
)
from cost_models.schedules import Action, Schedule, build_schedule
from cost_models.simulator import ScheduleResult, simulate

__all__ = [
    "Action", "AxisCommEstimate", "BlockCost", "BlockCosts", "GroupLink", "Schedule", "ScheduleResult",
    "StepEstimate", "block_costs", "build_schedule", "clear_caches", "estimate_data_parallel_single_process",
    "estimate_knobs", "estimate_step", "group_link",
    "simulate", "step_lower_bound_knobs",
]
