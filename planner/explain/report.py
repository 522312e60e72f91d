"""The explanation of a Plan as plain data: what every renderer (terminal, HTML, JSON) shows.

Everything here is read from the planner's own records in the Plan (`predicted` — the cost
model's StepEstimate as stored — `alternatives`, `rejected`, `search`); nothing is re-estimated.
The only derived facts are layout ones that follow from the mesh and the hardware by
arithmetic, read from `specs.MeshDims` (the layout the runtime's DeviceMesh has: pp outermost, tp
innermost, dp split into dp_replicate x dp_shard under HSDP): which ranks form a group on each
mesh axis, whether a group spans nodes, and hence which link its collectives use.

`explain_data(plan) -> dict` is JSON-serialisable (`autoplan explain --format json`).
"""

from __future__ import annotations

from typing import Any

from specs import Knobs, MeshDims, Plan

# Friendly names of the cost model's time-breakdown keys; unknown keys are shown as they are.
TERM_LABELS = {
    "compute": "compute",
    "compute_forward": "compute: forward",
    "compute_backward": "compute: backward",
    "forward": "forward compute",
    "backward": "backward compute",
    "recompute": "recompute",
    "bubble": "pipeline bubble",
    "offload": "offload",
    "optimizer": "optimizer step",
    "other": "other",
}
AXIS_ORDER = ("tp", "ep", "dp", "pp", "cp")


def term_label(key: str) -> str:
    """`tp_comm_s` -> `exposed comm (tp)`, `bubble_s` -> `pipeline bubble`, ..."""
    key = key[:-2] if key.endswith("_s") else key
    if key in TERM_LABELS:
        return TERM_LABELS[key]
    for axis in AXIS_ORDER:
        for pat in (f"comm_{axis}", f"{axis}_comm", f"exposed_{axis}", f"{axis}_exposed"):
            if key.startswith(pat):
                return f"exposed comm ({axis})"
    return key.replace("_", " ")


def _link_names(plan: Plan) -> tuple[str, str]:
    """Names for the intra-node link and the inter-node network, from the preset's sources."""
    sources = {k: v.lower() for k, v in plan.hardware.sources.items()}
    intra = (
        "NVLink within a node" if "nvlink" in sources.get("intra_node", "") else "intra-node link"
    )
    inter_src = sources.get("inter_node", "")
    infiniband = any(w in inter_src for w in ("infiniband", " hdr", " ndr", "connectx"))
    inter = "InfiniBand across nodes" if infiniband else "inter-node network"
    return intra, inter


def mesh_axes(plan: Plan) -> list[dict[str, Any]]:
    """Per mesh axis: degree, rank stride, the first group's ranks (up to 8), nodes spanned, link.

    Rows tp, dp, pp; under HSDP dp's two parts follow the dp row, `part_of: "dp"` (dp_shard inside
    dp_replicate), and so do expert parallelism's ep and expert_dp groups. Every other row has
    `part_of: None`.
    """
    dims = MeshDims.from_plan(plan)
    hw = plan.hardware
    intra, inter = _link_names(plan)
    groups: list[tuple[str, str | None]] = [("tp", None)]
    if dims.cp > 1:  # context parallelism: between tp and dp (specs.MeshDims)
        groups.append(("cp", None))
    groups.append(("dp", None))
    if dims.hsdp:
        groups += [("dp_shard", "dp"), ("dp_replicate", "dp")]
    if dims.ep > 1:  # expert parallelism carves dp (specs.MeshDims): its all-to-all and gradient groups
        groups += [("ep", "dp"), ("expert_dp", "dp")]
    groups.append(("pp", None))
    out = []
    for group, part_of in groups:
        degree = dims.size(group)
        num_nodes = dims.nodes_spanned(group, hw.devices_per_node)
        if degree == 1:
            link, bandwidth = "none (degree 1)", 0.0
        elif num_nodes > 1:
            link, bandwidth = inter, hw.inter_node.bandwidth_bytes_per_s
        else:
            link, bandwidth = intra, hw.intra_node.bandwidth_bytes_per_s
        out.append(
            {
                "axis": group,
                "part_of": part_of,
                "degree": degree,
                "stride": dims.stride(group),
                "first_group": dims.first_group(group)[:8],
                "num_nodes_spanned": num_nodes,
                "spans_nodes": num_nodes > 1,
                "link": link,
                "bandwidth_bytes_per_s": bandwidth,
            }
        )
    return out


def stage_rows(plan: Plan) -> list[dict[str, Any]]:
    names = plan.model.block_names
    pp = plan.mesh.pp
    times = plan.predicted.stage_times if plan.predicted else []
    rows = []
    for i, s in enumerate(plan.pipeline.stages):
        row: dict[str, Any] = {
            "stage": i,
            "rank": i % pp,
            "chunk": i // pp,
            "first": s.first,
            "last": s.last,
            "num_blocks": s.num_blocks,
            "recompute": s.recompute,
            "first_name": names[s.first] if names else "",
            "last_name": names[s.last] if names else "",
        }
        if i < len(times):
            row["forward_s"], row["backward_s"] = times[i].forward_s, times[i].backward_s
            row["weight_s"], row["p2p_s"] = times[i].weight_s, times[i].p2p_s
        rows.append(row)
    return rows


def _knob_tokens(k: Knobs) -> dict[str, str]:
    """Each knob as a short `name=value` token, keyed by what it sets."""
    zero = {"none": "0", "zero1": "1", "zero2": "2", "zero3": "3", "hsdp": "hsdp"}[k.sharding]
    if k.sharding == "hsdp":
        zero += f"({k.hsdp_shard_size})"
    sched = k.schedule + (f"(v={k.virtual_stages})" if k.virtual_stages > 1 else "")
    return {
        "dp": f"dp={k.dp}",
        "tp": f"tp={k.tp}",
        "pp": f"pp={k.pp}",
        "ep": f"ep={k.ep}" if k.ep > 1 else "",
        "cp": f"cp={k.cp}" if k.cp > 1 else "",
        "zero": f"zero={zero}",
        "mb": f"mb={k.micro_batch_size}x{k.num_micro_batches}",
        "sched": f"sched={sched}" if k.pp > 1 else "",
        "ckpt": f"ckpt={k.recompute}",
        "sp": "sp" if k.sequence_parallel else "no-sp",
        "offload": f"offload={k.offload}",
    }


def knob_diff(base: Knobs, other: Knobs) -> str:
    """The knobs of `other` that differ from `base`, as `dp=32 tp=4` (HSDP shard size included)."""
    base_tokens, other_tokens = _knob_tokens(base), _knob_tokens(other)
    diff = [
        other_tokens[key]
        for key in other_tokens
        if other_tokens[key] != base_tokens[key] and other_tokens[key]
    ]
    return " ".join(diff) or "(same knobs)"


def explain_data(plan: Plan, top_k: int = 5) -> dict[str, Any]:
    """Everything `autoplan explain` shows, as JSON-able data."""
    prediction = plan.predicted
    base = plan.knobs()
    out: dict[str, Any] = {
        "plan": str(plan),
        "summary": plan.summary(),
        "knobs": base.model_dump(mode="json"),
        "model": {
            "name": plan.model.name,
            "num_params": plan.model.num_params,
            "num_blocks": plan.model.num_blocks,
            "fingerprint": plan.model.fingerprint,
        },
        "hardware": str(plan.hardware),
        "num_devices": plan.hardware.num_devices,
        "train": plan.train.model_dump(mode="json"),
        "mesh": mesh_axes(plan),
        "stages": stage_rows(plan),
        "data_parallel": plan.data_parallel.model_dump(mode="json"),
        "tensor_parallel": plan.tensor_parallel.model_dump(mode="json"),
        "pipeline": {
            k: v for k, v in plan.pipeline.model_dump(mode="json").items() if k != "stages"
        },
        "predicted": None,
        "alternatives": [],
        "rejected": [],
        "search": None,
    }
    if prediction is not None:
        step = prediction.step_time_s
        terms = [
            {"term": k, "label": term_label(k), "seconds": v, "fraction": v / step if step else 0.0}
            for k, v in prediction.time_breakdown_s.items()
        ]
        cats = [{"category": k, "bytes": v} for k, v in prediction.memory_bytes.items()]
        out["predicted"] = {
            "step_time_s": step,
            "samples_per_s": prediction.samples_per_s,
            "tokens_per_s": prediction.tokens_per_s,
            "mfu": prediction.mfu,
            "hfu": prediction.hfu,
            "model_flops_per_step": prediction.model_flops_per_step,
            "bubble_fraction": prediction.bubble_fraction,
            "breakdown": terms,
            "breakdown_sum_s": sum(prediction.time_breakdown_s.values()),
            "comm": {a: c.model_dump() for a, c in prediction.comm.items()},
            "memory": {
                "categories": cats,
                "peak_bytes": prediction.peak_memory_bytes,
                "capacity_bytes": prediction.memory_capacity_bytes,
                "free_bytes": prediction.memory_capacity_bytes - prediction.peak_memory_bytes,
                "worst_rank_stage": prediction.worst_rank_stage,
                "per_stage_bytes": list(prediction.memory_per_stage_bytes),
            },
            "fits": prediction.fits,
            "notes": list(prediction.notes),
        }
    best = prediction.step_time_s if prediction else None
    for rank, alt in enumerate(plan.alternatives[:top_k], start=1):
        delta = alt.step_time_s - best if best is not None else None
        out["alternatives"].append(
            {
                "rank": rank,
                "knobs": str(alt.knobs),
                "change": knob_diff(base, alt.knobs),
                "step_time_s": alt.step_time_s,
                "delta_s": delta,
                "delta_fraction": (delta / best) if (delta is not None and best) else None,
                "samples_per_s": alt.samples_per_s,
                "peak_memory_bytes": alt.peak_memory_bytes,
                "fits": alt.fits,
                "note": alt.note,
            }
        )
    out["num_alternatives"] = len(plan.alternatives)
    out["rejected"] = [r.model_dump() for r in plan.rejected]
    if plan.search:
        out["search"] = plan.search.model_dump()
    return out


# ------------------------------------------------------------------ formatting helpers
def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    a = abs(seconds)
    if a == 0:
        return "0 s"
    if a >= 1:
        return f"{seconds:.3g} s"
    if a >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    a = abs(n)
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if a >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_rate(bytes_per_s: float) -> str:
    return (
        f"{bytes_per_s / 1e9:.0f} GB/s" if bytes_per_s >= 1e9 else f"{bytes_per_s / 1e6:.0f} MB/s"
    )


def fmt_count(x: float) -> str:
    for unit, size in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x:.3g} "


def fmt_params(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit} params"
    return f"{n:.0f} params"
