"""Plans for the runtime's tests: tests/plan_builders.make_plan (blocks, stages, pipeline) plus what
the runtime cases also need: the TP style tables the planner emits for the bundled models
(specs/plan.py), loss parallel, HSDP, offload and the fingerprint.
"""

from __future__ import annotations

from specs import Plan
from tests.plan_builders import make_plan as _base_plan

TRANSFORMER_TP = {
    "embed.tok": "vocab",
    "layers.*.attn.q_proj": "colwise", "layers.*.attn.k_proj": "colwise", "layers.*.attn.v_proj": "colwise",
    "layers.*.attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise", "layers.*.mlp.up_proj": "colwise", "layers.*.mlp.down_proj": "rowwise",
    "head.lm_head": "colwise",
}
TRANSFORMER_SP = {"layers.*.attn_norm": "sequence", "layers.*.mlp_norm": "sequence", "head.norm": "sequence"}
MLP_TP = {"layers.*.up_proj": "colwise", "layers.*.down_proj": "rowwise"}


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


def make_plan(model_name: str, *, global_batch_size: int = 8, dp: int = 1, num_micro_batches: int = 1,
              hsdp_shard_size: int | None = None, offload: str = "none", loss_parallel: bool = False,
              tp_styles: str | None = None, fingerprint: str = "*", sharding: str = "none", ep: int = 1,
              **kwargs) -> Plan:
    """plan_builders.make_plan(model_name, **kwargs) with the global batch split evenly, then the
    runtime-only fields set. tp_styles: "gpt" | "llama" | "mlp" | None."""
    mbs = global_batch_size // (dp * num_micro_batches)
    base = _base_plan(model_name, dp=dp, num_micro_batches=num_micro_batches, micro_batch_size=mbs,
                      global_batch=global_batch_size, **kwargs)
    data = base.model_dump(mode="json")
    data["model"]["fingerprint"] = fingerprint
    data["data_parallel"].update(sharding=sharding, hsdp_shard_size=hsdp_shard_size, offload=offload)
    data["mesh"]["ep"] = ep
    sp = data["tensor_parallel"]["sequence_parallel"]
    styles = globals()["tp_styles"](tp_styles, sp) if tp_styles else {}
    data["tensor_parallel"].update(loss_parallel=loss_parallel, styles=styles)
    return Plan.from_dict(data)
