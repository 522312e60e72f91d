"""A user's own training loop under every strategy, inside ONE torchrun process group of 4.

    torchrun --standalone --nproc-per-node 4 tests/loop_cases.py --out results.json [--only a,b]

Each case trains a bundled tiny model (float64) with what a real loop uses: an optimizer the user
builds (SGD with momentum, through parallelize(optimizer_fn=...)), an LR scheduler, gradient
clipping by the global norm with a max_grad_norm that really clips, an eval step in the middle of
a step (forward_backward -> eval_step -> clip_grad_norm_ -> optimizer_step: the eval must leave
the gradients alone), dict or 3-tensor batches, a per-replica data loader, and the export of a
full state dict that a fresh single-process model loads. Rank 0 runs the same loop in one process
on the whole global batch as the reference and writes per case the differences;
tests/test_runtime_loop.py launches this once and asserts per case (the tests/dist_cases.py
pattern).
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from planner.models import build_model  # noqa: E402
from runtime import parallelize  # noqa: E402
from specs import SpecError  # noqa: E402
from tests.case_runner import finish, run_cases, start  # noqa: E402
from tests.runtime_plans import make_plan  # noqa: E402

WORLD = 4
STEPS = 3
SEED = 1234
LR = 0.05
MAX_GRAD_NORM = 0.05  # gpt/llama-tiny gradients have norm ~0.3-1 here: every step clips


def lm_loss64(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2), tokens.flatten())


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the tokens where mask is 1 (the same count in every sample, so the
    mean of equal micro-batch means is the batch mean)."""
    per_token = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none")
    m = mask.flatten().to(per_token.dtype)
    return (per_token * m).sum() / m.sum()


def dict_forward(module, batch: dict) -> torch.Tensor:
    return masked_lm_loss(module(batch["input_ids"]), batch["labels"], batch["loss_mask"])


def tuple_forward(module, batch: tuple) -> torch.Tensor:
    ids, labels, mask = batch
    return masked_lm_loss(module(ids), labels, mask)


def make_sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def make_sched(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))


@dataclass
class Case:
    name: str
    model: str
    plan: dict
    kind: str = "clip"  # clip | dict | loader
    export: bool = False
    meta: dict = field(default_factory=dict)


def _cases() -> list[Case]:
    gpt, llama = dict(tp_styles="gpt"), dict(tp_styles="llama")
    return [
        Case("clip-ddp-gpt", "gpt-tiny", dict(dp=4)),
        Case("clip-zero3-llama", "llama-tiny", dict(dp=4, sharding="zero3"), export=True),
        Case("clip-tp2-dp2-sp-gpt", "gpt-tiny", dict(dp=2, tp=2, sequence_parallel=True, **gpt)),
        Case("clip-pp2-dp2-zero3-gpt", "gpt-tiny", dict(pp=2, dp=2, num_micro_batches=2, sharding="zero3")),
        Case("clip-pp2-tp2-sp-lossparallel-gpt", "gpt-tiny",
             dict(pp=2, tp=2, num_micro_batches=2, sequence_parallel=True, loss_parallel=True, **gpt), export=True),
        Case("clip-pp2-tp2-llama", "llama-tiny", dict(pp=2, tp=2, num_micro_batches=2, schedule="gpipe", **llama)),
        # two stages per rank (0, 2 and 1, 3): the tied embedding/head copies sit on stages 0 and 3
        Case("clip-pp2-dp2-zero2-interleaved-gpt", "gpt-tiny",
             dict(pp=2, dp=2, num_micro_batches=2, sharding="zero2", schedule="interleaved_1f1b", virtual_stages=2)),
        Case("dict-tp2-dp2-zero2-accum-gpt", "gpt-tiny",
             dict(dp=2, tp=2, sharding="zero2", num_micro_batches=2, **gpt), kind="dict"),
        Case("loader-dp2-tp2-zero3-llama", "llama-tiny", dict(dp=2, tp=2, sharding="zero3", **llama), kind="loader"),
    ]


def _dp_mean(pm, loss: torch.Tensor) -> float:
    loss = loss.detach().to(torch.float64).clone()
    if pm.dp_size > 1:
        dist.all_reduce(loss, group=pm.meshes.dp.get_group())
        loss /= pm.dp_size
    return float(loss)


def _all_equal_on_ranks(value: float) -> list[float]:
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, value)
    return every


def _dict_batch(tokens: torch.Tensor) -> dict:
    mask = torch.zeros_like(tokens)
    mask[:, tokens.shape[1] // 4:] = 1  # the same number of loss tokens in every sample
    return {"input_ids": tokens, "labels": tokens, "loss_mask": mask}


def run_clip_case(case: Case, built, plan, ref_model, tmpdir: str) -> dict:
    """clip + LambdaLR + user SGD; step 2 split as forward_backward, eval_step, clip, step."""
    gen = torch.Generator().manual_seed(SEED)
    batches = [built.make_batch(8, gen) for _ in range(STEPS)]
    held_out = built.make_batch(8, gen)
    pm = parallelize(built.module, plan, loss_fn=lm_loss64, example_inputs=built.example_inputs,
                     optimizer_fn=make_sgd, lr_scheduler_fn=make_sched, max_grad_norm=MAX_GRAD_NORM)
    losses, norms, evals = [], [], []
    for i, (x, y) in enumerate(batches):
        if i == 1:
            losses.append(_dp_mean(pm, pm.forward_backward(pm.local_batch(x, y))))
            evals.append(float(pm.eval_step(pm.local_batch(*held_out))))
            norms.append(float(pm.clip_grad_norm_(MAX_GRAD_NORM)))
            pm.optimizer_step()
        else:
            losses.append(float(pm.train_step(pm.local_batch(x, y))))
            norms.append(float(pm.last_grad_norm))
    evals.append(float(pm.eval_step(pm.local_batch(*held_out))))
    out = {"losses": losses, "norms": norms, "lr": pm.optimizers[0].param_groups[0]["lr"],
           "evals_on_ranks": _all_equal_on_ranks(evals[-1]), "mid_eval": evals[0],
           "optimizer": type(pm.optimizers[0]).__name__}
    if plan.mesh.pp > 1:  # the batch contract under a pipeline: one SpecError, before any collective
        try:
            pm.train_step(_dict_batch(batches[0][0]))
        except SpecError as e:
            out["pp_dict_error"] = str(e)
    full = pm.full_state_dict()
    if case.export:
        out.update(_export(pm, case, tmpdir))
    if dist.get_rank() == 0:
        ref = _reference(ref_model, batches, lambda m, b: lm_loss64(m(b[0]), b[1]), held_out=held_out)
        out.update(_compare(full, ref, ref_model, losses))
        out["ref_norms"] = ref["norms"]
        out["ref_lr"] = ref["lr"]
        out["ref_evals"] = ref["evals"]
    return out


def run_dict_case(case: Case, built, plan, ref_model, tmpdir: str) -> dict:
    """forward_fn at parallelize with dict batches (local_batch slices dicts), and a 3-tensor
    tuple batch with forward_fn given to train_step."""
    gen = torch.Generator().manual_seed(SEED)
    tokens = [built.make_batch(8, gen)[0] for _ in range(STEPS)]
    batches = [_dict_batch(t) for t in tokens]
    pm = parallelize(built.module, plan, forward_fn=dict_forward, example_inputs=built.example_inputs,
                     optimizer_fn=make_sgd, lr_scheduler_fn=make_sched, max_grad_norm=MAX_GRAD_NORM)
    losses, norms = [], []
    for i, b in enumerate(batches):
        if i == 1:
            as_tuple = (b["input_ids"], b["labels"], b["loss_mask"])
            loss = pm.train_step(pm.local_batch(as_tuple), forward_fn=tuple_forward)
        else:
            loss = pm.train_step(pm.local_batch(b))
        losses.append(float(loss))
        norms.append(float(pm.last_grad_norm))
    out = {"losses": losses, "norms": norms, "lr": pm.optimizers[0].param_groups[0]["lr"]}
    full = pm.full_state_dict()
    if dist.get_rank() == 0:
        ref = _reference(ref_model, batches, dict_forward)
        out.update(_compare(full, ref, ref_model, losses))
        out["ref_norms"] = ref["norms"]
        out["ref_lr"] = ref["lr"]
    return out


def run_loader_case(case: Case, built, plan, ref_model, tmpdir: str) -> dict:
    """pm.data_loader: each replica reads its own samples; the reference steps on their union."""
    gen = torch.Generator().manual_seed(SEED)
    n = 8 * STEPS
    tokens = built.make_batch(n, gen)[0]
    dataset = torch.utils.data.TensorDataset(tokens, torch.arange(n))
    pm = parallelize(built.module, plan, loss_fn=lm_loss64, example_inputs=built.example_inputs,
                     optimizer_fn=make_sgd, lr_scheduler_fn=make_sched, max_grad_norm=MAX_GRAD_NORM)
    loader = pm.data_loader(dataset, shuffle=True, seed=7)
    loader.sampler.set_epoch(0)
    losses, norms, mine = [], [], []
    for x, idx in loader:
        losses.append(float(pm.train_step((x, x))))
        norms.append(float(pm.last_grad_norm))
        mine.append(idx.tolist())
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, {"dp_rank": pm.dp_rank, "indices": mine})
    out = {"losses": losses, "norms": norms, "lr": pm.optimizers[0].param_groups[0]["lr"], "rank_indices": every,
           "num_samples": n, "per_replica_batch": len(mine[0]) if mine else 0}
    full = pm.full_state_dict()
    if dist.get_rank() == 0:
        by_dp = {r["dp_rank"]: r["indices"] for r in every}
        steps = [sum((by_dp[d][s] for d in sorted(by_dp)), []) for s in range(len(mine))]
        batches = [(tokens[ix], tokens[ix]) for ix in steps]
        ref = _reference(ref_model, batches, lambda m, b: lm_loss64(m(b[0]), b[1]))
        out.update(_compare(full, ref, ref_model, losses))
        out["ref_norms"] = ref["norms"]
        out["ref_lr"] = ref["lr"]
    return out


def _export(pm, case: Case, tmpdir: str) -> dict:
    """Both formats; rank 0 loads each into a fresh one-process model (strict) and records it."""
    out = {}
    for suffix in (".safetensors", ".pt"):
        path = os.path.join(tmpdir, f"{case.name}{suffix}")
        pm.export_full_state_dict(path)
        if dist.get_rank() == 0:
            if suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(path)
            else:
                state = torch.load(path, weights_only=True)
            fresh = build_model(case.model, batch=8, dtype=torch.float64).module
            fresh.load_state_dict(state, strict=True)
            out[f"export{suffix}"] = {n: p.detach().clone() for n, p in fresh.state_dict().items()}
    return out


def _reference(model, batches, forward, held_out=None) -> dict:
    """One process: the same optimizer, scheduler, clipping and eval on the whole global batch."""
    opt = make_sgd(model.parameters())
    sched = make_sched(opt)
    losses, norms, evals = [], [], []
    for i, b in enumerate(batches):
        loss = forward(model, b)
        loss.backward()
        if i == 1 and held_out is not None:
            evals.append(_ref_eval(model, held_out))
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)))
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(float(loss))
    if held_out is not None:
        evals.append(_ref_eval(model, held_out))
    return {"losses": losses, "norms": norms, "lr": opt.param_groups[0]["lr"], "evals": evals}


@torch.no_grad()
def _ref_eval(model, batch) -> float:
    model.eval()
    try:
        return float(lm_loss64(model(batch[0]), batch[1]))
    finally:
        model.train()


def _compare(full: dict, ref: dict, ref_model, losses: list[float]) -> dict:
    names = [n for n, _ in ref_model.named_parameters()]
    sd = ref_model.state_dict()
    return {
        "ref_losses": ref["losses"],
        "loss_diff": max(abs(a - b) for a, b in zip(losses, ref["losses"], strict=True)),
        "missing_params": [n for n in names if n not in full],
        "param_diff": max((full[n] - sd[n]).abs().max().item() for n in names if n in full),
        "ref_state": {k: v.detach().clone() for k, v in sd.items()},
    }


def run_case(case: Case, tmpdir: str) -> dict:
    torch.manual_seed(SEED)
    built = build_model(case.model, batch=8, dtype=torch.float64)
    ref_model = copy.deepcopy(built.module)
    plan = make_plan(case.model, global_batch_size=8, **case.plan)
    runner = {"clip": run_clip_case, "dict": run_dict_case, "loader": run_loader_case}[case.kind]
    out = runner(case, built, plan, ref_model, tmpdir)
    out["name"] = case.name
    if dist.get_rank() == 0:  # tensors do not go to JSON: reduce the exports to their differences
        ref_state = out.pop("ref_state")
        for key in [k for k in out if k.startswith("export.")]:
            state = out.pop(key)
            out[key + "_diff"] = max((state[k] - ref_state[k]).abs().max().item() for k in ref_state)
            out[key + "_keys_equal"] = sorted(state) == sorted(ref_state)
    return out


def main() -> None:
    args = start()
    if dist.get_world_size() != WORLD:
        raise SystemExit(f"loop_cases.py runs on {WORLD} processes")
    tmpdir = os.path.dirname(os.path.abspath(args.out))
    cases = {c.name: c for c in _cases() if not args.only or c.name in args.only}
    finish(run_cases(cases, lambda n: run_case(cases[n], tmpdir)), args.out)


if __name__ == "__main__":
    main()
