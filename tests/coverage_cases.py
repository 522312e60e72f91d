"""Coverage models (benchmarks/model_coverage.py) executed by the runtime with PLANNER-made hybrid plans,
against one process. Runs every case inside ONE torchrun process group:

    torchrun --standalone --nproc-per-node 4 tests/coverage_cases.py --out results.json [--only a,b]

Each case: build the small model (float64, seed), trace it with planner.trace, make the plan with
planner.plan_from_knobs (so block names, TP styles and the fingerprint come from the tracer, as in
real use), train STEPS steps of SGD under runtime.parallelize, and train an identical copy alone
in this process on the whole global batch. Rank 0 writes per case the largest loss difference
and the largest parameter difference after the last step (tests/test_coverage_runtime.py asserts).
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from model_coverage import build_hf, build_vision  # noqa: E402
from structure_models import build_structure  # noqa: E402

from planner import plan_from_knobs, trace  # noqa: E402
from runtime import parallelize  # noqa: E402
from specs import HardwareSpec, Knobs, TrainSpec  # noqa: E402
from tests.case_runner import finish, on_rank0, run_cases, start  # noqa: E402

STEPS = 3
SEED = 7
LR = 0.05
BATCH = 8

# name -> (model, knobs on 4 processes). Hybrid: two mesh axes (or sharded + replicated).
CASES: dict[str, tuple[str, dict]] = {
    "llama-tp2-dp2": ("hf/llama", dict(pp=1, dp=2, tp=2)),
    "mistral-tp2-zero3": ("hf/mistral", dict(pp=1, dp=2, tp=2, sharding="zero3")),
    "qwen2-tp2-zero2": ("hf/qwen2", dict(pp=1, dp=2, tp=2, sharding="zero2")),
    "gemma-tp2-dp2": ("hf/gemma", dict(pp=1, dp=2, tp=2)),
    "opt-tp2-dp2": ("hf/opt", dict(pp=1, dp=2, tp=2)),
    # float32: HF's MoE grouped matmul has no float64 kernel
    "mixtral-tp2-zero3-fp32": ("hf/mixtral", dict(pp=1, dp=2, tp=2, sharding="zero3")),
    "gpt2-hsdp2x2": ("hf/gpt2", dict(pp=1, dp=4, tp=1, sharding="hsdp", hsdp_shard_size=2)),
    "bert-tp2-dp2": ("hf/bert", dict(pp=1, dp=2, tp=2)),
    "resnet18-hsdp2x2": ("tv/resnet18", dict(pp=1, dp=4, tp=1, sharding="hsdp", hsdp_shard_size=2)),
    # Structures of real models (tests/structure_models.py), each once silently wrong or a crash.
    "fused_chunk-tp2-dp2": ("local/fused_chunk", dict(pp=1, dp=2, tp=2)),
    "fused_split-tp2-dp2": ("local/fused_split", dict(pp=1, dp=2, tp=2)),
    "fused_gqa-tp2-dp2": ("local/fused_gqa", dict(pp=1, dp=2, tp=2)),
    "fused_heads-tp2-dp2": ("local/fused_heads", dict(pp=1, dp=2, tp=2)),
    "fused_chunk-pp2-tp2": ("local/fused_chunk", dict(pp=2, dp=1, tp=2, num_micro_batches=2)),
    "head_norm-tp2-dp2": ("local/head_norm", dict(pp=1, dp=2, tp=2)),
    "head_norm-tp2-sp": ("local/head_norm", dict(pp=1, dp=2, tp=2, sequence_parallel=True)),
    "rotary_shared-pp2-tp2": ("local/rotary_shared", dict(pp=2, dp=1, tp=2, num_micro_batches=2)),
    "rotary_shared-pp4": ("local/rotary_shared", dict(pp=4, dp=1, tp=1, num_micro_batches=4)),
    # BatchNorm at micro-batch 1 (per-micro-batch statistics, as gradient accumulation has them)
    "resnet18-dp4-mb1": ("tv/resnet18", dict(pp=1, dp=4, tp=1, num_micro_batches=2)),
    # zero_bubble with zero3/hsdp is refused (planner.capabilities); with zero2 it must match
    "head_norm-pp2xzero2-zero_bubble": (
        "local/head_norm",
        dict(pp=2, dp=2, tp=1, sharding="zero2", schedule="zero_bubble", num_micro_batches=2),
    ),
    "qwen3-tp2-dp2": ("hf/qwen3", dict(pp=1, dp=2, tp=2)),
    # BERT registers one bias under two names; the export split keeps one (full_state_dict restores both)
    "bert-pp2-dp2": ("hf/bert", dict(pp=2, dp=2, tp=1, num_micro_batches=2)),
    "qwen3-tp2-sp": ("hf/qwen3", dict(pp=1, dp=2, tp=2, sequence_parallel=True)),
    "llama-tp2-sp": ("hf/llama", dict(pp=1, dp=2, tp=2, sequence_parallel=True)),
    "gpt_neox-tp2-sp": ("hf/gpt_neox", dict(pp=1, dp=2, tp=2, sequence_parallel=True)),
}


def loss64(out, target: torch.Tensor) -> torch.Tensor:
    """LM or classification cross entropy, kept in float64."""
    logits = out.logits if hasattr(out, "logits") else out
    if logits.dim() == 2:
        return F.cross_entropy(logits, target)
    return F.cross_entropy(logits.flatten(0, -2), target.flatten())


def build(model_name: str, dtype: torch.dtype = torch.float64):
    kind, name = model_name.split("/", 1)
    torch.manual_seed(SEED)
    if kind == "hf":
        model, inputs = build_hf(name, device="cpu", no_dropout=True)
    elif kind == "local":
        model, inputs = build_structure(name, num_layers=4)
    else:
        model, inputs = build_vision(name, device="cpu")
    model = model.to(dtype)
    gen = torch.Generator().manual_seed(SEED)
    if kind in ("hf", "local"):
        vocab = 256 if kind == "hf" else 64
        batches = []
        for _ in range(STEPS):
            t = torch.randint(0, vocab, (BATCH, inputs[0].shape[1]), generator=gen)
            batches.append((t, t))
        example = (inputs[0][:1],)
    else:
        image = 64  # small images keep the CPU run short; resnet18 is size-agnostic
        batches = [
            (
                torch.randn(BATCH, 3, image, image, generator=gen, dtype=dtype),
                torch.randint(0, 1000, (BATCH,), generator=gen),
            )
            for _ in range(STEPS)
        ]
        example = (batches[0][0][:1],)
    return model, example, batches, kind


TRAIN = TrainSpec(global_batch_size=BATCH, precision="fp32", optimizer="sgd")


def run_case(label: str) -> dict:
    model_name, knobs = CASES[label]
    dtype = torch.float32 if label.endswith("-fp32") else torch.float64

    def make_plan(graph, hw):
        nmb = knobs.get("num_micro_batches", 1)
        k = Knobs(micro_batch_size=BATCH // (knobs["dp"] * nmb), **knobs)
        return plan_from_knobs(graph, hw, TRAIN, k)

    return {"name": label, **compare(model_name, dtype, make_plan)}


def compare(model_name: str, dtype: torch.dtype, make_plan) -> dict:
    """Train `model_name` under `make_plan(graph, hw)` on this process group and alone on rank 0;
    the losses, the largest differences and the plan (rank 0 has the differences)."""
    model, example, batches, kind = build(model_name, dtype)
    world = dist.get_world_size()

    def traced_plan():  # on rank 0, handed to every rank (tracing on each of 4 ranks cost ~4x)
        graph = trace(model, example, name=model_name)
        return make_plan(graph, HardwareSpec.preset("cpu", devices=world)), graph.traced_by

    plan, traced_by = on_rank0(traced_plan)
    k = plan.knobs()
    ref_model = copy.deepcopy(model)
    pm = parallelize(
        model, plan, loss_fn=loss64, example_inputs=example, optimizer_kwargs={"lr": LR}
    )
    losses = [float(pm.train_step(pm.local_batch(x, y))) for x, y in batches]
    full = pm.full_state_dict()
    out = {
        "model": model_name,
        "dtype": str(dtype),
        "plan": str(plan.knobs()),
        "traced_by": traced_by,
        "tp_styles": dict(plan.tensor_parallel.styles),
        "losses": losses,
    }
    if dist.get_rank() == 0:
        opt = torch.optim.SGD(ref_model.parameters(), lr=LR)
        ref_losses = []
        # BatchNorm normalises over each replica's slice: the reference runs the dp slices apart.
        chunks = k.dp * k.num_micro_batches if kind == "tv" else 1
        for x, y in batches:
            total = 0.0
            for xc, yc in zip(x.chunk(chunks), y.chunk(chunks), strict=True):
                part = loss64(ref_model(xc), yc) / chunks
                part.backward()
                total += float(part)
            opt.step()
            opt.zero_grad()
            ref_losses.append(total)
        ref = dict(ref_model.named_parameters())
        names = list(ref)
        out["missing_params"] = [n for n in names if n not in full]
        out["ref_losses"] = ref_losses
        out["loss_diff"] = max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True))
        out["param_diff"] = max(
            (full[n].double() - ref[n].detach().double()).abs().max().item()
            for n in names
            if n in full
        )
    return out


def main() -> None:
    args = start()
    finish(run_cases([c for c in CASES if not args.only or c in args.only], run_case), args.out)


if __name__ == "__main__":
    main()
