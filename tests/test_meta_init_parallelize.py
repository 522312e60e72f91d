"""`parallelize(model_on_meta, plan)` materialises exactly the model that the same model built on
the CPU would be (runtime/meta_init.py), on every path: equality, not likeness.

Each case builds a bundled model on meta (float64), runs it through parallelize with a plan
carrying its real fingerprint, and compares with the model built on the CPU and initialised from
the same RNG state (`torch.manual_seed(SEED); model.init_weights()`): every parameter equal, the
same number of parameters, tied parameters the same tensor where one rank holds both, then
STEPS AdamW steps whose losses and final parameters equal the one-process run's (float64).

- Tier 2, one gloo rank in this process: no data-parallel engine (dp=1), by the model's own
  init and by a user's init_fn (it wins; ties are re-bound before it runs); a model with no
  init_weights() is refused with one line.
- Tier 3, one torchrun per world size (2 and 4; this file is also the case script): DDP, zero1,
  FSDP2 zero2 and zero3, tensor parallel, a pp=2 pipeline (stages initialised through the model;
  the tie spans the stages), Hugging Face GPT-2 under zero3 (its init as its own class), FSDP2's
  replicate over pipeline stages, and tp x zero3 (each weight sharded over two mesh axes).

Before runtime/meta_init.py every case but the refusal failed: at dp=1, DDP and zero1 the run
trained 218,496 parameters instead of gpt-tiny's 210,304 (lm_head untied from the embedding;
max |param - one-device init| 0.11); under zero2/zero3 on a CPU mesh each rank drew its shard
from the same generator state (both halves of every weight equal; 0.14); the pp=2 cases failed
(a stage has no init_weights()).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":  # run by torchrun: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from planner.api import trace_model
from planner.models import build_model
from runtime.parallelize import parallelize
from specs import SpecError
from tests.runtime_plans import make_plan

ROOT = Path(__file__).resolve().parents[1]
SEED, STEPS, BATCH, LR = 1234, 2, 4, 1e-2
TOL = 1e-10  # float64: summation order differs between the parallel run and one process
# name -> (world size, model, plan options); one torchrun per world size runs its cases
CASES = {
    "ddp-gpt": (2, "gpt-tiny", dict(dp=2)),
    "zero1-gpt": (2, "gpt-tiny", dict(dp=2, sharding="zero1")),
    "zero2-gpt": (2, "gpt-tiny", dict(dp=2, sharding="zero2")),
    "zero3-gpt": (2, "gpt-tiny", dict(dp=2, sharding="zero3")),
    "tp2-gpt": (2, "gpt-tiny", dict(tp=2, tp_styles="gpt")),
    "pp2-gpt": (2, "gpt-tiny", dict(pp=2, num_micro_batches=2)),
    "zero3-hf-gpt2": (2, "hf-gpt2-tiny", dict(dp=2, sharding="zero3")),
    # FSDP2's replicate over dp on pipeline stages; tp x zero3 shards each weight over two mesh axes
    "pp2-dp2-replicate-gpt": (4, "gpt-tiny", dict(pp=2, dp=2, num_micro_batches=2)),
    "tp2-dp2-zero3-gpt": (4, "gpt-tiny", dict(tp=2, dp=2, sharding="zero3", tp_styles="gpt")),
}


def _loss64(out, target: torch.Tensor) -> torch.Tensor:
    """planner.models.lm_loss without its float32 cast (float64 runs compare to ~1e-15)."""
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.flatten(0, -2), target.flatten())


def _init_as_one_device(model: torch.nn.Module) -> None:
    """The model's init_weights() from SEED (Hugging Face's skips modules it marked initialised)."""
    for m in model.modules():
        m.__dict__.pop("_is_hf_initialized", None)
    torch.manual_seed(SEED)
    with torch.no_grad():
        model.init_weights()


def _num_params(modules) -> int:
    """Parameters this rank holds (a DTensor's local shard), each tensor once."""
    seen = {id(p): p for m in modules for p in m.parameters()}
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in seen.values())


def _ties_kept(ref: torch.nn.Module, modules) -> list[bool]:
    """For each tie of `ref` (lm_head and the embedding) whose two names a local module holds:
    whether they are one tensor there (a pipeline keeps one copy per stage, tied by the runner)."""
    first: dict[int, str] = {}
    ties = []
    for name, p in ref.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties.append((name, first[id(p)]))
        first.setdefault(id(p), name)
    out = []
    for m in modules:
        params = dict(m.named_parameters(remove_duplicate=False))
        out += [params[a] is params[b] for a, b in ties if a in params and b in params]
    return out


def run_case(name: str, model_name: str, plan_kw: dict, init_fn=None) -> dict:
    """parallelize on meta vs the one-process run, on every rank; rank 0's record is complete."""
    ref = build_model(model_name, batch=BATCH, dtype=torch.float64).module
    if init_fn is None:
        _init_as_one_device(ref)
    else:
        with torch.no_grad():
            init_fn(ref)
    built = build_model(model_name, batch=BATCH, dtype=torch.float64, device="meta")
    for m in (*ref.modules(), *built.module.modules()):  # GPT-2's dropout draws per rank's batch
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    fingerprint = trace_model(ref, [torch.zeros(1, built.example_inputs[0].shape[1], dtype=torch.long)]).fingerprint
    plan = make_plan(model_name, global_batch_size=BATCH, model=built.module, fingerprint=fingerprint, **plan_kw)
    torch.manual_seed(SEED)
    pm = parallelize(built.module, plan, loss_fn=_loss64, example_inputs=built.example_inputs, device="cpu",
                     init_fn=init_fn, optimizer_kwargs={"lr": LR})
    inner = [getattr(m, "module", m) for m in pm.modules]
    at_init = {k: v.clone() for k, v in pm.full_state_dict().items()}  # views of the live tensors at dp=1
    gen = torch.Generator().manual_seed(SEED)
    batches = [built.make_batch(BATCH, gen) for _ in range(STEPS)]
    losses = [float(pm.train_step(pm.local_batch(x, y))) for x, y in batches]
    final = pm.full_state_dict()
    local_params = [None] * dist.get_world_size()
    dist.all_gather_object(local_params, _num_params(inner))
    out = {"name": name, "notes": pm.notes, "tied_on_a_rank": _ties_kept(ref, inner),
           "local_params": local_params, "ref_params": _num_params([ref]), "losses": losses}
    if dist.get_rank() == 0:
        want = {k: v.detach().clone() for k, v in ref.state_dict().items()}
        opt = torch.optim.AdamW(ref.parameters(), lr=LR)
        ref_losses = []
        for x, y in batches:
            loss = _loss64(ref(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            ref_losses.append(loss.item())
        trained = ref.state_dict()
        out.update(
            ref_losses=ref_losses,
            missing=sorted(set(want) - set(at_init)),
            init_diff=max(float((at_init[k] - v).abs().max()) for k, v in want.items() if k in at_init),
            final_diff=max(float((final[k] - v).abs().max()) for k, v in trained.items() if k in final),
        )
    return out


def _check(r: dict, plan_kw: dict) -> None:
    assert "error" not in r, r.get("traceback", r.get("error"))
    assert r["notes"] == [], r["notes"]  # the fingerprint was checked
    assert r["missing"] == [], r["missing"]
    assert r["init_diff"] == 0.0, f"max |param - one-device init| = {r['init_diff']:.3g}"
    pipeline = plan_kw.get("pp", 1) > 1  # the tie spans the stages: one copy each
    assert all(r["tied_on_a_rank"]) and (pipeline or r["tied_on_a_rank"]), "lm_head and the embedding are two tensors"
    if pipeline or plan_kw.get("tp", 1) > 1 or plan_kw.get("sharding") in ("zero2", "zero3"):  # zero1: states
        assert max(r["local_params"]) < r["ref_params"], r
    else:
        assert r["local_params"] == [r["ref_params"]] * len(r["local_params"]), r
    assert max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"], strict=True)) <= TOL, r
    assert r["final_diff"] <= TOL, r["final_diff"]


# ------------------------------------------------------------------ tier 2: one rank, in process
@pytest.mark.tier2
def test_dp1_equals_the_cpu_model(one_rank):
    """No data-parallel engine: the whole model materialised, the tie kept, the init the model's."""
    _check(run_case("dp1-gpt", "gpt-tiny", {}), {})


@pytest.mark.tier2
def test_user_init_fn_wins_and_ties_stay(one_rank):
    def init_fn(m):
        m.init_weights(7)

    _check(run_case("dp1-gpt-init_fn", "gpt-tiny", {}, init_fn=init_fn), {})


@pytest.mark.tier2
def test_meta_model_without_init_is_refused(one_rank):
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    plan = make_plan("mlp", global_batch_size=2, model=model, block_names=["0"])
    with pytest.raises(SpecError, match=r"model on the meta device: .*Sequential.* has no init_weights\(\).*init_fn="):
        parallelize(model, plan, loss_fn=F.mse_loss, device="cpu")


# ------------------------------------------------------------------ tier 3: one torchrun
_RESULTS: dict[int, dict[str, dict]] = {}


def _run_world(world: int, tmp: Path) -> dict[str, dict]:
    if world not in _RESULTS:
        out = tmp / f"results{world}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               str(Path(__file__).resolve()), "--out", str(out)]
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not out.exists():
            pytest.fail(f"torchrun ({world} procs) failed, rc={proc.returncode}:\n{proc.stderr[-4000:]}")
        _RESULTS[world] = {r["name"]: r for r in json.loads(out.read_text())}
    return _RESULTS[world]


@pytest.mark.tier3
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xdist_group(f"meta_init{w}"))
                                  for n, (w, _, _) in CASES.items()])
def test_matches_the_cpu_model(name, tmp_path_factory):
    world, _, plan_kw = CASES[name]
    _check(_run_world(world, tmp_path_factory.mktemp(f"meta_init{world}"))[name], plan_kw)


def main() -> None:
    from tests.case_runner import finish, run_cases, start

    args = start()
    world = dist.get_world_size()
    names = [n for n, (w, _, _) in CASES.items() if w == world and (not args.only or n in args.only)]
    finish(run_cases(names, lambda n: run_case(n, *CASES[n][1:])), args.out)


if __name__ == "__main__":
    main()
