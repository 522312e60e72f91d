"""Many runtime correctness cases inside ONE torchrun process group (start-up dominates on CPU).

    torchrun --standalone --nproc-per-node N tests/dist_cases.py --out results.json [--only a,b]

Each case builds a tiny model (float64 unless it tests mixed precision), trains it for
STEPS steps under a hand-written plan with `runtime.parallelize`, and trains an identical copy
in this process alone (no collectives, the whole global batch at once) as the reference. Rank
0 writes, per case: the largest |loss difference| over the steps, the largest |parameter
difference| after the last step, the tolerance, and per-rank parameter bytes (so a test can
see that sharding is real). tests/test_runtime_dist.py launches this and asserts per case.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.nn.functional as F  # noqa: E402

from planner.models import build_model, lm_loss  # noqa: E402
from runtime import parallelize  # noqa: E402
from tests.case_runner import finish, on_rank0, run_cases, start  # noqa: E402
from tests.runtime_plans import make_plan  # noqa: E402

STEPS = 3
SEED = 1234
LR = 1e-2


def lm_loss64(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """lm_loss without its float32 cast, so a float64 run compares to ~1e-13."""
    return F.cross_entropy(logits.flatten(0, -2), tokens.flatten())


@dataclass
class Case:
    name: str
    world: int
    model: str
    plan: dict
    dtype: torch.dtype = torch.float64
    tol: float = 1e-10
    precision: str = "fp32"
    meta: dict = field(default_factory=dict)


def _cases() -> list[Case]:
    c: list[Case] = []
    gpt_tp = dict(tp_styles="gpt")
    llama_tp = dict(tp_styles="llama")
    sgd = dict(optimizer="sgd")
    for w in (2, 4):
        c += [
            Case(f"ddp-gpt-{w}", w, "gpt-tiny", dict(dp=w)),
            Case(f"zero1-gpt-{w}", w, "gpt-tiny", dict(dp=w, sharding="zero1")),
            Case(f"zero2-gpt-{w}", w, "gpt-tiny", dict(dp=w, sharding="zero2")),
            Case(f"zero3-llama-{w}", w, "llama-tiny", dict(dp=w, sharding="zero3")),
            Case(f"tp-mlp-{w}", w, "mlp-tiny", dict(tp=w, tp_styles="mlp")),
            Case(f"tp-gpt-{w}", w, "gpt-tiny", dict(tp=w, **gpt_tp)),
            Case(f"tp-sp-gpt-{w}", w, "gpt-tiny", dict(tp=w, sequence_parallel=True, **gpt_tp)),
        ]
    c += [
        # BatchNorm normalises over each replica's batch: the reference runs the dp slices apart.
        Case("tp-sp-llama-2", 2, "llama-tiny", dict(tp=2, sequence_parallel=True, **llama_tp)),
        # 64x64 images (resnet18 pools adaptively; layer4 is 2x2): ~12x less compute than 224x224.
        Case("ddp-resnet18-2", 2, "resnet18", dict(dp=2), meta={"batch": 4, "chunked_ref": True, "image": 64}),
        Case("zero3-resnet18-2", 2, "resnet18", dict(dp=2, sharding="zero3"),
             meta={"batch": 4, "chunked_ref": True, "image": 64}),
        Case("zero3-accum-ckpt-gpt-2", 2, "gpt-tiny", dict(dp=2, sharding="zero3", num_micro_batches=2,
                                                           recompute="full")),
        Case("ddp-accum-selective-llama-2", 2, "llama-tiny", dict(dp=2, num_micro_batches=2, recompute="selective")),
        Case("tp-lossparallel-gpt-2", 2, "gpt-tiny", dict(tp=2, loss_parallel=True, **gpt_tp)),
        Case("tp-sp-lossparallel-gpt-2", 2, "gpt-tiny", dict(tp=2, sequence_parallel=True, loss_parallel=True, **gpt_tp)),
        Case("bf16-zero2-gpt-2", 2, "gpt-tiny", dict(dp=2, sharding="zero2", **sgd), torch.float32, 5e-3, "bf16"),
        Case("bf16-ddp-gpt-2", 2, "gpt-tiny", dict(dp=2, **sgd), torch.float32, 5e-3, "bf16"),
        Case("zero3-offload-gpt-2", 2, "gpt-tiny", dict(dp=2, sharding="zero3", offload="cpu")),
        Case("bf16-tp-gpt-2", 2, "gpt-tiny", dict(tp=2, **gpt_tp, **sgd), torch.float32, 5e-3, "bf16"),
        Case("fp16-zero3-mlp-2", 2, "mlp-tiny", dict(dp=2, sharding="zero3", **sgd), torch.float32, 5e-3, "fp16"),
        Case("hsdp-gpt-4", 4, "gpt-tiny", dict(dp=4, sharding="hsdp", hsdp_shard_size=2)),
        Case("tp2-zero3-gpt-4", 4, "gpt-tiny", dict(dp=2, tp=2, sharding="zero3", **gpt_tp)),
        Case("tp2-ddp-llama-4", 4, "llama-tiny", dict(dp=2, tp=2, **llama_tp)),
        Case("tp2-sp-zero2-accum-ckpt-llama-4", 4, "llama-tiny",
             dict(dp=2, tp=2, sharding="zero2", sequence_parallel=True, num_micro_batches=2, recompute="full",
                  **llama_tp)),
        # meta-device start: a model larger than the per-rank budget never exists whole on a rank
        Case("meta-zero3-gpt-small-4", 4, "gpt-small", dict(dp=4, sharding="zero3"), torch.float32,
             meta={"meta_init": True}),
        Case("meta-tp2-zero3-gpt-small-4", 4, "gpt-small", dict(dp=2, tp=2, sharding="zero3", **gpt_tp), torch.float32,
             meta={"meta_init": True}),
        # pipeline hybrids (runtime/pipeline.py runs the schedule; TP/ckpt/FSDP/DDP go on its stages)
        Case("pp2-ddp-gpt-4", 4, "gpt-tiny", dict(pp=2, dp=2, num_micro_batches=2)),
        Case("pp2-zero3-ckpt-llama-4", 4, "llama-tiny", dict(pp=2, dp=2, num_micro_batches=2, sharding="zero3",
                                                             recompute="full")),
        Case("pp2-tp2-llama-4", 4, "llama-tiny", dict(pp=2, tp=2, num_micro_batches=2, schedule="gpipe", **llama_tp)),
        # PP x TP with loss parallel (the last stage's loss is a DTensor) and sequence parallel;
        # gpt ties embed.tok / head.lm_head across the two stages, both tp-sharded on dim 0.
        Case("pp2-tp2-sp-lossparallel-gpt-4", 4, "gpt-tiny",
             dict(pp=2, tp=2, num_micro_batches=2, sequence_parallel=True, loss_parallel=True, **gpt_tp)),
        Case("pp2-tp2-sp-lossparallel-llama-4", 4, "llama-tiny",
             dict(pp=2, tp=2, num_micro_batches=2, sequence_parallel=True, loss_parallel=True, **llama_tp)),
        Case("pp2-tp2-zero3-lossparallel-gpt-8", 8, "gpt-tiny",
             dict(pp=2, dp=2, tp=2, num_micro_batches=2, sharding="zero3", loss_parallel=True, **gpt_tp)),
        # Plans made by the planner (planner.plan_from_knobs on the traced model, cpu preset x 8):
        # its styles, sp + loss parallel, per-stage recompute and its fingerprint, checked by the runtime.
        Case("planned-pp2-tp2-dp2-zero2-sp-selective-gpt-8", 8, "gpt-tiny", {}, meta={"knobs": dict(
            pp=2, dp=2, tp=2, sharding="zero2", micro_batch_size=2, num_micro_batches=2, schedule="1f1b",
            recompute="selective", sequence_parallel=True)}),
        Case("planned-pp2-tp2-dp2-none-full-interleaved-llama-8", 8, "llama-tiny", {}, meta={"knobs": dict(
            pp=2, dp=2, tp=2, sharding="none", micro_batch_size=2, num_micro_batches=2,
            schedule="interleaved_1f1b", virtual_stages=2, recompute="full", sequence_parallel=True)}),
        # hsdp over dp=2 (shard groups of 2, one replica: the planner's smallest hsdp) x pp x tp
        Case("planned-pp2-tp2-dp2-hsdp-full-gpipe-gpt-8", 8, "gpt-tiny", {}, meta={"knobs": dict(
            pp=2, dp=2, tp=2, sharding="hsdp", hsdp_shard_size=2, micro_batch_size=2, num_micro_batches=2,
            schedule="gpipe", recompute="full")}),
        Case("pp2-tp2-zero2-sp-interleaved-llama-8", 8, "llama-tiny",
             dict(pp=2, dp=2, tp=2, num_micro_batches=2, sharding="zero2", sequence_parallel=True,
                  schedule="interleaved_1f1b", virtual_stages=2, **llama_tp)),
    ]
    return c


def _reference(model: torch.nn.Module, loss_fn, case: Case, plan, batches) -> tuple[list[float], dict]:
    """One process, whole global batch per step (or its dp slices apart: chunked_ref), same optimizer."""
    cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[plan.train.optimizer]
    opt = cls(model.parameters(), lr=LR)
    losses = []
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(case.precision)
    chunks = plan.mesh.dp if case.meta.get("chunked_ref") else 1
    for x, y in batches:
        loss = 0.0
        for xc, yc in zip(x.chunk(chunks), y.chunk(chunks), strict=True):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                part = loss_fn(model(xc), yc) / chunks
            part.backward()
            loss = loss + part.detach()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach() for k, v in model.state_dict().items()}


def planned(built, batch: int, knobs: dict):
    """A Plan made by the planner for the model `built` (traced as is: float64, so the
    fingerprint the runtime checks is this model's) on the cpu preset, with these knobs. Rank 0
    traces and plans; every rank gets its plan (tracing on 8 ranks of 2 cores cost ~8x)."""
    from planner import plan_from_knobs, trace
    from specs import HardwareSpec, Knobs, TrainSpec

    world = dist.get_world_size()

    def make():
        one = tuple(x[:1] for x in built.example_inputs)
        graph = trace(built.module, one, name=built.name)
        hw = HardwareSpec.preset("cpu", devices=world)
        train = TrainSpec(global_batch_size=batch, precision="fp32", optimizer="adamw")
        return plan_from_knobs(graph, hw, train, Knobs(**knobs))

    return on_rank0(make)


def _local_param_bytes(pm) -> int:
    total = 0
    for m in pm.modules:
        for p in m.parameters():
            t = p.to_local() if hasattr(p, "to_local") else p
            total += t.numel() * t.element_size()
    return total


def run_meta_case(case: Case) -> dict:
    """Build on meta, shard, materialise: per-rank parameter bytes vs a budget of half the model."""
    torch.manual_seed(SEED)
    batch = case.meta.get("batch", 8)
    built = build_model(case.model, batch=batch, dtype=case.dtype, device="meta")
    full_bytes = sum(p.numel() * p.element_size() for p in built.module.parameters())
    plan = make_plan(case.model, global_batch_size=batch, **case.plan)
    example = tuple(torch.zeros(x.shape, dtype=x.dtype) for x in built.example_inputs)
    pm = parallelize(built.module, plan, loss_fn=built.loss_fn, example_inputs=example, optimizer_kwargs={"lr": 1e-3})
    stds = [float(p.to_local().std()) for n, p in pm.module.named_parameters() if n.endswith("q_proj.weight")]
    gen = torch.Generator().manual_seed(SEED)
    losses = [float(pm.train_step(pm.local_batch(*built.make_batch(batch, gen)))) for _ in range(STEPS)]
    local = _local_param_bytes(pm)
    all_bytes = [None] * dist.get_world_size()
    dist.all_gather_object(all_bytes, local)
    return {"name": case.name, "world": case.world, "meta_init": True, "losses": losses, "full_param_bytes": full_bytes,
            "local_param_bytes": all_bytes, "budget_bytes": full_bytes // 2, "q_proj_std": stds, "notes": pm.notes}


def with_image_size(built, image: int):
    """The same vision model fed image x image inputs instead of the bundled 224 x 224."""
    x, num_classes = built.example_inputs[0], 1000  # planner.models' torchvision default

    def make_batch(b: int, gen: torch.Generator):
        return (torch.randn(b, 3, image, image, generator=gen, dtype=x.dtype),
                torch.randint(0, num_classes, (b,), generator=gen))

    return replace(built, example_inputs=(x[..., :image, :image],), make_batch=make_batch,
                   info={**built.info, "image": image})


def run_case(case: Case) -> dict:
    if case.meta.get("meta_init"):
        return run_meta_case(case)
    torch.manual_seed(SEED)
    batch = case.meta.get("batch", 8)
    built = build_model(case.model, batch=batch, dtype=case.dtype)
    if "image" in case.meta:
        built = with_image_size(built, case.meta["image"])
    model = built.module
    ref_model = copy.deepcopy(model)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    plan = (planned(built, batch, case.meta["knobs"]) if "knobs" in case.meta
            else make_plan(case.model, global_batch_size=batch, precision=case.precision, **case.plan))
    gen = torch.Generator().manual_seed(SEED)
    batches = [built.make_batch(batch, gen) for _ in range(STEPS)]
    batches = [(x.to(case.dtype) if x.is_floating_point() else x, y.to(case.dtype) if y.is_floating_point() else y)
               for x, y in batches]
    loss_fn = lm_loss64 if built.loss_fn is lm_loss else built.loss_fn
    pm = parallelize(model, plan, loss_fn=loss_fn, example_inputs=built.example_inputs,
                     optimizer_kwargs={"lr": LR})
    losses = []
    for x, y in batches:
        loss = pm.train_step(pm.local_batch(x, y))
        losses.append(float(loss) if loss is not None else None)
    local_bytes = _local_param_bytes(pm)
    full = pm.full_state_dict()
    all_bytes = [None] * dist.get_world_size()
    dist.all_gather_object(all_bytes, local_bytes)
    out = {"name": case.name, "world": case.world, "tol": case.tol, "losses": losses,
           "full_param_bytes": full_bytes, "local_param_bytes": all_bytes, "notes": pm.notes}
    if dist.get_rank() == 0:
        ref_losses, ref_sd = _reference(ref_model, loss_fn, case, plan, batches)
        names = [n for n, _ in ref_model.named_parameters()]
        missing = [n for n in names if n not in full]
        out["missing_params"] = missing
        out["ref_losses"] = ref_losses
        out["loss_diff"] = max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True))
        out["param_change"] = max((ref_sd[n].to(torch.float64) - init[n].to(torch.float64)).abs().max().item()
                                  for n in names)
        out["param_diff"] = max(
            (full[n].to(torch.float64) - ref_sd[n].to(torch.float64)).abs().max().item() for n in names if n in full
        )
    return out


def main() -> None:
    args = start()
    world = dist.get_world_size()
    names = [c.name for c in _cases() if c.world == world and (not args.only or c.name in args.only)]
    by_name = {c.name: c for c in _cases()}
    finish(run_cases(names, lambda n: run_case(by_name[n])), args.out)


if __name__ == "__main__":
    main()
