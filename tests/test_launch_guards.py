"""runtime.launch's guards in one process (a one-rank gloo group, no torchrun):

- NonFiniteGuard: a finite step is applied; a NaN loss or an infinite gradient (with a finite
  loss) is caught before the optimizer applies it, the gradients are dropped and the parameters
  stay as they were; the verdict is per step;
- a dataset that runs out ends in one line naming the step, not a bare StopIteration.
The multi-rank behaviour (every rank agrees, the run stops or skips, nothing of the NaN state is
saved) is tested under torchrun in tests/test_reliability_faults.py.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from runtime.launch import NonFiniteGuard
from specs import SpecError
from tests.runtime_plans import make_plan

pytestmark = pytest.mark.tier2


def _setup(guard: NonFiniteGuard):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard.install([opt])
    loss_fn = guard.watch_loss(nn.functional.mse_loss)
    return model, opt, loss_fn


def _step(guard, model, opt, loss_fn, step, x):
    guard.begin_step(step)
    loss = loss_fn(model(x), torch.zeros(4, 2))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def test_finite_step_is_applied_and_nonfinite_ones_are_not(one_rank):
    guard = NonFiniteGuard(torch.device("cpu"), nan_at_step=2)
    model, opt, loss_fn = _setup(guard)
    w0 = model.weight.detach().clone()
    _step(guard, model, opt, loss_fn, 1, torch.ones(4, 3))
    assert guard.verdict is None and not torch.equal(model.weight, w0)
    w1 = model.weight.detach().clone()
    loss = _step(guard, model, opt, loss_fn, 2, torch.ones(4, 3))  # NaN injected into the loss
    assert loss.isnan() and guard.verdict == "loss"
    assert torch.equal(model.weight, w1) and model.weight.grad is None
    _step(guard, model, opt, loss_fn, 3, torch.ones(4, 3))
    assert guard.verdict is None and not torch.equal(model.weight, w1)


def test_infinite_gradient_with_a_finite_loss_is_caught(one_rank):
    guard = NonFiniteGuard(torch.device("cpu"))
    model, opt, loss_fn = _setup(guard)
    w0 = model.weight.detach().clone()
    guard.begin_step(1)
    loss = loss_fn(model(torch.ones(4, 3)), torch.zeros(4, 2))
    loss.backward()
    model.bias.grad[0] = float("inf")
    opt.step()
    assert torch.isfinite(loss) and guard.verdict == "gradient norm"
    assert torch.equal(model.weight, w0) and model.weight.grad is None


def three_batches(batch_size: int, seed: int):
    """A dataset of 3 gpt-tiny batches (vocab 128, sequence 32)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        tokens = torch.randint(0, 128, (batch_size, 33), generator=gen)
        yield tokens[:, :-1], tokens[:, 1:]


def test_dataset_that_runs_out_ends_in_one_line(tmp_path, monkeypatch):
    from runtime.launch import main

    plan = tmp_path / "plan.yaml"
    make_plan("gpt-tiny").to_file(plan)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    log = tmp_path / "log.jsonl"
    with pytest.raises(SpecError) as err:
        main([str(plan), "--model", "gpt-tiny", "--steps", "5", "--data", "tests.test_launch_guards:three_batches",
              "--log-file", str(log)])
    msg = str(err.value)
    assert "the dataset ran out after 3 batches; step 4 of --steps 5 needs another" in msg and "\n" not in msg
    assert len(log.read_text().splitlines()) == 3
    assert not dist.is_initialized()
