"""Hand-written plans for the runtime's tests (no planner search involved).

`make_plan` is a stand-in until tests/plan_builders.py (the pipeline tests' builder) lands; the
TP style tables below are what the planner emits for the bundled models (specs/plan.py).
"""

from __future__ import annotations

from specs import HardwareSpec, Plan

TRANSFORMER_TP = {
    "embed.tok": "vocab",
    "layers.*.attn.q_proj": "colwise", "layers.*.attn.k_proj": "colwise", "layers.*.attn.v_proj": "colwise",
    "layers.*.attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise", "layers.*.mlp.up_proj": "colwise", "layers.*.mlp.down_proj": "rowwise",
    "head.lm_head": "colwise",
}
TRANSFORMER_SP = {"layers.*.attn_norm": "sequence", "layers.*.mlp_norm": "sequence", "head.norm": "sequence"}
MLP_TP = {"layers.*.up_proj": "colwise", "layers.*.down_proj": "rowwise"}
RESNET_BLOCKS = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]


def block_names(model_name: str) -> list[str]:
    from planner.models import GPT_CONFIGS, LLAMA_CONFIGS, MLP_CONFIGS

    cfg = GPT_CONFIGS.get(model_name) or LLAMA_CONFIGS.get(model_name) or MLP_CONFIGS.get(model_name)
    if cfg is not None:
        return ["embed", *[f"layers.{i}" for i in range(cfg.num_layers)], "head"]
    if model_name.startswith("resnet"):
        return list(RESNET_BLOCKS)
    raise ValueError(f"no block names for {model_name}")


def tp_styles(kind: str, sequence_parallel: bool = False) -> dict[str, str]:
    """kind: "mlp", "gpt" (no gate_proj) or "llama"."""
    if kind == "mlp":
        return dict(MLP_TP)
    styles = dict(TRANSFORMER_TP)
    if kind == "gpt":
        del styles["layers.*.mlp.gate_proj"]
    if sequence_parallel:
        styles.update(TRANSFORMER_SP)
    return styles


def make_plan(model_name: str, *, pp: int = 1, dp: int = 1, tp: int = 1, sharding: str = "none",
              hsdp_shard_size: int | None = None, offload: str = "none", global_batch_size: int = 8,
              num_micro_batches: int = 1, recompute: str = "none", sequence_parallel: bool = False,
              loss_parallel: bool = False, tp_styles: str | None = None, precision: str = "fp32",
              optimizer: str = "adamw", schedule: str = "1f1b", fingerprint: str = "*") -> Plan:
    blocks = block_names(model_name)
    n = len(blocks)
    per = -(-n // pp)
    stages = [{"first": i * per, "last": min(n, (i + 1) * per) - 1, "recompute": recompute} for i in range(pp)]
    styles = globals()["tp_styles"](tp_styles, sequence_parallel) if tp_styles else {}
    return Plan.from_dict({
        "model": {"name": model_name, "fingerprint": fingerprint, "num_blocks": n, "block_names": blocks},
        "hardware": HardwareSpec.preset("cpu", devices=pp * dp * tp).model_dump(mode="json"),
        "train": {"global_batch_size": global_batch_size, "precision": precision, "optimizer": optimizer},
        "mesh": {"pp": pp, "dp": dp, "tp": tp},
        "data_parallel": {"sharding": sharding, "hsdp_shard_size": hsdp_shard_size, "offload": offload},
        "tensor_parallel": {"sequence_parallel": sequence_parallel, "loss_parallel": loss_parallel,
                            "styles": styles},
        "pipeline": {"schedule": schedule, "micro_batch_size": global_batch_size // (dp * num_micro_batches),
                     "num_micro_batches": num_micro_batches, "stages": stages},
    })
