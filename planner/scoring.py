"""The planner's view of the cost models: per-block profiles for the partition DP, and scoring.

The search needs two things from `cost_models`:
- `profile(tp, sp, mb, recompute) -> BlockProfile`: per-block busy time of one micro-batch and
  per-block bytes (parameters, gradients, optimizer states, activations per in-flight
  micro-batch), taken from `cost_models.block_costs` and cached per knob tuple;
- `score(knobs, stages) -> StepEstimate`: `cost_models.CostModel.estimate`, the model's verdict.
Optional, where the backend can promise them (the search falls back to weaker bounds):
- `lower_bound(knobs, stages) -> float` <= score(...).step_time_s, cheaper (no simulation);
- `simulated_pipeline = True`: the pipeline time is an event simulation of the schedule, so the
  warm-up/drain bound of `cost_models.simulator.pipeline_lower_bound` holds for its stage times.
`CostModelBackend` wraps the real cost models; tests may pass another object with the same
methods (a stand-in with closed-form costs) to check the search logic on its own.

Also here: which micro-batches a (virtual) stage holds at its peak for each schedule, used only to
steer the partition (the cost model's own simulator gives the memory the plan is judged by).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from specs import HardwareSpec, Knobs, ModelGraph, TrainSpec


@dataclass(frozen=True, slots=True)
class BlockProfile:
    """Per-block costs for one (tp, sequence_parallel, micro_batch_size, recompute) setting.

    time_s: busy time of one micro-batch through the block on its device (forward + backward
    + weight gradients + recompute, compute and critical-path tp communication), the quantity the
    pipeline's slowest stage multiplies by the number of micro-batches. Bytes are per device
    (after tensor parallelism), before data-parallel sharding.
    """

    time_s: tuple[float, ...]
    param_bytes: tuple[float, ...]
    grad_bytes: tuple[float, ...]
    optimizer_bytes: tuple[float, ...]
    act_bytes: tuple[float, ...]  # activations kept per in-flight micro-batch
    forward_s: tuple[float, ...] | None = None  # the forward part of time_s (None: not known)


class Estimate(Protocol):
    step_time_s: float
    fits: bool
    peak_memory_bytes: float
    time_breakdown_s: dict[str, float]

    def to_prediction(self) -> Any: ...


class Backend(Protocol):
    def profile(self, tp: int, sp: bool, mb: int, recompute: str, ep: int = 1, cp: int = 1) -> BlockProfile: ...

    def score(self, knobs: Knobs, stages: list[tuple[int, int, str]]) -> Estimate: ...

    def data_parallel_single_process(self, num_devices: int) -> Estimate | None: ...

    def inflight(self, schedule: str, pp: int, num_micro_batches: int, virtual_stages: int) -> tuple[float, ...]: ...


def inflight_closed_form(schedule: str, pp: int, num_micro_batches: int, virtual_stages: int) -> tuple[float, ...]:
    """Micro-batches whose activations each virtual stage holds at its peak (stage j on rank j % pp).

    gpipe: all m forwards run before any backward -> m. 1F1B and ZB-H1: rank r holds pp - r
    (Narayanan et al. 2021, sec. 2.2; Qi et al. 2023 ZB-H1 keeps 1F1B's memory). Interleaved 1F1B
    (Megatron-LM's schedule): rank r runs (pp - r - 1) * 2 + (v - 1) * pp warm-up chunk forwards plus
    one, spread over its v chunks.
    """
    m, v = num_micro_batches, virtual_stages
    out = []
    for j in range(pp * v):
        r = j % pp
        if pp == 1:
            held = 1.0
        elif schedule == "gpipe":
            held = float(m)
        elif v == 1:
            held = float(min(pp - r, m))
        else:
            units = min(m * v, (pp - r - 1) * 2 + (v - 1) * pp + 1)
            held = float(-(-units // v))
        out.append(held)
    return tuple(out)


class CostModelBackend:
    """The real cost model (one cost_models.CostModel for the search: it keeps the memos)."""

    def __init__(self, graph: ModelGraph, hw: HardwareSpec, train: TrainSpec):
        import cost_models
        from cost_models import memory

        self._cm = cost_models
        self.model = cost_models.CostModel(graph, hw, train)
        self.graph, self.hw, self.train = graph, hw, train
        self._profiles: dict[tuple, BlockProfile] = {}
        self._bpp = memory.bytes_per_param(train.precision, train.optimizer)

    def profile(self, tp: int, sp: bool, mb: int, recompute: str, ep: int = 1, cp: int = 1) -> BlockProfile:
        key = (tp, sp, mb, recompute, ep, cp)
        got = self._profiles.get(key)
        if got is None:
            bc = self.model.block_costs(tp, sp, mb, recompute, ep, cp)
            got = profile_from_block_costs(bc, self._bpp)
            self._profiles[key] = got
        return got

    # The pipeline time is the cost model's event simulation, for which
    # cost_models.simulator.pipeline_lower_bound holds (warm-up and drain chains + busiest rank).
    simulated_pipeline = True

    def score(self, knobs: Knobs, stages: list[tuple[int, int, str]]) -> Estimate:
        return self.model.estimate(knobs, stages)

    def lower_bound(self, knobs: Knobs, stages: list[tuple[int, int, str]]) -> float:
        """A lower bound on score(knobs, stages).step_time_s, without the schedule simulation."""
        return self.model.lower_bound(knobs, stages)

    def data_parallel_single_process(self, num_devices: int) -> Estimate | None:
        return self._cm.estimate_data_parallel_single_process(self.graph, self.hw, self.train, num_devices)

    def inflight(self, schedule: str, pp: int, num_micro_batches: int, virtual_stages: int) -> tuple[float, ...]:
        return inflight_closed_form(schedule, pp, num_micro_batches, virtual_stages)

    def partition_budget_bytes(self, budget_bytes: float) -> float:
        """Bytes the partition DP may fill with model states and activations: the budget less the
        cost model's allocator margin (cost_models.memory.margin_bytes charges fragmentation on
        top of the tensors and a fixed runtime reserve)."""
        from cost_models import memory

        reserve = min(memory.RESERVE_MAX_BYTES, memory.RESERVE_FRACTION * self.hw.device.memory_bytes)
        return max(0.0, (budget_bytes - reserve) / (1 + memory.FRAGMENTATION_FRACTION))


def profile_from_block_costs(bc: Any, bpp: Any) -> BlockProfile:
    """cost_models.blocks.BlockCosts -> BlockProfile (bpp: cost_models.memory.BytesPerParam)."""
    blocks = bc.blocks
    return BlockProfile(
        time_s=tuple(b.total_s for b in blocks),
        param_bytes=tuple(b.num_params * bpp.param for b in blocks),
        grad_bytes=tuple(b.num_params * bpp.grad for b in blocks),
        optimizer_bytes=tuple(b.num_params * bpp.optimizer for b in blocks),
        act_bytes=tuple(b.activation_bytes for b in blocks),
        forward_s=tuple(b.forward_s for b in blocks),
    )
