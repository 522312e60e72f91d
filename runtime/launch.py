"""Training entry point: run a Plan under torchrun.

    torchrun --nproc-per-node N [--max-restarts R] -m runtime.launch PLAN --model REF [--steps K
        --lr 3e-4 --seed 0 --checkpoint-dir D --checkpoint-every K --resume --resume-from CKPT
        --data pkg.mod:fn --log-file F --timeout-s T]

Multi-node: the same command on every node with `--nnodes M --node-rank I --rdzv-backend c10d
--rdzv-endpoint HOST0:PORT` (see runtime/__init__.py); the plan's pp*dp*tp = M * N.

REF is a bundled model name or `package.module:factory` (planner.models.build_model). Data:
synthetic batches from the model's make_batch, batch k drawn from a generator seeded with
seed + k (so the data position is the step), or `--data pkg.mod:fn`, where
`fn(batch_size=, seed=)` yields (inputs, targets) global batches; on resume the first
`data_position` batches are skipped. Every rank draws the same global batch and trains on its
dp slice. `--meta-init` builds the model on the meta device and materialises only each
rank's shards (to_empty + init_weights), for models larger than one rank's memory.

Per step, rank 0 prints (and appends to --log-file as JSON lines): step, loss (mean over the
global batch), step_time_s, peak_memory_bytes (CUDA: max allocated; CPU: the process's peak
RSS), and `attempt` (torchrun's TORCHELASTIC_RESTART_COUNT), so a log shows which steps ran
in which attempt. The plan and world size are checked before the process group is created.

Faults: checkpoints are committed atomically (runtime/checkpoint.py). Under `torchrun
--max-restarts R` a restarted attempt (TORCHELASTIC_RESTART_COUNT > 0) resumes from the newest
committed checkpoint in --checkpoint-dir by itself, so at most --checkpoint-every steps are
redone and none are lost. The group's timeout (--timeout-s) bounds how long a rank waits for a
dead or hung peer; a failed collective ends the rank with exit code 1 and one line naming the
timeout and the likely cause (no barrier at teardown then, which would wait again).
Fault injection for tests, first attempt only: --fault-kill-at-step S (rank --fault-rank
SIGKILLs itself before step S), --fault-kill-in-save S (rank 0 SIGKILLs itself after the
shards of step S's checkpoint are written, before the commit), --fault-hang-at-step S (rank
--fault-rank sleeps forever before step S).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import resource
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from planner.models import build_model
from runtime.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from runtime.mesh import validate_world
from runtime.parallelize import parallelize
from specs import Plan, SpecError

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="runtime.launch", description="Train a model under a Plan (run with torchrun).")
    ap.add_argument("plan", help="plan file (YAML or JSON)")
    ap.add_argument("--model", required=True, help="bundled model name or package.module:factory")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="parameter dtype")
    ap.add_argument("--data", default=None, help="dataset factory package.module:fn(batch_size=, seed=)")
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir")
    ap.add_argument("--resume-from", default=None, help="continue from this checkpoint (a step_N directory)")
    ap.add_argument("--meta-init", action="store_true", help="build on the meta device, materialise shards only")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="collective timeout (a dead peer fails the job)")
    ap.add_argument("--log-file", default=None, help="append per-step JSON lines here (rank 0)")
    fault = ap.add_argument_group("fault injection (tests; first torchrun attempt only)")
    fault.add_argument("--fault-kill-at-step", type=int, default=None, metavar="S")
    fault.add_argument("--fault-kill-in-save", type=int, default=None, metavar="S")
    fault.add_argument("--fault-hang-at-step", type=int, default=None, metavar="S")
    fault.add_argument("--fault-rank", type=int, default=1, help="rank that kills itself / hangs")
    args = ap.parse_args(argv)
    for name in ("steps", "checkpoint_every"):
        if getattr(args, name) < 0:
            raise SpecError(f"--{name.replace('_', '-')}: must be >= 0 (got {getattr(args, name)})")
    if args.timeout_s <= 0:
        raise SpecError(f"--timeout-s: must be > 0 seconds (got {args.timeout_s})")
    if args.checkpoint_every and not args.checkpoint_dir:
        raise SpecError("--checkpoint-every needs --checkpoint-dir")
    return args


class PeerFailure(RuntimeError):
    """A collective failed: a peer rank died, hung past the timeout, or the network broke."""


def _attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _kill_self(what: str) -> None:
    print(f"fault injection: rank {dist.get_rank()} {what}: SIGKILL", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _inject_step_faults(args, step: int) -> None:
    """Faults before 1-based step `step`, first attempt only."""
    if _attempt() or dist.get_rank() != args.fault_rank:
        return
    if args.fault_kill_at_step == step:
        _kill_self(f"before step {step}")
    if args.fault_hang_at_step == step:
        print(f"fault injection: rank {dist.get_rank()} hangs before step {step}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


def _data_iter(args, batch_size: int, built, start: int):
    if args.data:
        mod_name, _, fn_name = args.data.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise SpecError(f"--data {args.data}: cannot load the dataset factory: {e}") from None
        return itertools.islice(iter(fn(batch_size=batch_size, seed=args.seed)), start, None)

    def synthetic():
        for k in itertools.count(start):
            yield built.make_batch(batch_size, torch.Generator().manual_seed(args.seed + k))

    return synthetic()


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _init_process_group(backend: str, timeout: timedelta) -> None:
    """init_process_group on torchrun's store, under a key prefix per restart attempt.

    After a restart, gloo sometimes read the peers' addresses of the dead attempt from the
    shared store ("Connection refused" in connectFullMesh, seen here under load); a prefix per
    TORCHELASTIC_RESTART_COUNT makes every attempt exchange fresh ones."""
    if "MASTER_ADDR" not in os.environ:  # not under torchrun: let torch report what is missing
        dist.init_process_group(backend, timeout=timeout)
        return
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"autoplan/attempt_{_attempt()}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.from_file(args.plan)
    validate_world(plan, int(os.environ.get("WORLD_SIZE", "1")))  # before the process group exists
    if args.resume and not args.checkpoint_dir:
        raise SpecError("--resume needs --checkpoint-dir")
    if args.resume_from and not (Path(args.resume_from) / "COMMITTED").is_file():
        raise SpecError(f"--resume-from {args.resume_from}: not a committed checkpoint (no COMMITTED marker)")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _init_process_group("nccl" if cuda else "gloo", timedelta(seconds=args.timeout_s))
    clean = False
    try:
        rc = _train(args, plan)
        clean = True
        return rc
    except SpecError:
        raise
    except Exception as e:  # a collective failed: say what and why, once, without a traceback
        if not isinstance(e, (RuntimeError, dist.DistError)):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise PeerFailure(
            f"rank {dist.get_rank()}: a collective failed ({type(e).__name__}: {first}); a peer rank "
            f"probably died or hung (collective timeout --timeout-s {args.timeout_s:g} s). Resume with "
            f"--resume from --checkpoint-dir, or run under torchrun --max-restarts N to restart by itself"
        ) from None
    finally:
        if clean:
            dist.barrier()  # FIELD-NOTES: without it a rank sometimes aborts at exit
        dist.destroy_process_group()


def _train(args, plan: Plan) -> int:
    rank = dist.get_rank()
    torch.manual_seed(args.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    batch = plan.train.global_batch_size
    built = build_model(args.model, batch=batch, device="meta" if args.meta_init else "cpu",
                        dtype=_DTYPES[args.dtype])
    example = built.example_inputs
    if args.meta_init:
        example = tuple(torch.zeros(x.shape, dtype=x.dtype) for x in example)
    pm = parallelize(built.module, plan, loss_fn=built.loss_fn, example_inputs=example, device=device,
                     optimizer_kwargs={"lr": args.lr})
    start, data_pos = 0, 0
    ckpt = Path(args.resume_from) if args.resume_from else None
    if ckpt is None and args.checkpoint_dir and (args.resume or _attempt() > 0):
        ckpt = latest_checkpoint(args.checkpoint_dir)
    if ckpt is not None:
        pos = load_checkpoint(pm, ckpt)
        start, data_pos = pos["step"], pos["data_position"]
        if rank == 0:
            print(f"resumed from {ckpt} at step {start} (attempt {_attempt()})", flush=True)
    if rank == 0:
        print(f"plan: {plan}  world={dist.get_world_size()}  model={args.model}", flush=True)
        for note in pm.notes:
            print(f"note: {note}", flush=True)
    log = open(args.log_file, "a") if args.log_file and rank == 0 else None
    data = _data_iter(args, batch, built, data_pos)
    saved = start if ckpt is not None and not args.resume_from else None

    def before_commit(step: int):
        if args.fault_kill_in_save == step and not _attempt() and rank == 0:
            return lambda: _kill_self(f"after writing checkpoint step {step}, before its commit")
        return None

    for step in range(start, args.steps):
        _inject_step_faults(args, step + 1)
        x, y = next(data)
        data_pos += 1
        x, y = (t.to(device) for t in (x, y))
        if x.is_floating_point():
            x = x.to(_DTYPES[args.dtype])
        if y.is_floating_point():
            y = y.to(_DTYPES[args.dtype])
        loss = pm.train_step(pm.local_batch(x, y))
        rec = {"step": step + 1, "loss": float(loss), "step_time_s": round(pm.last_step_time_s, 6),
               "peak_memory_bytes": _peak_memory_bytes(device), "attempt": _attempt()}
        if rank == 0:
            print(json.dumps(rec), flush=True)
            if log:
                log.write(json.dumps(rec) + "\n")
                log.flush()
        every = args.checkpoint_every
        if args.checkpoint_dir and ((every and (step + 1) % every == 0) or step + 1 == args.steps):
            save_checkpoint(pm, args.checkpoint_dir, step=step + 1, data_position=data_pos,
                            before_commit=before_commit(step + 1))
            saved = step + 1
    if args.checkpoint_dir and saved != args.steps:  # e.g. loaded from elsewhere: save under this plan
        save_checkpoint(pm, args.checkpoint_dir, step=args.steps, data_position=data_pos)
    if log:
        log.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SpecError as e:  # the user's mistake: one clear line, no traceback
        print(f"runtime.launch: error: {e}", file=sys.stderr)
        sys.exit(2)
    except PeerFailure as e:  # a fault, not a mistake: exit 1 so torchrun may restart the job
        print(f"runtime.launch: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
