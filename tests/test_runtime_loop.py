"""A user's own training loop on the runtime: batches of any structure, per-replica data, gradient
clipping by the global norm, LR schedulers, user-built optimizers, eval steps, full-state export.

Tier 1 (no process group): runtime.training's batch helpers, loader, clipping, export writer and
the pure refusals. Tier 3: ONE torchrun of 4 processes runs every case of tests/loop_cases.py
(start-up dominates on CPU); each case is one test asserting against the one-process reference
(float64): losses, parameters, gradient norms before clipping (and that clipping was active),
the scheduler's learning rate, eval losses on every rank, and the exported files.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from torch import nn

from planner.models import build_model
from runtime.parallelize import ParallelModel
from runtime.training import (
    batch_size,
    build_data_loader,
    clip_grad_norm_,
    pipeline_pair,
    save_state_dict,
    split_batch,
    validate_loop_options,
)
from specs import SpecError
from tests.loop_cases import LR, MAX_GRAD_NORM, STEPS, WORLD, _cases
from tests.runtime_plans import make_plan

ROOT = Path(__file__).resolve().parents[1]
CASES = {c.name: c for c in _cases()}
TOL = 1e-10
_RESULTS: dict[str, dict] = {}


# ------------------------------------------------------------------ tier 1: pure pieces
def test_split_batch_keeps_structure():
    Pair = namedtuple("Pair", "x y")
    batch = {"ids": torch.arange(8).view(4, 2), "nested": Pair(torch.arange(4), torch.zeros(4)),
             "scale": torch.tensor(2.0), "name": "demo"}
    parts = split_batch(batch, 2)
    assert len(parts) == 2 and batch_size(batch) == 4
    assert parts[1]["ids"].tolist() == [[4, 5], [6, 7]]
    assert isinstance(parts[0]["nested"], Pair) and parts[0]["nested"].x.tolist() == [0, 1]
    assert parts[0]["scale"] is batch["scale"] and parts[1]["name"] == "demo"  # no dim 0: passed along
    assert [t.tolist() for t in split_batch((torch.arange(4), torch.arange(4) * 2, torch.ones(4)), 4)[3]] == \
        [[3], [6], [1.0]]


def test_batch_errors_name_the_numbers():
    with pytest.raises(SpecError, match=r"disagree on the number of samples \(dim 0\): \[3, 4\]"):
        batch_size({"a": torch.zeros(4), "b": torch.zeros(3)})
    with pytest.raises(SpecError, match=r"6 samples do not split into num_micro_batches=4"):
        split_batch(torch.zeros(6), 4)


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(4))


def test_loader_gives_each_replica_its_own_samples():
    ds = torch.utils.data.TensorDataset(torch.arange(24))
    seen = []
    for rank in range(3):
        loader = build_data_loader(ds, num_replicas=3, rank=rank, batch_size=4, seed=5)
        loader.sampler.set_epoch(1)
        batches = [b[0].tolist() for b in loader]
        assert [len(b) for b in batches] == [4, 4]
        seen.append(sum(batches, []))
    assert sorted(sum(seen, [])) == list(range(24))  # disjoint, and the epoch covered once
    with pytest.raises(SpecError, match="IterableDataset"):
        build_data_loader(_Stream(), num_replicas=2, rank=0, batch_size=2)
    with pytest.raises(SpecError, match="sampler= is set by the replica sampler"):
        build_data_loader(ds, num_replicas=2, rank=0, batch_size=2, sampler=None)


def test_clip_matches_torch_in_one_process():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3).double(), nn.Linear(4, 3).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 4, dtype=torch.float64)
    a(x).pow(2).sum().backward()
    b(x).pow(2).sum().backward()
    ours = clip_grad_norm_(list(a.parameters()), list(a.parameters()), 0.5)
    ref = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
    assert ours.item() > 0.5 and math.isclose(ours.item(), ref.item(), rel_tol=1e-14)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_writer_round_trips_tied_weights(tmp_path, suffix):
    model = build_model("gpt-tiny", dtype=torch.float64).module  # embed.tok ties head.lm_head
    path = save_state_dict(model.state_dict(), tmp_path / f"m{suffix}")
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, weights_only=True)
    assert torch.equal(state["embed.tok.weight"], state["head.lm_head.weight"])
    fresh = build_model("gpt-tiny", dtype=torch.float64).module
    fresh.load_state_dict(state, strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    assert not list(tmp_path.glob("*.tmp"))


def test_loop_options_refused_with_one_line():
    plan, pp_plan = make_plan("gpt-tiny"), make_plan("gpt-tiny", pp=2)
    zero1 = make_plan("gpt-tiny", dp=2, sharding="zero1")
    fwd, loss, opt = (lambda m, b: m(b)), (lambda o, t: o), (lambda ps: torch.optim.SGD(ps, lr=1))
    ok = dict(loss_fn=loss, forward_fn=None, optimizer_fn=None, optimizer_kwargs=None)
    validate_loop_options(plan, **ok)
    cases = [
        (plan, dict(ok, loss_fn=None), "give loss_fn"),
        (plan, dict(ok, forward_fn=fwd), "not both"),
        (pp_plan, dict(ok, loss_fn=None, forward_fn=fwd), r"pipeline \(pp=2\) computes the loss on its last stage"),
        (plan, dict(ok, optimizer_fn=opt, optimizer_kwargs={"lr": 1}), "with optimizer_fn set them there"),
        (zero1, dict(ok, optimizer_fn=opt), "zero1 shards the optimizer with ZeroRedundancyOptimizer"),
    ]
    for p, kwargs, match in cases:
        with pytest.raises(SpecError, match=match):
            validate_loop_options(p, **kwargs)


def test_batch_contract_refusals_before_any_collective():
    plan = make_plan("gpt-tiny")
    pm = ParallelModel(plan, None, [nn.Identity()], [], None, loss_fn=lambda o, t: o.sum())
    with pytest.raises(SpecError, match=r"a dict batch \(keys input_ids, labels\) needs forward_fn"):
        pm.train_step({"input_ids": torch.zeros(2), "labels": torch.zeros(2)})
    with pytest.raises(SpecError, match="give loss_fn or forward_fn, not both"):
        pm.eval_step((torch.zeros(2), torch.zeros(2)), lambda o, t: o, forward_fn=lambda m, b: m(b))
    with pytest.raises(SpecError, match=r"with a pipeline \(pp=2\) a batch is \(inputs, targets\).*got a tuple of 3"):
        pipeline_pair((torch.zeros(2),) * 3, pp=2, what="train_step", forward_fn=False)
    with pytest.raises(SpecError, match="got forward_fn"):
        pipeline_pair((torch.zeros(2),) * 2, pp=2, what="eval_step", forward_fn=True)


# ------------------------------------------------------------------ tier 3: one launch of 4
def run_world(tmp: Path) -> dict[str, dict]:
    """Launch loop_cases.py once on WORLD processes; cache the per-case results."""
    if not _RESULTS:
        out = tmp / "loop_results.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
               str(ROOT / "tests" / "loop_cases.py"), "--out", str(out)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not out.exists():
            pytest.fail(f"torchrun ({WORLD} procs) failed, rc={proc.returncode}:\n{proc.stderr[-4000:]}")
        _RESULTS.update({r["name"]: r for r in json.loads(out.read_text())})
    return _RESULTS


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL * max(1.0, abs(b))


@pytest.mark.tier3
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xdist_group("loop4")) for n in CASES])
def test_loop_matches_single_process(name, tmp_path_factory):
    case = CASES[name]
    r = run_world(tmp_path_factory.mktemp("loop"))[name]
    assert "error" not in r, r.get("traceback", r.get("error"))
    assert r["missing_params"] == [], r["missing_params"]
    assert r["loss_diff"] <= TOL * max(1.0, max(abs(x) for x in r["ref_losses"])), (r["losses"], r["ref_losses"])
    assert r["param_diff"] <= TOL, f"max |param - reference| = {r['param_diff']:.3g}"
    # clipping was active on every step, and the norm before clipping is the one-process norm
    assert all(n > MAX_GRAD_NORM for n in r["ref_norms"]), r["ref_norms"]
    assert all(_close(a, b) for a, b in zip(r["norms"], r["ref_norms"], strict=True)), (r["norms"], r["ref_norms"])
    # the user's LambdaLR(1 / (1 + step)) stepped once per optimizer step
    assert r["lr"] == r["ref_lr"] == pytest.approx(LR / (1 + STEPS))
    if case.kind == "clip":
        assert r["optimizer"] == "SGD"
        assert _close(r["mid_eval"], r["ref_evals"][0]), (r["mid_eval"], r["ref_evals"])
        assert all(_close(e, r["ref_evals"][1]) for e in r["evals_on_ranks"]), (r["evals_on_ranks"], r["ref_evals"])
    if case.plan.get("pp", 1) > 1:
        assert "with a pipeline (pp=2) a batch is (inputs, targets)" in r["pp_dict_error"]
    if case.export:
        for suffix in (".safetensors", ".pt"):
            assert r[f"export{suffix}_keys_equal"], suffix
            assert r[f"export{suffix}_diff"] <= TOL, (suffix, r[f"export{suffix}_diff"])
    if case.kind == "loader":
        by_rank = r["rank_indices"]
        assert r["per_replica_batch"] == 8 // 2
        for step in range(STEPS):
            per_dp: dict[int, list] = {}
            for rank in by_rank:  # tp peers of a replica read the same samples
                assert per_dp.setdefault(rank["dp_rank"], rank["indices"][step]) == rank["indices"][step]
            seen = sum(per_dp.values(), [])
            assert len(seen) == len(set(seen)), "two replicas read the same sample"
        every = {i for rank in by_rank for step in rank["indices"] for i in step}
        assert every == set(range(r["num_samples"])), "the epoch is not covered once"
