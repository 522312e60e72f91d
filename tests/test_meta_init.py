"""Tier 2: `runtime.launch --meta-init` for every bundled model (planner.models.list_models()).

What --meta-init does (runtime.launch.build_run_model, then runtime.parallelize): build the model
on the meta device, check it against the plan (block names, and the fingerprint traced with the
example inputs), shard it, materialise each rank's part (to_empty) and initialise it
(runtime.launch.meta_init_fn).

- Every model: the build allocates nothing (parameters, buffers and example inputs all on meta,
  at the plan's batch) and validate_model accepts it against a plan carrying the planner's own
  fingerprint (planner.api.trace_model, what `autoplan plan` records; marked slow above
  SLOW_PARAMS parameters). This is all a large model gets here: materialising gpt3-175b or
  llama3-405b is what --meta-init exists to avoid.
- Small models (under SMALL_PARAMS parameters), on one gloo rank: parallelize materialises and
  initialises the whole model (dp=1 has no data-parallel engine), then one training step (under
  TRAIN_PARAMS); and the same initialisation on FSDP2's DTensor shards (fully_shard over a
  one-rank mesh, what ZeRO-3 materialises). Either way every parameter and buffer leaves meta and
  is distributed like the model built on the CPU (a constant tensor equal, any other with its
  mean and std), and tied parameters stay tied.
- The launch itself: runtime.launch.main, one rank in this process, trains with --meta-init; a
  plan with ep > 1 is refused with one line before any process starts; and (tier 3, torchrun, 2
  processes, ~8 s) a pp=2 pipeline of a tied-embedding GPT trains with --meta-init.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from planner import cli
from planner.api import trace_model
from planner.models import build_model, list_models
from runtime import launch
from runtime.parallelize import parallelize, validate_model
from specs import SpecError
from specs.launch_args import validate_launch_plan
from tests.runtime_plans import make_plan

pytestmark = pytest.mark.tier2

SMALL_PARAMS = 100_000_000  # materialised here; larger ones stop before allocating
TRAIN_PARAMS = 20_000_000  # and trained one step (ResNet-50 and ViT-B/16 cost 2-5 s a step here)
SLOW_PARAMS = 10_000_000_000  # fingerprint checks of larger models are marked slow
BATCH = 2

_PARAMS = {name: sum(p.numel() for p in build_model(name, device="meta").module.parameters())
           for name in list_models()}
SMALL = [n for n in list_models() if _PARAMS[n] < SMALL_PARAMS]
_RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@functools.cache
def _planner_fingerprint(name: str) -> str:
    return trace_model(name, None).fingerprint


def _plan(name: str, module: torch.nn.Module, *, batch: int = BATCH, sharding: str = "none", **kw):
    """A plan carrying the fingerprint `autoplan plan` would record for `name`."""
    return make_plan(name, global_batch_size=batch, sharding=sharding, model=module,
                     fingerprint=_planner_fingerprint(name), **kw)


def _on_meta(built) -> list[str]:
    """Names of what is not on the meta device (parameters, buffers, example inputs)."""
    named = [*built.module.named_parameters(), *built.module.named_buffers(),
             *((f"example_inputs[{i}]", x) for i, x in enumerate(built.example_inputs))]
    return [n for n, t in named if t.device.type != "meta"]


# ------------------------------------------------------------------ every model, before allocating
PLAN_BATCH = 16  # a plan's batch: the example inputs are built at it, on meta too


@pytest.mark.parametrize("name", list_models())
def test_meta_build_allocates_nothing(name):
    built, _ = launch.build_run_model(name, batch=PLAN_BATCH, dtype=torch.float32, meta_init=True)
    assert _on_meta(built) == []
    assert built.example_inputs[0].shape[0] == PLAN_BATCH


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if _PARAMS[n] > SLOW_PARAMS else n
                                  for n in list_models()])
def test_meta_build_matches_the_plan(name):
    """validate_model as --meta-init calls it (meta model, meta inputs at the plan's batch) against
    the planner's fingerprint: two traces, 2-5 s for the largest models here (marked slow)."""
    built, _ = launch.build_run_model(name, batch=PLAN_BATCH, dtype=torch.float32, meta_init=True)
    plan = _plan(name, built.module, batch=PLAN_BATCH)
    assert validate_model(built.module, plan, built.example_inputs) == []  # no check skipped


# ------------------------------------------------------------------ small models, all the way
def _stats(t: torch.Tensor) -> tuple[float, float, float, float]:
    t = t.detach().double()
    return float(t.min()), float(t.max()), float(t.mean()), float(t.std()) if t.numel() > 1 else 0.0


def _check_like(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """`got` (materialised from meta) is drawn like `want` (built on the CPU)."""
    g, w = _stats(got), _stats(want)
    if w[0] == w[1]:  # a constant (zeros, ones, a mask of ones): the same constant
        assert g[0] == g[1] == w[0], (name, g, w)
        return
    n = want.numel()
    spread = w[3] / math.sqrt(n)
    assert abs(g[2] - w[2]) <= 6 * spread + 0.05 * abs(w[2]) + 1e-12, (name, "mean", g, w)
    assert abs(g[3] / w[3] - 1) <= 0.1 + 6 / math.sqrt(n), (name, "std", g, w)


def _check_initialised_like_cpu(name: str, model: torch.nn.Module) -> None:
    """Nothing left on meta, and every tensor drawn like the one of `name` built on the CPU."""
    got = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert [n for n, t in got.items() if t.is_meta] == []
    ref = build_model(name, device="cpu").module
    want = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    assert set(got) == set(want)
    for key, tensor in want.items():
        value = _full(got[key])
        if tensor.is_floating_point():
            assert torch.isfinite(value).all(), key
            _check_like(key, value, tensor)
        else:
            assert torch.equal(value, tensor), key


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


@pytest.mark.parametrize("name", SMALL)
def test_meta_init_materialises_initialises_and_trains(name, one_rank):
    """parallelize's route on one rank (no data-parallel engine at dp=1: the whole model is
    materialised), as runtime.launch takes it; then one step."""
    torch.manual_seed(0)
    built, init_fn = launch.build_run_model(name, batch=BATCH, dtype=torch.float32, meta_init=True)
    plan = _plan(name, built.module)
    pm = parallelize(built.module, plan, loss_fn=built.loss_fn, example_inputs=built.example_inputs,
                     device="cpu", init_fn=init_fn, optimizer_kwargs={"lr": 1e-3})
    assert pm.notes == [], pm.notes  # the fingerprint was checked
    _check_initialised_like_cpu(name, pm.module)
    if _PARAMS[name] < TRAIN_PARAMS:
        x, y = built.make_batch(BATCH, torch.Generator().manual_seed(0))
        assert math.isfinite(float(pm.train_step(pm.local_batch(x, y))))


@pytest.mark.parametrize("name", SMALL)
def test_meta_init_initialises_fsdp_shards(name, one_rank):
    """The initialisation runs on FSDP2's DTensor shards (what a ZeRO-3 plan materialises), here
    over a one-rank mesh."""
    torch.manual_seed(0)
    built, init_fn = launch.build_run_model(name, batch=BATCH, dtype=torch.float32, meta_init=True)
    model = built.module
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    model.to_empty(device="cpu")
    with torch.no_grad():
        init_fn(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    _check_initialised_like_cpu(name, model)


def test_meta_init_refuses_a_model_it_cannot_initialise():
    with pytest.raises(SpecError, match="--meta-init: .* has no init_weights"):
        launch.meta_init_fn(torch.nn.Sequential(torch.nn.Linear(2, 2)), "mine:model")


# ------------------------------------------------------------------ the launch
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", ["gpt-tiny", "resnet18"])
def test_launch_trains_with_meta_init(name, tmp_path, monkeypatch, capsys):
    """runtime.launch.main as torchrun would start it, one rank: a model with tied embeddings (to_empty
    unties them; the launch re-ties) and one initialised the torchvision way."""
    plan = _plan(name, build_model(name, device="meta").module)
    path = tmp_path / "plan.yaml"
    plan.to_file(path)
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert launch.main([str(path), "--model", name, "--steps", "2", "--meta-init"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "fingerprint not checked" not in out
    assert '"step": 2' in out, out


def test_tied_parameters_stay_tied():
    """to_empty gives each module its own new parameter; the launch's init_fn ties them again."""
    built, init_fn = launch.build_run_model("gpt-tiny", batch=BATCH, dtype=torch.float32, meta_init=True)
    model = built.module
    assert model.head.lm_head.weight is model.embed.tok.weight
    model.to_empty(device="cpu")
    assert model.head.lm_head.weight is not model.embed.tok.weight
    with torch.no_grad():
        init_fn(model)
    assert model.head.lm_head.weight is model.embed.tok.weight


def test_meta_init_with_expert_parallel_is_refused_before_starting(tmp_path, capsys):
    plan = make_plan("moe-gpt-tiny", global_batch_size=4, dp=2, sharding="zero3", ep=2)
    args = launch.parse_args(["plan.yaml", "--model", "moe-gpt-tiny", "--meta-init"])
    with pytest.raises(SpecError, match=r"--meta-init: the plan shards the experts \(mesh.ep=2\)"):
        validate_launch_plan(args, plan)
    validate_launch_plan(launch.parse_args(["plan.yaml", "--model", "moe-gpt-tiny"]), plan)
    path = tmp_path / "ep.yaml"
    plan.to_file(path)
    capsys.readouterr()
    assert cli.main(["run", str(path), "--model", "moe-gpt-tiny", "--meta-init", "--dry-run"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("autoplan run: error: --meta-init: the plan shards"), err


@pytest.mark.tier3
def test_launch_meta_init_under_a_pipeline(tmp_path):
    """torchrun, 2 processes, pp=2: each stage (an fx GraphModule holding the model's own modules)
    is initialised through the model's init_weights; the tied embedding spans both stages."""
    plan = _plan("gpt-tiny", build_model("gpt-tiny", device="meta").module, batch=4, pp=2,
                 num_micro_batches=2)
    path = tmp_path / "pp2.yaml"
    plan.to_file(path)
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "runtime.launch", str(path), "--model", "gpt-tiny", "--steps", "2", "--meta-init"]
    env = {k: v for k, v in os.environ.items() if k not in _RANK_ENV}
    env.update(PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"step": 2' in out.stdout and "fingerprint not checked" not in out.stdout
