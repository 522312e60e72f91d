"""autoplan cost models: pure estimators of step time and memory for a Plan.

Pure functions of (ModelGraph, Plan or knobs, HardwareSpec, TrainSpec) returning frozen
breakdowns. No torch.distributed, no device queries. Contract used by the planner and explainer:

- `estimate_step(graph, plan, hw, train) -> StepEstimate` — full estimate of one Plan.
  `StepEstimate.to_prediction() -> specs.Prediction` for storing in the Plan.
- `estimate_knobs(graph, knobs, stages, hw, train) -> StepEstimate` — the same without building a
  pydantic Plan (the search's fast path). `stages`: list of (first, last, recompute) tuples.
- `block_costs(graph, hw, train, *, tp, sequence_parallel, micro_batch_size, recompute)`
  -> per-block times and memory (cached per layer type), for the planner's stage partition DP.
- `estimate_data_parallel_single_process(graph, hw, train, num_devices) -> StepEstimate` —
  single-process nn.DataParallel, so the explainer can say why DDP wins.
- `build_schedule(name, pp, num_micro_batches, virtual_stages)` -> per-rank action lists;
  `simulate(schedule, stage_times) -> ScheduleResult` (step time, bubble, peak in-flight
  micro-batches per rank, timeline).
"""

from cost_models.blocks import BlockCost, BlockCosts, block_costs
from cost_models.comm import GroupLink, group_link
from cost_models.dataparallel import estimate_data_parallel_single_process
from cost_models.estimate import AxisCommEstimate, StepEstimate, estimate_knobs, estimate_step
from cost_models.schedules import Action, Schedule, build_schedule
from cost_models.simulator import ScheduleResult, simulate

__all__ = [
    "Action", "AxisCommEstimate", "BlockCost", "BlockCosts", "GroupLink", "Schedule", "ScheduleResult",
    "StepEstimate", "block_costs", "build_schedule", "estimate_data_parallel_single_process", "estimate_knobs", "estimate_step", "group_link",
    "simulate",
]
