"""Pipeline cases run inside ONE torchrun launch per world size (start-up costs 3-8 s here):

    torchrun --standalone --nproc-per-node 4 tests/dist_pipeline_cases.py OUT.json [--only SUBSTR]

Each case trains 3 steps (AdamW, float64) with runtime.pipeline and compares with one process
(rank 0 runs the reference, same seed, same global batch, the same micro-batches accumulated with
weight 1/(dp * num_micro_batches), then broadcasts it): the loss of each step and every local
parameter and persistent buffer at the end. Rank 0 writes one JSON record per case, which
tests/test_pipeline_dist.py asserts. `cases(world)` lists the cases, so pytest knows them
without launching anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MODELS = ("gpt", "llama", "mlp", "resnet18")
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")
STEPS = 3


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    pp: int
    dp: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    micro_batch_size: int = 2
    num_micro_batches: int = 4
    checkpoint: bool = False
    dp_engine: str = "ddp"  # "ddp" | "fsdp" (FSDP2 fully_shard over the dp sub-mesh)
    sync_tied: bool = True  # False: negative control, must NOT match
    resync_tied: bool = False  # scramble the later tied copies, then runner.sync_tied_parameters()
    bad: str = ""  # "unknown_block" | "uncovered" | ...: must raise SpecError on every rank


def cases(world: int) -> list[Case]:
    out = []
    for model in MODELS:
        for sched in SCHEDULES:
            v = 2 if sched == "interleaved_1f1b" else 1
            out.append(Case(f"pp{world}-{sched}-{model}", model, pp=world, schedule=sched,
                            virtual_stages=v, num_micro_batches=2 * world))
    if world == 2:
        out.append(Case("pp2-zero_bubble-v2-gpt", "gpt", pp=2, schedule="zero_bubble", virtual_stages=2))
        out.append(Case("control-tied-unsynced-gpt", "gpt", pp=2, sync_tied=False))
        out.append(Case("pp2-zero_bubble-v2-resync_tied-gpt", "gpt", pp=2, schedule="zero_bubble",
                        virtual_stages=2, resync_tied=True))
        # Hugging Face GPT-2 (tied wte/lm_head): torch.fx fails, torch.export splits it.
        out.append(Case("pp2-1f1b-export-hf_gpt2", "hf_gpt2", pp=2))
        # 4 stages: export's split sends the attention mask (GPT-2) and the rotary cos/sin and
        # mask (Llama) from stage 0 to every later stage; pipeline_split carries them through.
        out.append(Case("pp2-interleaved_1f1b-v2-export-hf_gpt2", "hf_gpt2", pp=2,
                        schedule="interleaved_1f1b", virtual_stages=2))
        out.append(Case("pp2-interleaved_1f1b-v2-export-hf_llama", "hf_llama", pp=2,
                        schedule="interleaved_1f1b", virtual_stages=2))
        # An activation with a gradient carried over two stages, a model input carried to the last.
        out.append(Case("pp2-interleaved_1f1b-v2-export-skip", "export_skip", pp=2,
                        schedule="interleaved_1f1b", virtual_stages=2))
        out.append(Case("bad-unknown_block", "gpt", pp=2, bad="unknown_block"))
        out.append(Case("bad-uncovered", "gpt", pp=2, bad="uncovered"))
    if world == 4:
        out.append(Case("pp2xdp2-1f1b-gpt", "gpt", pp=2, dp=2, schedule="1f1b"))
        # DDP (torch 2.14, gloo) fails inside pipelining when a rank's stage runs backward
        # through a parameter twice per step: with 2 local stages (interleaved) or with
        # activation checkpointing, the 2nd step raises in Reducer._rebuild_buckets ("rebuilt
        # parameter indices size is not same"); static_graph=True runs but gives WRONG
        # gradients. FSDP2 is the dp engine for those cases.
        out.append(Case("pp2xdp2-interleaved_1f1b-fsdp-llama", "llama", pp=2, dp=2,
                        schedule="interleaved_1f1b", virtual_stages=2, dp_engine="fsdp"))
        out.append(Case("pp2xdp2-zero_bubble-fsdp-gpt", "gpt", pp=2, dp=2, schedule="zero_bubble",
                        dp_engine="fsdp"))
        out.append(Case("pp4-1f1b-ckpt-gpt", "gpt", pp=4, num_micro_batches=8, checkpoint=True))
        out.append(Case("bad-ddp_interleaved", "llama", pp=2, dp=2, schedule="interleaved_1f1b",
                        virtual_stages=2, bad="ddp_interleaved"))
        out.append(Case("pp2xdp2-gpipe-ckpt-fsdp-gpt", "gpt", pp=2, dp=2, schedule="gpipe",
                        checkpoint=True, dp_engine="fsdp"))
        out.append(Case("pp4-1f1b-export-hf_llama", "hf_llama", pp=4))
    return out


# ---------------------------------------------------------------------------- models and data
class ExportSkip(torch.nn.Module):
    """Blocks a, b, c, d; h = a(x) is read again after c and x after d. torch.fx cannot trace it
    (a tensor built from a traced size), so torch.export splits it and the pipeline carries h
    (with its gradient) through stage 1 and x through stages 1 and 2."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (torch.nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        h = self.a(x) + torch.zeros(x.shape[0], 8, dtype=x.dtype)
        return self.d(torch.tanh(self.c(torch.tanh(self.b(h)))) + h) * x


def build(model: str):
    """(module, loss_fn, make_batch, block class to checkpoint); >= 8 blocks for pp4 x v2."""
    from planner.models import GPT_CONFIGS, LLAMA_CONFIGS, MLP, MLPConfig, Transformer
    from planner.models import build_model as _bm

    torch.manual_seed(0)
    if model in ("gpt", "llama"):
        cfg = replace((GPT_CONFIGS if model == "gpt" else LLAMA_CONFIGS)[f"{model}-tiny"], num_layers=6)
        m = Transformer(cfg).double()
        loss = _bm(f"{model}-tiny", device="meta").loss_fn

        def make_batch(b, gen):
            t = torch.randint(0, cfg.vocab_size, (b, cfg.seq_len), generator=gen)
            return t, t

        from planner.models.transformer import TransformerBlock as block
    elif model == "mlp":
        cfg = MLPConfig(num_layers=6)
        m = MLP(cfg).double()
        m.init_weights(0)
        loss = torch.nn.functional.mse_loss

        def make_batch(b, gen):
            return (torch.randn(b, cfg.in_features, generator=gen, dtype=torch.float64),
                    torch.randn(b, cfg.out_features, generator=gen, dtype=torch.float64))

        from planner.models.mlp import MLPBlock as block
    elif model == "export_skip":
        m = ExportSkip().double()
        loss = torch.nn.functional.mse_loss

        def make_batch(b, gen):
            return (torch.randn(b, 8, generator=gen, dtype=torch.float64),
                    torch.randn(b, 8, generator=gen, dtype=torch.float64))

        block = torch.nn.Linear
    elif model.startswith("hf_"):
        import transformers

        from tests.hf_models import SEQ, VOCAB, build_hf

        m, _ = build_hf(model)
        loss = _bm("gpt-tiny", device="meta").loss_fn

        def make_batch(b, gen):
            t = torch.randint(0, VOCAB, (b, SEQ), generator=gen)
            return t, t

        block = (transformers.models.gpt2.modeling_gpt2.GPT2Block if model == "hf_gpt2"
                 else transformers.models.llama.modeling_llama.LlamaDecoderLayer)
    else:
        import torchvision

        m = torchvision.models.resnet18(num_classes=10).double()
        loss = torch.nn.functional.cross_entropy

        def make_batch(b, gen):  # 32x32: layer4 is 1x1, still >1 value per BN channel at mb=2
            return (torch.randn(b, 3, 32, 32, generator=gen, dtype=torch.float64),
                    torch.randint(0, 10, (b,), generator=gen))

        from torchvision.models.resnet import BasicBlock as block
    return m, loss, make_batch, block


def batches(case: Case, make_batch):
    gen = torch.Generator().manual_seed(1)
    size = case.micro_batch_size * case.num_micro_batches * case.dp
    return [make_batch(size, gen) for _ in range(STEPS)]


def optimizer(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def reference(case: Case):
    """One process: every replica's micro-batches accumulated, weight 1/(dp * n_mb)."""
    m, loss_fn, make_batch, _ = build(case.model)
    init = {k: v.clone() for k, v in m.state_dict().items()}
    opt = optimizer(m.parameters())
    n = case.dp * case.num_micro_batches
    losses = []
    for x, y in batches(case, make_batch):
        total = 0.0
        for xm, ym in zip(x.chunk(n), y.chunk(n), strict=True):
            loss = loss_fn(m(xm), ym)
            (loss / n).backward()
            total += loss.item() / n
        opt.step()
        opt.zero_grad()
        losses.append(total)
    state = m.state_dict()
    change = max((state[k].double() - init[k].double()).abs().max().item() for k in state
                 if state[k].is_floating_point())
    return losses, {k: v.detach() for k, v in state.items()}, change


# ---------------------------------------------------------------------------- one case
class _SoftmaxCount(TorchDispatchMode):
    """Counts forward softmaxes (one per attention forward): recomputation runs them again.
    (Module forward hooks do not fire during checkpoint recomputation, so ops are counted.)"""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._softmax.default:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def run_case(case: Case, world_rank: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    from runtime.pipeline import build_pipeline
    from runtime.pipeline_split import clean_param_name
    from specs import SpecError, Stage
    from tests.hf_models import block_names as hf_block_names
    from tests.plan_builders import make_plan

    m, loss_fn, make_batch, block = build(case.model)
    plan = make_plan(case.model, pp=case.pp, dp=case.dp, schedule=case.schedule,
                     virtual_stages=case.virtual_stages, micro_batch_size=case.micro_batch_size,
                     num_micro_batches=case.num_micro_batches, model=m,
                     block_names=(hf_block_names(case.model) if case.model.startswith("hf_")
                                  else ["a", "b", "c", "d"] if case.model == "export_skip" else None),
                     recompute="full" if case.checkpoint else "none")
    mesh = init_device_mesh("cpu", (case.pp, case.dp), mesh_dim_names=("pp", "dp"))
    if case.bad:
        bad, bad_apply = plan, None
        if case.bad == "unknown_block":
            names = list(plan.model.block_names)
            names[3] = "layers.99"
            bad = plan.model_copy(update={"model": plan.model.model_copy(update={"block_names": names})})
        elif case.bad == "uncovered":
            # model_copy skips the Plan's validator, as a hand-edited model_construct plan would
            stages = [Stage(first=0, last=1), Stage(first=2, last=3)]  # blocks 4.. uncovered
            bad = plan.model_copy(update={"pipeline": plan.pipeline.model_copy(update={"stages": stages})})
        elif case.bad == "ddp_interleaved":  # DDP around stages of a 2-stages-per-rank schedule

            def bad_apply(stage):
                return DDP(stage, process_group=mesh["dp"].get_group())

        example = (make_batch(case.micro_batch_size, torch.Generator().manual_seed(2))[0],)
        try:
            build_pipeline(m, bad, mesh["pp"], loss_fn=loss_fn, device="cpu", apply_fn=bad_apply,
                           example_inputs=example)
        except SpecError as e:
            dist.barrier()  # every rank got here: nobody is left waiting on a peer
            return {"raised": "SpecError", "message": str(e)}
        return {"raised": None}

    def apply_fn(stage):
        if case.checkpoint:
            apply_activation_checkpointing(
                stage, checkpoint_wrapper_fn=lambda mod: checkpoint_wrapper(mod, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
                check_fn=lambda mod: isinstance(mod, block))
        if case.dp > 1 and case.dp_engine == "ddp":
            stage = DDP(stage, process_group=mesh["dp"].get_group())
        elif case.dp > 1:
            fully_shard(stage, mesh=mesh["dp"])
        return stage

    example = (make_batch(case.micro_batch_size, torch.Generator().manual_seed(2))[0],)
    runner = build_pipeline(m, plan, mesh["pp"], loss_fn=loss_fn, device="cpu", apply_fn=apply_fn,
                            example_inputs=example)
    del m
    if not case.sync_tied:
        runner.tied = []
    if case.resync_tied:  # as after materialising a meta model: copies initialised independently
        with torch.no_grad():
            for tp in runner.tied:
                for s in runner.stage_indices:
                    if s in tp.names and s != min(tp.names):
                        dict(runner.named_parameters())[tp.names[s]].normal_()
        runner.sync_tied_parameters()
    opt = optimizer(list(runner.parameters()))
    dp_rank = mesh["dp"].get_local_rank()
    local = case.micro_batch_size * case.num_micro_batches
    losses, t0 = [], time.perf_counter()
    counter = _SoftmaxCount() if case.checkpoint else contextlib.nullcontext()
    for x, y in batches(case, make_batch):
        xs, ys = x[dp_rank * local:(dp_rank + 1) * local], y[dp_rank * local:(dp_rank + 1) * local]
        with counter:
            loss = runner.step(xs, ys)
        if case.dp > 1:
            dist.all_reduce(loss, group=mesh["dp"].get_group())
            loss /= case.dp
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    step_s = (time.perf_counter() - t0) / STEPS

    ref = [None]
    if world_rank == 0:
        ref = [reference(case)]
    dist.broadcast_object_list(ref, group_src=0)
    ref_losses, ref_state, change = ref[0]
    param_diff, names = 0.0, []
    local_state = dict(runner.named_parameters())
    for mod in runner.stage_modules:
        for n, b in mod.named_buffers():
            local_state.setdefault(clean_param_name(n), b)
    for n, t in local_state.items():
        if isinstance(t, DTensor):
            t = t.full_tensor()  # collective over dp: every dp rank walks the same names
        if n in ref_state and t.is_floating_point():
            d = (t.detach() - ref_state[n]).abs().max().item()
            if d > 1e-6 and os.environ.get("PP_DEBUG"):
                print(f"[{world_rank}] {n}: {d}", file=sys.stderr)
            param_diff = max(param_diff, d)
            names.append(n)
    rec = {
        "losses": losses, "ref_losses": ref_losses,
        "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
        "param_diff": param_diff, "param_change": change, "compared": len(names),
        "step_s": step_s, "stages": runner.stage_indices, "tied": [t.names for t in runner.tied],
    }
    if case.checkpoint:
        rec["softmax_calls"] = counter.calls
        rec["blocks_local"] = sum(isinstance(s, block) for mod in runner.stage_modules for s in mod.modules())
    return rec


def main() -> None:
    import torch.distributed as dist

    out_path = sys.argv[1]
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else ""
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for case in cases(world):
        if only and only not in case.name:
            continue
        t0 = time.perf_counter()
        try:
            rec = run_case(case, rank)
        except Exception:
            rec = {"error": traceback.format_exc()}
            print(f"[rank {rank}] {case.name} failed:\n{rec['error']}", file=sys.stderr, flush=True)
        recs = [None] * world
        dist.all_gather_object(recs, rec)
        merged = {"ranks": recs, "wall_s": time.perf_counter() - t0}
        for key in ("loss_diff", "param_diff"):
            vals = [r.get(key) for r in recs if r and key in r]
            if vals:
                merged[key] = max(vals)
        results[case.name] = merged
        if rank == 0:
            print(f"{case.name}: {json.dumps({k: v for k, v in merged.items() if k != 'ranks'})}", flush=True)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1, default=str)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
