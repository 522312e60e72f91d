"""Expert parallelism (runtime.expert_parallel) on MoE transformers against one process, all
cases inside ONE torchrun process group per world size:

    torchrun --standalone --nproc-per-node N tests/ep_cases.py --out results.json [--only a,b]

Each case builds a tiny MoE model in float64 (same seed on every rank) and hands it to
runtime.parallelize with a plan whose mesh.ep is the case's: parallelize applies EP over a
(pp, expert_dp, ep, tp) mesh (runtime.expert_parallel), then FSDP2 data parallelism over all dp
ranks (tensor-parallel attention or a pipeline where the case has them), trains STEPS steps of SGD, and
compares the losses and the gathered parameters with an identical copy trained alone on rank 0 on
the whole global batch.

The "cp-probe" case records what each path of torch's context parallelism does on CPU/gloo: the
errors they raise (test_context_parallel_does_not_run_on_cpu says why).
tests/test_expert_parallel.py launches this and asserts per case.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from planner.models import build_model  # noqa: E402
from runtime import parallelize  # noqa: E402
from tests.case_runner import finish, run_cases, start  # noqa: E402
from tests.runtime_plans import make_plan  # noqa: E402

STEPS = 3
SEED = 1234
LR = 0.1
BATCH = 8


@dataclass(frozen=True)
class EPCase:
    name: str
    world: int
    model: str
    ep: int
    sharding: str  # the non-expert parameters' FSDP2 sharding over all ranks (zero2 | zero3)
    num_micro_batches: int = 1
    tp: int = 1  # tensor parallel attention (experts whole on each tp rank)
    pp: int = 1  # pipeline stages (each stage's experts sharded over its ranks)
    schedule: str = "gpipe"
    virtual_stages: int = 1
    recompute: str = "none"  # activation checkpointing: the recomputation repeats the all-to-alls
    max_grad_norm: float | None = (
        None  # clipping by the global norm (expert DTensors on their own mesh)
    )


CASES = [
    EPCase("ep2-zero2-moe-gpt", 2, "moe-gpt-tiny", ep=2, sharding="zero2"),
    # sharding none: FSDP2's replicate for the experts (over expert_dp) and for the rest
    EPCase("ep2-dp2-none-moe-llama", 4, "moe-llama-tiny", ep=2, sharding="none"),
    EPCase("ep2-zero3-moe-llama", 2, "moe-llama-tiny", ep=2, sharding="zero3"),
    EPCase(
        "ep2-dp2-zero3-ckpt-clip-moe-gpt",
        4,
        "moe-gpt-tiny",
        ep=2,
        sharding="zero3",
        recompute="full",
        max_grad_norm=0.5,
    ),
    EPCase(
        "ep2-dp2-zero2-accum-moe-llama",
        4,
        "moe-llama-tiny",
        ep=2,
        sharding="zero2",
        num_micro_batches=2,
    ),
    EPCase("ep4-zero3-moe-llama", 4, "moe-llama-tiny", ep=4, sharding="zero3"),
    EPCase("ep2-tp2-zero3-moe-llama", 4, "moe-llama-tiny", ep=2, sharding="zero3", tp=2),
    EPCase(
        "ep2-pp2-zero3-1f1b-clip-moe-llama",
        4,
        "moe-llama-tiny",
        ep=2,
        sharding="zero3",
        pp=2,
        num_micro_batches=2,
        schedule="1f1b",
        max_grad_norm=0.5,
    ),
    # the schedules the planner picks with a pipeline: zero-bubble (backward split into input and
    # weight passes around the all-to-alls) and interleaved 1F1B (two chunks per rank)
    EPCase("ep2-pp2-none-gpipe-moe-llama", 4, "moe-llama-tiny", ep=2, sharding="none", pp=2,
           num_micro_batches=1, schedule="gpipe"),
    EPCase("ep2-pp2-zero2-zb-moe-llama", 4, "moe-llama-tiny", ep=2, sharding="zero2", pp=2,
           num_micro_batches=2, schedule="zero_bubble"),
    EPCase("ep2-pp2-zero3-interleaved-moe-gpt", 4, "moe-gpt-tiny", ep=2, sharding="zero3", pp=2,
           num_micro_batches=2, schedule="interleaved_1f1b", virtual_stages=2),
    # Hugging Face MoE models from small configs (their experts' forward replaced by the EP one)
    EPCase("ep2-zero3-hf-mixtral", 2, "hf/mixtral", ep=2, sharding="zero3"),
    EPCase("ep2-dp2-zero2-hf-qwen3_moe", 4, "hf/qwen3_moe", ep=2, sharding="zero2"),
    EPCase("ep2-zero2-hf-qwen2_moe", 2, "hf/qwen2_moe", ep=2, sharding="zero2"),
]

# Hugging Face configs: 2 layers, hidden 64, 4 experts, top-2; eager attention and experts (the
# default grouped_mm experts have no float64 kernel), no KV cache.
HF_MOE = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            intermediate_size=64,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            intermediate_size=64,
            moe_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            head_dim=16,
        ),
    ),
}
HF_SEQ = 16


def build_hf_moe(family: str):
    """(model, batches, block names) of a tiny Hugging Face MoE model in float64."""
    import transformers

    cfg_cls, model_cls, kwargs = HF_MOE[family]
    cfg = getattr(transformers, cfg_cls)(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
        attn_implementation="eager",
        experts_implementation="eager",
        **kwargs,
    )
    model = getattr(transformers, model_cls)(cfg).double()
    gen = torch.Generator().manual_seed(SEED)
    batches = []
    for _ in range(STEPS):
        t = torch.randint(0, cfg.vocab_size, (BATCH, HF_SEQ), generator=gen)
        batches.append((t, t))
    blocks = [
        "model.embed_tokens",
        *(f"model.layers.{i}" for i in range(cfg.num_hidden_layers)),
        "model.norm+lm_head",
    ]
    return model, batches, blocks


ATTENTION_TP = {
    "layers.*.attn.q_proj": "colwise",
    "layers.*.attn.k_proj": "colwise",
    "layers.*.attn.v_proj": "colwise",
    "layers.*.attn.o_proj": "rowwise",
}


def loss64(out, tokens: torch.Tensor) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.flatten(0, -2), tokens.flatten())


@contextlib.contextmanager
def _counting_sends():
    """Count this rank's expert dispatches (forwards and recomputations) inside the block."""
    from runtime.expert_parallel import _Dispatch

    calls: list[int] = []
    original = _Dispatch.send

    def send(self, *args):
        calls.append(1)
        return original(self, *args)

    _Dispatch.send = send
    try:
        yield calls
    finally:
        _Dispatch.send = original


def run_ep_case(case: EPCase) -> dict:
    torch.manual_seed(SEED)
    plan_kwargs: dict = {}
    if case.model.startswith("hf/"):
        model, batches, blocks = build_hf_moe(case.model.removeprefix("hf/"))
        plan_kwargs = dict(model=model, block_names=blocks)
        num_experts = (
            model.config.num_local_experts
            if hasattr(model.config, "num_local_experts")
            else model.config.num_experts
        )
    else:
        built = build_model(case.model, batch=BATCH, dtype=torch.float64)
        model = built.module
        gen = torch.Generator().manual_seed(SEED)
        batches = [built.make_batch(BATCH, gen) for _ in range(STEPS)]
        num_experts = model.cfg.num_experts
    ref_model = copy.deepcopy(model)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}

    world = dist.get_world_size()
    dp = world // (case.tp * case.pp)
    plan = make_plan(
        case.model,
        global_batch_size=BATCH,
        dp=dp,
        tp=case.tp,
        pp=case.pp,
        schedule=case.schedule,
        virtual_stages=case.virtual_stages,
        sharding=case.sharding,
        recompute=case.recompute,
        num_micro_batches=case.num_micro_batches,
        optimizer="sgd",
        ep=case.ep,
        **plan_kwargs,
    )
    if case.tp > 1:
        data = plan.model_dump(mode="json")
        data["tensor_parallel"]["styles"] = ATTENTION_TP
        plan = type(plan).from_dict(data)
    pm = parallelize(
        model,
        plan,
        loss_fn=loss64,
        example_inputs=(batches[0][0],),
        optimizer_kwargs={"lr": LR},
        max_grad_norm=case.max_grad_norm,
    )
    losses = [float(pm.train_step(pm.local_batch(*batches[0])))]
    with (
        _counting_sends() as sends
    ):  # after the first step (a pipeline's sets its stages up with a forward)
        losses += [float(pm.train_step(pm.local_batch(x, y))) for x, y in batches[1:]]
    sends_per_step = len(sends) / (STEPS - 1)
    expert_w = next(p for m in pm.modules for n, p in m.named_parameters() if ".experts." in n)
    local_experts = expert_w.to_local().shape[0]
    full = pm.full_state_dict()
    out = {
        "name": case.name,
        "world": world,
        "losses": losses,
        "sharded": [n for n in pm.notes if n.startswith("expert parallel")],
        "local_experts": local_experts,
        "num_experts": num_experts,
        "notes": pm.notes,
        "sends_per_step": sends_per_step,
    }
    if dist.get_rank() == 0:
        opt = torch.optim.SGD(ref_model.parameters(), lr=LR)
        ref_losses = []
        for x, y in batches:
            loss = loss64(ref_model(x), y)
            loss.backward()
            if case.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(ref_model.parameters(), case.max_grad_norm)
            opt.step()
            opt.zero_grad()
            ref_losses.append(loss.item())
        ref = {n: p.detach() for n, p in ref_model.named_parameters()}
        out["missing_params"] = [n for n in ref if n not in full]
        out["ref_losses"] = ref_losses
        out["loss_diff"] = max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True))
        out["param_diff"] = max(
            (full[n].double() - ref[n].double()).abs().max().item() for n in ref if n in full
        )
        out["expert_param_diff"] = max(
            (full[n].double() - ref[n].double()).abs().max().item()
            for n in ref
            if n in full and ".experts" in n
        )
        out["param_change"] = max((ref[n] - init[n]).abs().max().item() for n in ref)
        out["expert_param_change"] = max(
            (ref[n] - init[n]).abs().max().item() for n in ref if ".experts" in n
        )
    return out


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def run_cp_probe() -> dict:
    """What torch's context parallelism does on CPU in float64, by each of its attention paths:
    context_parallel on F.scaled_dot_product_attention(is_causal=True) with the default CPU kernel
    and with the math backend forced, and flex attention's backward (which its CP path needs).
    Records each error, or the max |diff| against one process if the SDPA path ever runs."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    torch.manual_seed(SEED)
    q, k, v = (torch.randn(2, 2, 8 * world, 8, dtype=torch.float64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    rec: dict = {"name": "cp-probe"}
    for key, backends in (("cp_error", None), ("cp_math_error", [SDPBackend.MATH])):
        qc, kc, vc = (t.clone() for t in (q, k, v))
        try:
            with context_parallel(
                mesh,
                buffers=[qc, kc, vc],
                buffer_seq_dims=[2, 2, 2],
                no_restore_buffers={qc, kc, vc},
            ):
                with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                    out = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True)
        except Exception as e:  # the finding this case records
            rec[key] = _first_line(e)
            continue
        from torch.distributed.tensor.experimental._attention import context_parallel_unshard

        (full,) = context_parallel_unshard(mesh, [out], [2])
        rec[key.replace("error", "max_diff")] = (full - ref).abs().max().item()
    qg = q.clone().requires_grad_()
    mask = create_block_mask(
        lambda b, h, i, j: i >= j, None, None, q.shape[2], q.shape[2], device="cpu"
    )
    try:
        flex_attention(qg, k, v, block_mask=mask).sum().backward()
    except Exception as e:
        rec["flex_backward_error"] = _first_line(e)
    return rec


def main() -> None:
    args = start()
    world = dist.get_world_size()
    by_name = {c.name: c for c in CASES if c.world == world}
    names = [n for n in [*by_name, "cp-probe"] if not args.only or n in args.only]
    finish(
        run_cases(names, lambda n: run_cp_probe() if n == "cp-probe" else run_ep_case(by_name[n])),
        args.out,
    )


if __name__ == "__main__":
    main()
