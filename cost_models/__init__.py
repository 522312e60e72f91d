"""autoplan cost models: pure estimators of step time and memory for a Plan.

`CostModel(graph, hw, train)` (cost_models.model) is the cost model of one model, machine and
training setup: `.estimate(knobs, stages)`, `.lower_bound(knobs, stages)`, `.block_costs(...)`,
`.estimate_plan(plan)`; it owns every memo (none at module level). Frozen breakdowns out; no
torch.distributed, no device queries. The functions below make a CostModel per call:

- `estimate_step(graph, plan, hw, train) -> StepEstimate` — full estimate of one Plan.
  `StepEstimate.to_prediction() -> specs.Prediction` for storing in the Plan.
- `estimate_knobs(graph, knobs, stages, hw, train) -> StepEstimate` — the same without building a
  pydantic Plan. `stages`: list of (first, last, recompute) tuples.
- `step_lower_bound_knobs(graph, knobs, stages, hw, train) -> float` — a lower bound on
  `estimate_knobs(...).step_time_s` without the schedule simulation (the search prunes by it).
- `block_costs(graph, hw, train, *, tp, sequence_parallel, micro_batch_size, recompute)`
  -> per-block times and memory (cached per layer type), for the planner's stage partition DP.
- `estimate_data_parallel_single_process(graph, hw, train, num_devices) -> StepEstimate` —
  single-process nn.DataParallel, so the explainer can say why DDP wins.
- `build_schedule(name, pp, num_micro_batches, virtual_stages)` -> per-rank action lists;
  `simulate(schedule, stage_times) -> ScheduleResult` (step time, bubble, peak in-flight
  micro-batches per rank, timeline).

Conventions: virtual stage j runs on pp rank j % pp (loop style); `zero_bubble` is ZB-H1
(Qi et al. 2023) with one stage per rank; `interleaved_1f1b` needs a multiple of pp
micro-batches. Memory follows PyTorch-native mixed precision (fp32 parameters are the master
weights, bf16 compute copies are transients; cost_models.memory), the engines the runtime uses.

Modules, by concept, bottom up: efficiency (default curves, sources) -> compute (roofline) ->
comm (alpha-beta collectives, topology) -> memory (bytes by category) -> engines (which
data-parallel engine a plan runs) -> blocks (per-block terms) -> stages (per-stage terms,
layouts) -> ranks (per-rank terms) -> schedules (action lists) -> simulator (event
simulation; kernels/jit: its one compiled form) -> estimate (one step, term by term) ->
model (CostModel: the object and its memos); sharedhost/sharedsim (processes sharing cores),
dataparallel (single-process nn.DataParallel).
"""

from cost_models.blocks import BlockCost, BlockCosts, block_costs
from cost_models.comm import GroupLink, group_link
from cost_models.dataparallel import estimate_data_parallel_single_process
from cost_models.estimate import (
    AxisCommEstimate,
    StepEstimate,
    estimate_knobs,
    estimate_step,
    step_lower_bound_knobs,
)
from cost_models.model import CostModel
from cost_models.schedules import Action, Schedule, build_schedule
from cost_models.simulator import ScheduleResult, simulate

__all__ = [
    "Action", "AxisCommEstimate", "BlockCost", "BlockCosts", "CostModel", "GroupLink", "Schedule", "ScheduleResult",
    "StepEstimate", "block_costs", "build_schedule", "estimate_data_parallel_single_process",
    "estimate_knobs", "estimate_step", "group_link",
    "simulate", "step_lower_bound_knobs",
]
