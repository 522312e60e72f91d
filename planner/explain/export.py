"""A Plan as the configuration of another engine: DeepSpeed JSON, torchtitan TOML, Megatron-LM args.

Each exporter returns an `Export(target, text, config, notes)`: `text` is the file to write,
`config` the same as data, and `notes` one line for every knob of the plan the target cannot
express exactly (with what was written instead). Mapping, knob by knob:

| plan knob          | DeepSpeed                          | torchtitan [parallelism]           | Megatron-LM                         |
|--------------------|------------------------------------|------------------------------------|-------------------------------------|
| global batch       | train_batch_size                   | [training] global_batch_size       | --global-batch-size                 |
| micro_batch_size   | train_micro_batch_size_per_gpu     | [training] local_batch_size, pp mb | --micro-batch-size                  |
| num_micro_batches  | gradient_accumulation_steps        | derived by torchtitan              | derived by Megatron                 |
| sharding none/1/2/3| zero_optimization.stage 0/1/2/3    | replicate / FSDP shard degree      | DDP / --use-distributed-optimizer   |
| hsdp               | (none: stage 3 + note)             | replicate x shard degrees          | (none: note)                        |
| offload cpu        | zero_optimization.offload_optimizer| [training] enable_cpu_offload      | --optimizer-cpu-offload             |
| tp, sp             | tensor_parallel.autotp_size        | tensor_parallel_degree             | --tensor-model-parallel-size, -sp   |
| pp, schedule, v    | (set in code: PipelineModule)      | pipeline_parallel_* keys           | --pipeline-model-parallel-size, vpp |
| ep                 | (set in code: MoE(ep_size=...))    | expert_parallel_degree             | --expert-model-parallel-size        |
| cp                 | (none: note; Ulysses differs)      | context_parallel_degree            | --context-parallel-size             |
| recompute          | (in code: activation_checkpointing)| [activation_checkpoint] mode       | --recompute-granularity             |
| precision          | bf16 / fp16 blocks                 | mixed_precision_param              | --bf16 / --fp16                     |
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from specs import MeshDims, Plan, SpecError

TARGETS = ("deepspeed", "torchtitan", "megatron")
ZERO_STAGE = {"none": 0, "zero1": 1, "zero2": 2, "zero3": 3, "hsdp": 3}
TITAN_SCHEDULE = {
    "gpipe": "GPipe",
    "1f1b": "1F1B",
    "interleaved_1f1b": "Interleaved1F1B",
    "zero_bubble": "InterleavedZeroBubble",
}


@dataclass
class Export:
    target: str
    text: str
    config: Any
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "config": self.config,
            "notes": self.notes,
            "text": self.text,
        }


def _header(plan: Plan) -> list[str]:
    """The comment lines naming the plan, its model and hardware. The names come from the plan
    file, i.e. from whoever wrote it: control characters are escaped so that a name cannot end
    the comment and add a line (a command, in the sourced Megatron args file)."""
    about = f"model {plan.model.name} on {plan.hardware}"
    safe = "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in about
    )
    return [f"# autoplan export of: {plan}", f"# {safe}"]


def _layer_blocks(plan: Plan) -> int:
    """Transformer layers among the blocks (names like `layers.3`), else all blocks."""
    names = plan.model.block_names
    n = sum(1 for b in names if re.search(r"(^|\.)(layers|h|blocks)\.\d+$", b))
    return n or plan.model.num_blocks


def _uneven_stages(plan: Plan) -> bool:
    sizes = {s.num_blocks for s in plan.pipeline.stages}
    return len(sizes) > 1


def _recompute(plan: Plan) -> str:
    modes = {s.recompute for s in plan.pipeline.stages}
    return modes.pop() if len(modes) == 1 else "mixed"


def to_deepspeed(plan: Plan) -> Export:
    k, train = plan.knobs(), plan.train
    notes: list[str] = []
    zero: dict[str, Any] = {"stage": ZERO_STAGE[k.sharding]}
    if k.sharding == "hsdp":
        notes.append(
            f"sharding hsdp (shard groups of {k.hsdp_shard_size}): DeepSpeed has no hybrid "
            f"shard/replicate mode (MiCS was removed); written as ZeRO stage 3 over all dp ranks"
        )
    if k.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    cfg: dict[str, Any] = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": k.micro_batch_size,
        "gradient_accumulation_steps": k.num_micro_batches,
        "zero_optimization": zero,
    }
    if train.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif train.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if train.optimizer in ("adamw", "adam"):
        cfg["optimizer"] = {"type": "AdamW" if train.optimizer == "adamw" else "Adam", "params": {}}
    else:
        cfg["optimizer"] = {"type": "SGD", "params": {}}
    if k.tp > 1:
        cfg["tensor_parallel"] = {"autotp_size": k.tp}
        notes.append(
            f"tp={k.tp}: written as AutoTP (tensor_parallel.autotp_size); DeepSpeed picks the "
            f"splits itself, not the plan's per-module styles"
        )
        if k.sequence_parallel:
            notes.append(
                "sequence_parallel: DeepSpeed's config cannot express Megatron-style sequence "
                "parallelism (Ulysses is a different scheme); not written"
            )
    if k.pp > 1:
        cfg["pipeline"] = {"activation_checkpoint_interval": 1 if k.recompute == "full" else 0}
        notes.append(
            f"pp={k.pp}: DeepSpeed sets pipeline stages in code (PipelineModule(num_stages={k.pp}, "
            f"partition_method=...)), not in the config; the plan's stage boundaries "
            f"({', '.join(f'{s.first}-{s.last}' for s in plan.pipeline.stages)}) must be given there"
        )
        if k.schedule != "1f1b" or k.virtual_stages > 1:
            notes.append(
                f"schedule {k.schedule} (v={k.virtual_stages}): DeepSpeed pipelines run their own "
                f"1F1B-style TrainSchedule only"
            )
    if k.cp > 1:
        notes.append(
            f"cp={k.cp}: DeepSpeed has no ring/all-gather context parallelism in its config (its "
            f"Ulysses sequence parallelism is a different, all-to-all scheme); not written"
        )
    if k.ep > 1:
        notes.append(
            f"ep={k.ep}: DeepSpeed sets expert parallelism in the model code "
            f"(deepspeed.moe.layer.MoE(..., ep_size={k.ep})), not in the config"
        )
    if k.recompute != "none":
        notes.append(
            f"recompute {k.recompute}: DeepSpeed checkpoints activations where the model calls "
            f"deepspeed.checkpointing.checkpoint; the config cannot select layers or 'selective'"
        )
    return Export("deepspeed", json.dumps(cfg, indent=2) + "\n", cfg, notes)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def to_torchtitan(plan: Plan) -> Export:
    k, train = plan.knobs(), plan.train
    notes: list[str] = []
    par: dict[str, Any] = {}
    # torchtitan has FSDP2 only: zero1 is written as zero2's FSDP (noted below)
    dims = MeshDims.of(
        pp=k.pp,
        dp=k.dp,
        tp=k.tp,
        hsdp_shard_size=k.hsdp_shard_size,
        sharding="zero2" if k.sharding == "zero1" else k.sharding,
    )
    par["data_parallel_replicate_degree"] = dims.dp_replicate
    par["data_parallel_shard_degree"] = dims.dp_shard
    if k.sharding in ("zero1", "zero2"):
        par["fsdp_reshard_after_forward"] = "never"
        notes.append(
            f"sharding {k.sharding}: torchtitan has FSDP2 only; written as FSDP with "
            f"reshard_after_forward=never (parameters stay gathered between forward and "
            f"backward, close to ZeRO-2; parameters are still sharded at rest)"
        )
    elif k.sharding == "zero3":
        par["fsdp_reshard_after_forward"] = "default"
    par["tensor_parallel_degree"] = k.tp
    par["enable_async_tensor_parallel"] = False
    if k.tp > 1:
        par["disable_loss_parallel"] = not plan.tensor_parallel.loss_parallel
        if not k.sequence_parallel:
            notes.append(
                "sequence_parallel off: torchtitan's TP plans always shard norms along the "
                "sequence (SequenceParallel); the export cannot turn that off"
            )
    par["pipeline_parallel_degree"] = k.pp
    if k.pp > 1:
        par["pipeline_parallel_schedule"] = TITAN_SCHEDULE[k.schedule]
        par["pipeline_parallel_microbatch_size"] = k.micro_batch_size
        names = plan.model.block_names
        if names:
            par["pipeline_parallel_split_points"] = [
                names[s.first] for s in plan.pipeline.stages[1:]
            ]
        else:
            notes.append(
                "stage boundaries: the plan records no block names; torchtitan will split evenly"
            )
        if k.virtual_stages > 1 and k.schedule == "zero_bubble":
            notes.append("zero_bubble with virtual stages: written as InterleavedZeroBubble")
    par["context_parallel_degree"] = k.cp
    if k.ep > 1:
        # torchtitan's EP borrows ranks from FSDP's shard dimension and TP (efsdp = dp_shard * cp
        # * tp / ep, ep >= tp); the plan's borrows data-parallel ranks only, experts whole on
        # each tp rank
        par["expert_parallel_degree"] = k.ep * k.tp
        par["expert_tensor_parallel_degree"] = 1
        if k.tp > 1:
            notes.append(
                f"ep={k.ep} with tp={k.tp}: torchtitan's expert parallelism spans the tp ranks too "
                f"(expert_parallel_degree >= tensor_parallel_degree); written as {k.ep * k.tp}, which "
                f"shards the experts {k.ep * k.tp} ways instead of the plan's {k.ep} (experts whole on "
                f"each tp rank)"
            )
        if k.sharding == "none":
            notes.append(
                f"ep={k.ep} with sharding none: torchtitan borrows expert-parallel ranks from FSDP's "
                f"shard dimension; with data_parallel_shard_degree 1 it refuses the mesh; re-plan "
                f"with zero2/zero3 (--pin zero=3) for torchtitan"
            )
    training = {
        "global_batch_size": train.global_batch_size,
        "local_batch_size": k.micro_batch_size * k.num_micro_batches,
        "mixed_precision_param": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[
            train.precision
        ],
        "mixed_precision_reduce": "float32",
    }
    if k.offload == "cpu":
        training["enable_cpu_offload"] = True
        notes.append(
            "offload cpu: torchtitan's enable_cpu_offload offloads parameters and gradients too "
            "(FSDP CPUOffloadPolicy), more than the plan's optimizer-only offload"
        )
    if train.precision == "fp16":
        notes.append("fp16: torchtitan has no loss scaling; prefer bf16")
    ac_mode = _recompute(plan)
    ac: dict[str, Any] = {
        "mode": {"none": "none", "selective": "selective", "full": "full"}.get(ac_mode, "selective")
    }
    if ac_mode == "selective":
        ac["selective_ac_option"] = "op"
    if ac_mode == "mixed":
        notes.append(
            "recompute differs between stages: torchtitan applies one mode to every layer; "
            "written as selective"
        )
    sections = {"parallelism": par, "training": training, "activation_checkpoint": ac}
    lines = _header(plan)
    lines += [f"# NOTE: {n}" for n in notes]
    for name, body in sections.items():
        lines.append(f"\n[{name}]")
        lines += [f"{key} = {_toml_value(v)}" for key, v in body.items()]
    return Export("torchtitan", "\n".join(lines) + "\n", sections, notes)


def to_megatron(plan: Plan) -> Export:
    k, train = plan.knobs(), plan.train
    notes: list[str] = []
    args: list[str] = [
        "--tensor-model-parallel-size",
        str(k.tp),
        "--pipeline-model-parallel-size",
        str(k.pp),
        "--micro-batch-size",
        str(k.micro_batch_size),
        "--global-batch-size",
        str(train.global_batch_size),
    ]
    if k.pp > 1 and k.virtual_stages > 1:
        layers = _layer_blocks(plan)
        chunks = k.pp * k.virtual_stages
        if layers % chunks:
            notes.append(
                f"virtual stages: {layers} layers do not split evenly into pp({k.pp}) * v"
                f"({k.virtual_stages}) = {chunks} chunks; Megatron needs an even split"
            )
        args += ["--num-layers-per-virtual-pipeline-stage", str(max(1, layers // chunks))]
    if k.pp > 1:
        if _uneven_stages(plan):
            notes.append(
                "stage boundaries: the plan's stages are uneven "
                f"({', '.join(str(s.num_blocks) for s in plan.pipeline.stages)} blocks); Megatron "
                "splits layers evenly (embedding and head ride on the first and last stage)"
            )
        if k.schedule == "gpipe":
            notes.append("schedule gpipe: Megatron runs 1F1B (same bubble, less activation memory)")
        if k.schedule == "zero_bubble":
            notes.append(
                "schedule zero_bubble: not in Megatron-LM's mainline schedules; written as "
                "(interleaved) 1F1B"
            )
    if k.sequence_parallel:
        args.append("--sequence-parallel")
    if k.cp > 1:
        args += ["--context-parallel-size", str(k.cp)]
    if k.ep > 1:  # Megatron's EP, like the plan's, is carved out of the data-parallel ranks
        args += ["--expert-model-parallel-size", str(k.ep)]
    rc = _recompute(plan)
    if rc == "selective":
        args += ["--recompute-granularity", "selective"]
    elif rc == "full":
        args += [
            "--recompute-granularity",
            "full",
            "--recompute-method",
            "uniform",
            "--recompute-num-layers",
            "1",
        ]
    elif rc == "mixed":
        args += ["--recompute-granularity", "selective"]
        notes.append(
            "recompute differs between stages: Megatron applies one granularity everywhere"
        )
    if k.sharding in ("zero1", "zero2", "zero3", "hsdp"):
        args.append("--use-distributed-optimizer")
    if k.sharding == "zero2":
        notes.append(
            "sharding zero2: Megatron's distributed optimizer reduce-scatters gradients but "
            "keeps a full gradient buffer; memory is ZeRO-1's"
        )
    if k.sharding == "zero3":
        args.append("--use-torch-fsdp2")
        notes.append("sharding zero3: written as --use-torch-fsdp2 (Megatron-core's FSDP2 path)")
    if k.sharding == "hsdp":
        notes.append(
            "sharding hsdp: Megatron-LM has no hybrid shard/replicate data parallelism; "
            "written as the distributed optimizer (ZeRO-1 over all dp ranks)"
        )
    if k.offload == "cpu":
        args.append("--optimizer-cpu-offload")
    args += {"bf16": ["--bf16"], "fp16": ["--fp16"], "fp32": []}[train.precision]
    # Megatron's "adam" applies decoupled weight decay, i.e. AdamW.
    args += ["--optimizer", "sgd" if train.optimizer == "sgd" else "adam"]
    lines = _header(plan)
    lines += [f"# NOTE: {n}" for n in notes]
    pairs, i = [], 0
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            pairs.append(f"{args[i]} {args[i + 1]}")
            i += 2
        else:
            pairs.append(args[i])
            i += 1
    lines.append("MEGATRON_ARGS=(")
    lines += [f"  {p}" for p in pairs]
    lines.append(")")
    return Export("megatron", "\n".join(lines) + "\n", args, notes)


def export_plan(plan: Plan, target: str) -> Export:
    fns = {"deepspeed": to_deepspeed, "torchtitan": to_torchtitan, "megatron": to_megatron}
    if target not in fns:
        raise SpecError(f"--to {target!r}: unknown target; choose one of {', '.join(TARGETS)}")
    return fns[target](plan)
