"""TrainSpec (what is being trained and how) and Constraints (what the planner may choose)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from specs._base import Frozen, SaneRange

Precision = Literal["fp32", "bf16", "fp16"]
Optimizer = Literal["adamw", "adam", "sgd"]
Sharding = Literal["none", "zero1", "zero2", "zero3", "hsdp"]
Schedule = Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"]
Recompute = Literal["none", "selective", "full"]
Offload = Literal["none", "cpu"]


# The search tries every split of batch / dp into micro-batches and simulates each schedule per
# micro-batch, so its time grows with the batch: 2**20 samples plan in ~10-20 s (gpt-tiny on the
# cpu preset, the slowest case). The largest published global batches are ~64k samples (ImageNet
# with LARS; LLMs use 1k-16k sequences), so 2**20 leaves 16x.
MAX_GLOBAL_BATCH = 2**20
_BATCH = SaneRange(1, MAX_GLOBAL_BATCH, "samples per step",
                   "the search scores every split of it into micro-batches; real batches are <= ~64k")


class TrainSpec(Frozen):
    global_batch_size: int = Field(default=8, gt=0, description="Samples per optimizer step, over all replicas.")
    precision: Precision = Field(
        default="bf16",
        description="fp32, or mixed precision bf16/fp16 with fp32 master weights and optimizer states "
        "(fp16 adds loss scaling).",
    )
    optimizer: Optimizer = Field(default="adamw", description="Optimizer; sets the optimizer-state bytes.")
    allow_grad_accumulation: bool = Field(default=True, description="May use several micro-batches per step.")
    allow_checkpointing: bool = Field(default=True, description="May recompute activations (selective/full).")
    allow_offload: bool = Field(default=False, description="May offload optimizer states to the host.")
    allow_context_parallel: bool = Field(
        default=False,
        description="May split sequences over ranks (context parallelism). autoplan's runtime does not "
        "execute it yet (torch's context_parallel has no CPU path to test it on); such plans are for "
        "export to torchtitan or Megatron-LM.",
    )
    expert_load_imbalance: float = Field(
        default=1.0, ge=1.0, le=64.0,
        description="Mixture-of-experts routing: routed tokens of the busiest expert-parallel rank over the "
        "mean (1.0: balanced). Stated, not predicted: expert compute and all-to-all bytes at ep > 1 are "
        "charged at the busiest rank's share, and per-expert GEMM sizes use it.",
    )

    @field_validator("global_batch_size")
    @classmethod
    def _sane_batch(cls, v: int) -> int:
        return _BATCH.check(v)


class Constraints(Frozen):
    """Pins (fix a knob) and bounds (limit the search). A None pin leaves the knob free."""

    pp: int | None = Field(default=None, gt=0, description="Pin pipeline-parallel degree.")
    dp: int | None = Field(default=None, gt=0, description="Pin data-parallel degree.")
    tp: int | None = Field(default=None, gt=0, description="Pin tensor-parallel degree.")
    ep: int | None = Field(default=None, gt=0, description="Pin expert-parallel degree (MoE models; divides dp).")
    cp: int | None = Field(default=None, gt=0, description="Pin context-parallel degree (splits each sequence).")
    sharding: Sharding | None = Field(default=None, description="Pin data-parallel sharding (zero stage).")
    hsdp_shard_size: int | None = Field(default=None, gt=0, description="Pin the HSDP shard-group size.")
    micro_batch_size: int | None = Field(default=None, gt=0, description="Pin the micro-batch size.")
    num_micro_batches: int | None = Field(default=None, gt=0, description="Pin micro-batches per step.")
    schedule: Schedule | None = Field(default=None, description="Pin the pipeline schedule.")
    virtual_stages: int | None = Field(default=None, gt=0, description="Pin virtual stages per pp rank.")
    recompute: Recompute | None = Field(default=None, description="Pin activation checkpointing (all stages).")
    sequence_parallel: bool | None = Field(default=None, description="Pin sequence parallelism (needs tp>1).")
    offload: Offload | None = Field(default=None, description="Pin optimizer offload.")
    max_tp: int | None = Field(default=None, gt=0, description="Upper bound on tp.")
    max_pp: int | None = Field(default=None, gt=0, description="Upper bound on pp.")
    tp_across_nodes: bool = Field(default=False, description="Allow tp groups larger than one node.")
    memory_headroom_fraction: float = Field(
        default=0.0, ge=0, lt=1, description="Fraction of device memory the plan must leave free."
    )
    top_k: int = Field(default=10, ge=1, description="Alternatives to record in the plan.")

    @model_validator(mode="after")
    def _check(self) -> Constraints:
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel: needs tp > 1, but tp is pinned to 1")
        if self.virtual_stages and self.virtual_stages > 1 and self.schedule not in (None, "interleaved_1f1b", "zero_bubble"):
            raise ValueError(
                f"virtual_stages: {self.virtual_stages} needs schedule interleaved_1f1b or zero_bubble "
                f"(got {self.schedule})"
            )
        if self.max_tp and self.tp and self.tp > self.max_tp:
            raise ValueError(f"tp: pinned to {self.tp} but max_tp is {self.max_tp}")
        return self

    def pins(self) -> dict[str, object]:
        """The pinned knobs, by name."""
        names = (
            "pp", "dp", "tp", "ep", "cp", "sharding", "hsdp_shard_size", "micro_batch_size", "num_micro_batches",
            "schedule", "virtual_stages", "recompute", "sequence_parallel", "offload",
        )
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}
