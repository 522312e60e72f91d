"""Plan: the declarative parallel plan (DESIGN.md "What a Plan can say"), its prediction and the
search's records. Plain data: round-trips JSON/YAML exactly, prints as one line, validates itself.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, model_validator

from specs._base import Frozen, SpecError, validate_model
from specs.hardware import HardwareSpec
from specs.io import dump_data, load_data
from specs.train import Offload, Recompute, Schedule, Sharding, TrainSpec

PLAN_VERSION = 1
TPStyle = Literal["colwise", "rowwise", "vocab", "conv_out", "replicate", "sequence", "head_norm"]


def check_expert_parallel(ep: int, dp: int, sharding: str) -> None:
    """Raise ValueError when expert parallelism of degree `ep` cannot run with this data
    parallelism (the runtime's rules, runtime/expert_parallel.py): ep borrows dp ranks, so it
    divides dp; ZeRO-1 (ZeroRedundancyOptimizer over DDP) cannot hold the experts' DTensor shards,
    and HSDP's two-level data-parallel mesh is not split for experts here."""
    if dp % ep:
        raise ValueError(
            f"mesh.ep: ep({ep}) must divide dp({dp}): expert-parallel groups are made of data-parallel "
            f"ranks; pick ep among the divisors of dp"
        )
    why = {
        "zero1": "ZeroRedundancyOptimizer over DDP cannot hold the experts' DTensor shards",
        "hsdp": "HSDP's two-level data-parallel mesh is not split for experts",
    }.get(sharding)
    if why:
        raise ValueError(
            f"mesh.ep: expert parallelism (ep={ep}) does not run with sharding {sharding} ({why}); "
            f"use sharding none, zero2 or zero3"
        )


class ModelRef(Frozen):
    name: str = Field(description="Model name as traced (bundled name or package.module:factory).")
    fingerprint: str = Field(description="ModelGraph fingerprint; the runtime refuses a different model.")
    num_blocks: int = Field(gt=0, description="Blocks in the traced graph; stages must cover them.")
    num_params: int = Field(default=0, ge=0)
    block_names: list[str] = Field(default_factory=list, description="Module path of each block, in order.")


class Mesh(Frozen):
    pp: int = Field(default=1, gt=0, description="Pipeline-parallel degree (outermost axis).")
    dp: int = Field(default=1, gt=0, description="Data-parallel degree.")
    tp: int = Field(default=1, gt=0, description="Tensor-parallel degree (innermost axis, inside a node).")
    ep: int = Field(
        default=1, gt=0,
        description="Expert-parallel degree: each mixture-of-experts layer's experts are sharded over ep of "
        "the dp ranks (consecutive ones), tokens reach them by all-to-all; divides dp and num_experts. "
        "Not a separate axis: ep borrows data-parallel ranks (world = pp * dp * tp).",
    )

    cp: int = Field(
        default=1, gt=0,
        description="Context-parallel degree: each sample's tokens are split over cp ranks (attention's keys "
        "and values gathered among them); between dp and tp in the mesh (world = pp * dp * cp * tp).",
    )

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp


class DataParallel(Frozen):
    sharding: Sharding = Field(default="none", description="none=DDP, zero1/zero2/zero3 (FSDP), hsdp.")
    hsdp_shard_size: int | None = Field(
        default=None, gt=0, description="HSDP: ranks that shard (inner dp group); replicas = dp / this."
    )
    offload: Offload = Field(default="none", description="Optimizer states (and master weights) on the host.")


class TensorParallel(Frozen):
    sequence_parallel: bool = Field(default=False, description="Split norms/dropout along the sequence.")
    loss_parallel: bool = Field(default=False, description="Compute the loss on vocab-sharded logits.")
    styles: dict[str, TPStyle] = Field(
        default_factory=dict,
        description="Module path pattern (fnmatch, '*' for a layer index) -> parallel style.",
    )


class Stage(Frozen):
    first: int = Field(ge=0, description="Index of the stage's first block.")
    last: int = Field(ge=0, description="Index of its last block (inclusive).")
    recompute: Recompute = Field(default="none", description="Activation checkpointing of its blocks.")

    @model_validator(mode="after")
    def _order(self) -> Stage:
        if self.last < self.first:
            raise ValueError(f"stage: last block {self.last} comes before first block {self.first}")
        return self

    @property
    def num_blocks(self) -> int:
        return self.last - self.first + 1


class Pipeline(Frozen):
    schedule: Schedule = Field(default="1f1b", description="gpipe, 1f1b, interleaved_1f1b, zero_bubble.")
    virtual_stages: int = Field(default=1, gt=0, description="Model chunks per pp rank (interleaving).")
    micro_batch_size: int = Field(default=1, gt=0, description="Samples per micro-batch.")
    num_micro_batches: int = Field(
        default=1, gt=0, description="Micro-batches per step per replica (pipeline depth / grad accumulation)."
    )
    stages: list[Stage] = Field(description="Stages in order; pp * virtual_stages of them.")


class AxisComm(Frozen):
    volume_bytes: float = Field(ge=0, description="Bytes sent per device per step on this axis.")
    time_s: float = Field(ge=0, description="Communication time per step on this axis.")
    exposed_s: float = Field(ge=0, description="Part not hidden behind compute.")


class StageTimes(Frozen):
    forward_s: float = Field(ge=0, description="Forward of one micro-batch on this (virtual) stage.")
    backward_s: float = Field(ge=0, description="Backward (input grads, or all grads if not split).")
    weight_s: float = Field(default=0, ge=0, description="Weight-gradient part (zero-bubble schedules).")
    p2p_s: float = Field(default=0, ge=0, description="Send of one micro-batch's boundary activation.")


class Prediction(Frozen):
    step_time_s: float = Field(ge=0)
    samples_per_s: float = Field(ge=0)
    tokens_per_s: float = Field(ge=0)
    mfu: float = Field(ge=0, description="Model FLOPs utilisation (6ND-style model FLOPs / peak).")
    hfu: float = Field(ge=0, description="Hardware FLOPs utilisation (includes recompute).")
    model_flops_per_step: float = Field(ge=0)
    time_breakdown_s: dict[str, float] = Field(description="Step time, term by term (sums to step time).")
    memory_bytes: dict[str, float] = Field(description="Worst rank's peak memory by category.")
    peak_memory_bytes: float = Field(ge=0)
    memory_capacity_bytes: float = Field(ge=0)
    worst_rank_stage: int = Field(default=0, ge=0, description="pp rank with the peak memory.")
    memory_per_stage_bytes: list[float] = Field(default_factory=list, description="Peak per pp rank.")
    comm: dict[str, AxisComm] = Field(default_factory=dict, description="Per mesh axis (pp, dp, tp).")
    bubble_fraction: float = Field(default=0, ge=0, le=1)
    stage_times: list[StageTimes] = Field(default_factory=list, description="Per virtual stage.")
    fits: bool = True
    notes: list[str] = Field(default_factory=list)


class Knobs(Frozen):
    """The flat knob set of a plan; Alternatives and Constraints speak in these."""

    pp: int
    dp: int
    tp: int
    sharding: Sharding = "none"
    hsdp_shard_size: int | None = None
    offload: Offload = "none"
    micro_batch_size: int = 1
    num_micro_batches: int = 1
    schedule: Schedule = "1f1b"
    virtual_stages: int = 1
    recompute: Recompute | Literal["mixed"] = "none"
    sequence_parallel: bool = False
    ep: int = 1
    cp: int = 1

    def __str__(self) -> str:
        zero = {"none": "0", "zero1": "1", "zero2": "2", "zero3": "3", "hsdp": "hsdp"}[self.sharding]
        if self.sharding == "hsdp" and self.hsdp_shard_size:
            zero = f"hsdp({self.hsdp_shard_size})"
        sched: str = self.schedule
        if self.virtual_stages > 1:
            sched = f"{sched}(v={self.virtual_stages})"
        parts = [f"dp={self.dp}", f"tp={self.tp}", f"pp={self.pp}", f"zero={zero}"]
        if self.ep > 1:
            parts.insert(3, f"ep={self.ep}")
        if self.cp > 1:
            parts.insert(3, f"cp={self.cp}")
        parts.append(f"mb={self.micro_batch_size}x{self.num_micro_batches}")
        if self.pp > 1:
            parts.append(f"sched={sched}")
        parts.append(f"ckpt={self.recompute}")
        if self.sequence_parallel:
            parts.append("sp")
        if self.offload != "none":
            parts.append(f"offload={self.offload}")
        return " ".join(parts)


class Alternative(Frozen):
    knobs: Knobs
    step_time_s: float = Field(ge=0)
    samples_per_s: float = Field(ge=0)
    peak_memory_bytes: float = Field(ge=0)
    fits: bool = True
    note: str = Field(default="", description="Why it lost, in words.")


class Rejection(Frozen):
    region: str = Field(description="The pruned part of the space, e.g. 'tp=16'.")
    reason: str = Field(description="Why, with numbers.")
    count: int = Field(default=1, ge=0, description="Candidates it covered.")


class SearchStats(Frozen):
    candidates_scored: int = Field(ge=0)
    candidates_pruned: int = Field(ge=0)
    search_time_s: float = Field(ge=0)
    trace_time_s: float = Field(default=0, ge=0)


class Plan(Frozen):
    version: int = Field(default=PLAN_VERSION, description="Plan file format version.")
    model: ModelRef
    hardware: HardwareSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    mesh: Mesh
    data_parallel: DataParallel = Field(default_factory=DataParallel)
    tensor_parallel: TensorParallel = Field(default_factory=TensorParallel)
    pipeline: Pipeline
    predicted: Prediction | None = None
    alternatives: list[Alternative] = Field(default_factory=list)
    rejected: list[Rejection] = Field(default_factory=list)
    search: SearchStats | None = None

    @model_validator(mode="after")
    def _validate(self) -> Plan:
        if self.version != PLAN_VERSION:
            raise ValueError(
                f"version: this plan file is format version {self.version}, this autoplan reads "
                f"version {PLAN_VERSION}; re-plan with this version"
            )
        m, hw = self.mesh, self.hardware
        if m.world_size != hw.num_devices:
            cp = f" * cp({m.cp})" if m.cp > 1 else ""
            raise ValueError(
                f"mesh: tp({m.tp}) * pp({m.pp}) * dp({m.dp}){cp} = {m.world_size}, but the hardware has "
                f"{hw.num_devices} devices ({hw.num_nodes} nodes x {hw.devices_per_node})"
            )
        if m.cp > 1 and m.ep > 1:
            raise ValueError(
                f"mesh: context parallelism (cp={m.cp}) with expert parallelism (ep={m.ep}) is not "
                f"supported; plan with one of them"
            )
        p = self.pipeline
        if p.virtual_stages > 1 and p.schedule not in ("interleaved_1f1b", "zero_bubble"):
            raise ValueError(
                f"pipeline.virtual_stages: {p.virtual_stages} needs schedule interleaved_1f1b or "
                f"zero_bubble (got {p.schedule})"
            )
        want = m.pp * p.virtual_stages
        if len(p.stages) != want:
            raise ValueError(
                f"pipeline.stages: pp({m.pp}) * virtual_stages({p.virtual_stages}) = {want} stages "
                f"expected, got {len(p.stages)}"
            )
        nxt = 0
        for i, s in enumerate(p.stages):
            if s.first != nxt:
                what = "skips" if s.first > nxt else "repeats"
                raise ValueError(
                    f"pipeline.stages.{i}: starts at block {s.first} but block {nxt} is next; stages "
                    f"must cover blocks 0..{self.model.num_blocks - 1} once, in order (this {what} blocks)"
                )
            nxt = s.last + 1
        if nxt != self.model.num_blocks:
            raise ValueError(
                f"pipeline.stages: cover blocks 0..{nxt - 1}, but the model has {self.model.num_blocks} "
                f"blocks (0..{self.model.num_blocks - 1})"
            )
        batch = p.micro_batch_size * p.num_micro_batches * m.dp
        if batch != self.train.global_batch_size:
            raise ValueError(
                f"pipeline: micro_batch_size({p.micro_batch_size}) * num_micro_batches"
                f"({p.num_micro_batches}) * dp({m.dp}) = {batch}, but train.global_batch_size is "
                f"{self.train.global_batch_size}"
            )
        if self.tensor_parallel.sequence_parallel and m.tp == 1:
            raise ValueError("tensor_parallel.sequence_parallel: needs tp > 1 (mesh.tp is 1)")
        dpc = self.data_parallel
        if dpc.sharding == "hsdp":
            size = dpc.hsdp_shard_size
            if size is None or m.dp % size or size == 1:
                raise ValueError(
                    f"data_parallel.hsdp_shard_size: hsdp needs a shard-group size > 1 that divides "
                    f"dp({m.dp}) (got {size})"
                )
        elif dpc.hsdp_shard_size is not None:
            raise ValueError("data_parallel.hsdp_shard_size: only meaningful with sharding: hsdp")
        if m.ep > 1:
            check_expert_parallel(m.ep, m.dp, dpc.sharding)
            if dpc.offload != "none":
                raise ValueError(
                    f"data_parallel.offload: cpu offload with expert parallelism (ep={m.ep}) is not supported "
                    f"(the experts' own FSDP2 group keeps its states on the device); use offload none"
                )
        if self.model.block_names and len(self.model.block_names) != self.model.num_blocks:
            raise ValueError(
                f"model.block_names: {len(self.model.block_names)} names for {self.model.num_blocks} blocks"
            )
        return self

    # ------------------------------------------------------------------ views
    def knobs(self) -> Knobs:
        modes = {s.recompute for s in self.pipeline.stages}
        return Knobs(
            pp=self.mesh.pp, dp=self.mesh.dp, tp=self.mesh.tp,
            sharding=self.data_parallel.sharding, hsdp_shard_size=self.data_parallel.hsdp_shard_size,
            offload=self.data_parallel.offload,
            micro_batch_size=self.pipeline.micro_batch_size,
            num_micro_batches=self.pipeline.num_micro_batches,
            schedule=self.pipeline.schedule, virtual_stages=self.pipeline.virtual_stages,
            recompute=modes.pop() if len(modes) == 1 else "mixed",
            sequence_parallel=self.tensor_parallel.sequence_parallel, ep=self.mesh.ep, cp=self.mesh.cp,
        )

    def __str__(self) -> str:
        return str(self.knobs())

    def summary(self) -> str:
        line = str(self)
        if self.predicted:
            pr = self.predicted
            line += f"  | {pr.step_time_s:.3g} s/step, MFU {pr.mfu:.1%}, {pr.peak_memory_bytes / 2**30:.1f} GiB peak"
        return line

    # ------------------------------------------------------------------ IO
    def to_file(self, path: str | os.PathLike[str]) -> None:
        dump_data(self.model_dump(mode="json"), path)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Plan:
        data = load_data(path)
        if not isinstance(data, dict):
            raise SpecError(f"{path}: a plan file must be a mapping (got {type(data).__name__}); is it corrupted?")
        if "version" in data and data["version"] != PLAN_VERSION:
            raise SpecError(
                f"{path}: plan format version {data['version']!r}; this autoplan reads version "
                f"{PLAN_VERSION}. Re-create the plan with `autoplan plan`."
            )
        return validate_model(cls, data, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "plan") -> Plan:
        return validate_model(cls, data, source)
