"""Training entry point: run a Plan under torchrun.

    torchrun --nproc-per-node N [--max-restarts R] -m runtime.launch PLAN --model REF [--steps K
        --lr 3e-4 --seed 0 --checkpoint-dir D --checkpoint-every K --resume --resume-from CKPT
        --data pkg.mod:fn --log-file F --timeout-s T --skip-nonfinite]

Multi-node: the same command on every node with `--nnodes M --node-rank I --rdzv-backend c10d
--rdzv-endpoint HOST0:PORT` (see runtime/__init__.py); the plan's pp*dp*tp = M * N.

REF is a bundled model name or `package.module:factory` returning (module, example_inputs, loss_fn) or a
planner.models.BuiltModel (planner.models.build_model; without a loss it is refused). Data:
synthetic batches from the model's make_batch, batch k drawn from a generator seeded with
seed + k (so the data position is the step), or `--data pkg.mod:fn`, where
`fn(batch_size=, seed=)` yields (inputs, targets) global batches; on resume the first
`data_position` batches are skipped. Every rank draws the same global batch and trains on its
dp slice. `--meta-init` builds the model on the meta device and materialises only each
rank's shards (to_empty, then the model's init_weights(); torchvision's own initialisation for
its ResNet and ViT), for models larger than one rank's memory (`build_run_model`,
`meta_init_fn`; runtime/meta_init.py: tied parameters stay tied, pipeline stages split by torch.fx
are initialised through the model, ones split by torch.export are refused). A plan with ep > 1
refuses it before the process group exists (the experts are sharded from real weights).

Per step, rank 0 prints (and appends to --log-file as JSON lines): step, loss (mean over the
global batch), step_time_s, peak_memory_bytes (CUDA: max allocated; CPU: the process's peak
RSS), and `attempt` (torchrun's TORCHELASTIC_RESTART_COUNT), so a log shows which steps ran
in which attempt. The plan and world size are checked before the process group is created.

Faults: checkpoints are committed atomically and carry a sha256 per file (runtime/checkpoint.py).
Resuming (--resume, or a restarted attempt) verifies the newest committed checkpoint on every
rank (the files split over the ranks, the verdict agreed) and falls back to the newest intact
one, naming the damaged files; with none intact (or a damaged --resume-from) the job stops with
one line. A non-finite loss or gradient norm (NonFiniteGuard: one all-reduced flag per step,
checked before the optimizer applies the step) stops the run with one line naming the step, exit
code 3, before anything is saved; --skip-nonfinite skips such steps instead (gradients dropped,
no optimizer step; counted in the log and reported at the end). Before the process group
exists: --resume needs a directory holding a committed checkpoint, --checkpoint-dir must be
writable, --log-file must open (specs.launch_args: the options and these checks, shared with
`autoplan run`, which makes them before it starts torchrun). A dataset that runs out or raises
ends with one line (exit 2); SIGINT
(Ctrl-C, which torchrun forwards) ends the job with one line per node and exit 130, no traceback
from the workers. Under torchrun
each worker dies with its launcher (Linux PR_SET_PDEATHSIG; elsewhere a thread watching the
parent pid), so a SIGKILLed torchrun leaves no worker training. Under `torchrun
--max-restarts R` a restarted attempt (TORCHELASTIC_RESTART_COUNT > 0) resumes from the newest
committed checkpoint in --checkpoint-dir by itself, so at most --checkpoint-every steps are
redone and none are lost. The group's timeout (--timeout-s) bounds how long a rank waits for a
dead or hung peer; a failed collective ends the rank with exit code 1 and one line naming the
timeout and the likely cause (no barrier at teardown then, which would wait again).
Fault injection for tests, first attempt only: --fault-kill-at-step S (rank --fault-rank
SIGKILLs itself before step S), --fault-kill-in-save S (rank 0 SIGKILLs itself after the
shards of step S's checkpoint are written, before the commit), --fault-hang-at-step S (rank
--fault-rank sleeps forever before step S), --fault-nan-at-step S (rank --fault-rank's loss of
step S becomes NaN).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import itertools
import json
import math
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from planner.models import BuiltModel, build_model
from runtime.mesh import validate_world
from runtime.meta_init import MetaInit
from runtime.parallelize import parallelize
from specs import Plan, SpecError
from specs.launch_args import (
    DTYPES,
    add_launch_arguments,
    missing_loss_error,
    open_log_file,
    validate_launch_args,
    validate_launch_paths,
    validate_launch_plan,
)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
assert tuple(_DTYPES) == DTYPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """runtime.launch's options: specs.launch_args's (shared with `autoplan run`) plus fault injection."""
    ap = argparse.ArgumentParser(prog="runtime.launch", description="Train a model under a Plan (run with torchrun).")
    add_launch_arguments(ap)
    fault = ap.add_argument_group("fault injection (tests; first torchrun attempt only)")
    fault.add_argument("--fault-kill-at-step", type=int, default=None, metavar="S")
    fault.add_argument("--fault-kill-in-save", type=int, default=None, metavar="S")
    fault.add_argument("--fault-hang-at-step", type=int, default=None, metavar="S")
    fault.add_argument("--fault-nan-at-step", type=int, default=None, metavar="S")
    fault.add_argument("--fault-rank", type=int, default=1, help="rank that kills itself / hangs")
    args = ap.parse_args(argv)
    validate_launch_args(args)
    return args


class PeerFailure(RuntimeError):
    """A collective failed: a peer rank died, hung past the timeout, or the network broke."""


class AgreedStop(SpecError):
    """Every rank stops with this same message, decided by a collective (a damaged checkpoint
    found by agreed_verdict): local rank 0 prints it, once per node, before any rank exits."""

    printed = False


class NonFiniteStep(Exception):  # noqa: N818 - a stop, not an error of ours
    """Every rank agreed that a step's loss or gradient norm is not finite (exit code 3); printed
    like AgreedStop."""

    printed = False


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt
    """SIGINT arrived (Ctrl-C; torchrun forwards it to its workers); carries where training was
    for the one line printed. SIGTERM keeps its default: torchrun sends it to the survivors of a
    failed worker, whose own line is the one that matters."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.where = ""


def _on_sigint(signum, frame) -> None:
    """First SIGINT: unwind with Interrupted; later ones are ignored so the unwinding (and its
    one line) is not interrupted again."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Interrupted(signum)


def _die_with_launcher() -> None:
    """Make this worker end when its parent (torchrun's agent) dies, even by SIGKILL, so no
    orphan keeps training and writing checkpoints. Linux: prctl(PR_SET_PDEATHSIG, SIGKILL);
    elsewhere a daemon thread polls os.getppid() once a second."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0:  # 1 = PR_SET_PDEATHSIG (linux/prctl.h)
                if os.getppid() != parent:  # the launcher died before the call
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-launcher", daemon=True).start()


def _local_rank_zero() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0"


def _say(line: str) -> None:
    """A line every rank would print alike: printed once per node."""
    if _local_rank_zero():
        print(line, file=sys.stderr, flush=True)


class NonFiniteGuard:
    """Catches a step whose loss or gradients are not finite before the optimizer applies it.

    The loss function is wrapped to record, per micro-batch and without a device sync, whether this
    rank's loss was finite. Each optimizer's `step` is wrapped: its first call in a training step
    adds the local gradient shards' squared norms (float64), all-reduces (MAX) the two flags over
    the world, so every rank reaches the same verdict, and then either steps as usual or drops the
    gradients and does not step. Under a loss scaler (fp16) the scaler already skips overflowing
    steps; `install` is then not called and only the returned loss is checked.
    """

    def __init__(self, device: torch.device, *, nan_at_step: int | None = None):
        self.device = device
        self.nan_at_step = nan_at_step
        self.step = 0
        self.verdict: str | None = None  # "loss" | "gradient norm" | None
        self._decided = False
        self._bad_loss: torch.Tensor | None = None
        self._params: list[torch.Tensor] = []

    def watch_loss(self, loss_fn):
        def watched(outputs, targets):
            loss = loss_fn(outputs, targets)
            if self.nan_at_step == self.step:
                loss = loss * float("nan")
            local = loss.to_local() if isinstance(loss, DTensor) else loss
            bad = ~torch.isfinite(local.detach()).all()
            self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad
            return loss
        return watched

    def install(self, optimizers: list[torch.optim.Optimizer]) -> None:
        for opt in optimizers:
            self._params.extend(p for g in opt.param_groups for p in g["params"])
            opt.step = self._guarded(opt, opt.step)

    def begin_step(self, step: int) -> None:
        self.step, self.verdict, self._decided, self._bad_loss = step, None, False, None

    def _decide(self) -> None:
        norms = [torch.linalg.vector_norm(g.to_local() if isinstance(g, DTensor) else g).to(torch.float64)
                 for p in self._params if (g := p.grad) is not None]
        sumsq = torch.stack(norms).square().sum() if norms else torch.zeros((), dtype=torch.float64)
        bad_loss = self._bad_loss if self._bad_loss is not None else torch.zeros((), dtype=torch.bool)
        flags = torch.stack([bad_loss.to(self.device, torch.float32),
                             (~torch.isfinite(sumsq)).to(self.device, torch.float32)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        loss_flag, grad_flag = flags.tolist()
        self.verdict = "loss" if loss_flag else "gradient norm" if grad_flag else None
        self._decided = True

    def _guarded(self, opt: torch.optim.Optimizer, step):
        def guarded_step(*args, **kwargs):
            if not self._decided:
                self._decide()
            if self.verdict is None:
                return step(*args, **kwargs)
            opt.zero_grad(set_to_none=True)  # the step is not applied
            return None
        return guarded_step


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
        try:
            batches = iter(fn(batch_size=batch_size, seed=args.seed))
        except Exception as e:  # the user's factory failed: one line, not a traceback per rank
            raise SpecError(f"--data {args.data}: the dataset factory raised {_first_line(e)}") from None
        return itertools.islice(batches, start, None)

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


def _check_launch(args) -> None:
    """What can be checked before any process group exists (and before training starts): the same
    checks `autoplan run` makes before it starts torchrun (specs.launch_args)."""
    validate_launch_paths(args)


def _open_log(args):
    """Rank 0's log file, opened before training so a bad path fails first."""
    if not args.log_file or os.environ.get("RANK", "0") != "0":
        return None
    return open_log_file(args.log_file)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.from_file(args.plan)
    validate_world(plan, int(os.environ.get("WORLD_SIZE", "1")))  # before the process group exists
    validate_launch_plan(args, plan)
    _check_launch(args)
    log = _open_log(args)
    try:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        _init_process_group("nccl" if cuda else "gloo", timedelta(seconds=args.timeout_s))
        return _run(args, plan, log)
    finally:
        if log:
            log.close()


def _run(args, plan: Plan, log) -> int:
    clean = False
    try:
        rc = _train(args, plan, log)
        clean = True
        return rc
    except (AgreedStop, NonFiniteStep) as e:  # every rank is here, by one agreed verdict
        _say(f"runtime.launch: error: {e}")
        e.printed = True
        with contextlib.suppress(Exception):
            dist.barrier()  # no rank exits (and gets the others killed by torchrun) before the line is out
        raise
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


def _checkpoints() -> ModuleType:
    """runtime.checkpoint, imported where a run saves or loads one (it imports torch's checkpoint
    package, ~0.3 s CPU per process that needs none)."""
    from runtime import checkpoint

    return checkpoint


def _choose_checkpoint(args) -> Path | None:
    """The checkpoint to load, verified on every rank with one agreed verdict (a collective)."""
    if args.resume_from:
        verdict = _checkpoints().agreed_verdict(args.resume_from)
        if not verdict.intact:
            raise AgreedStop(f"--resume-from {args.resume_from}: the checkpoint is damaged: {verdict.summary()}")
    elif args.checkpoint_dir and (args.resume or _attempt() > 0):
        verdict, rejected = _checkpoints().select_resume_checkpoint(args.checkpoint_dir)
        if verdict is None and rejected:
            damaged = "; ".join(f"{v.path.name}: {v.summary(1)}" for v in rejected[:3])
            raise AgreedStop(f"--checkpoint-dir {args.checkpoint_dir}: no intact checkpoint to resume from, "
                             f"all {len(rejected)} committed ones are damaged ({damaged})")
        for v in rejected:
            _say(f"runtime.launch: checkpoint {v.path} is damaged, not loaded: {v.summary()}")
        if verdict is not None and rejected:
            _say(f"runtime.launch: falling back to the newest intact checkpoint, {verdict.path}")
    else:
        return None
    if verdict is None:  # a restarted attempt before the first save
        return None
    if not verdict.checksummed:
        _say(f"runtime.launch: note: {verdict.path} has no checksums (written before manifests); loaded unverified")
    return verdict.path


def _next_batch(args, data, step: int, data_pos: int):
    try:
        return next(data)
    except StopIteration:
        raise SpecError(f"--data {args.data}: the dataset ran out after {data_pos} batches; step {step} of "
                        f"--steps {args.steps} needs another (ask for fewer steps or a longer dataset)") from None
    except Exception as e:  # the user's dataset failed: one line on every rank, not a traceback each
        raise SpecError(f"--data {args.data}: the dataset raised {_first_line(e)} reading batch {data_pos + 1} "
                        f"(step {step}); fix the dataset factory") from None


def _first_line(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def build_run_model(ref: str, *, batch: int, dtype: torch.dtype,
                    meta_init: bool) -> tuple[BuiltModel, Callable[[nn.Module], None] | None]:
    """The model a run trains and, with --meta-init, how its materialised parts are initialised.

    Without --meta-init the model is built on the CPU (its weights are the ones trained). With it,
    on the meta device: no weights are allocated; parallelize shards the model, materialises each
    rank's part (to_empty) and initialises it with the returned init_fn (`meta_init_fn`). The
    example inputs move to the model's device, so the fingerprint check traces a meta model with
    meta inputs (the tracer refuses to mix meta and CPU tensors) and the pipeline split never
    allocates a batch.

    Returns:
        (built model, init_fn); init_fn is None without --meta-init.
    Raises:
        SpecError: no loss, or --meta-init for a model it cannot initialise (`meta_init_fn`).
    """
    built = build_model(ref, batch=batch, device="meta" if meta_init else "cpu", dtype=dtype)
    if built.loss_fn is None:
        raise missing_loss_error(ref)
    if not meta_init:
        return built, None
    init_fn = meta_init_fn(built.module, ref)
    example = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in built.example_inputs)
    return replace(built, example_inputs=example), init_fn


def meta_init_fn(model: nn.Module, ref: str = "the model") -> MetaInit:
    """parallelize's init_fn for `model` built on meta with --meta-init (runtime.meta_init.MetaInit:
    ties re-bound, the model's own initialisation run through the whole model, pipeline stages
    split by torch.fx initialised through it, sharded parameters drawn as on one device).

    Raises:
        SpecError: a model with no initialisation known (here, when the run starts), or, when a
            part is initialised, pipeline stages split by torch.export.
    """
    return MetaInit(model, ref=ref, context="--meta-init", remedy="leave out --meta-init")


def _train(args, plan: Plan, log) -> int:
    rank = dist.get_rank()
    torch.manual_seed(args.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    batch = plan.train.global_batch_size
    built, init_fn = build_run_model(args.model, batch=batch, dtype=_DTYPES[args.dtype], meta_init=args.meta_init)
    nan_at = args.fault_nan_at_step if not _attempt() and rank == args.fault_rank else None
    guard = NonFiniteGuard(device, nan_at_step=nan_at)
    # Under a pipeline torch's schedule also calls the loss while it sets its stages up, on outputs
    # of uninitialised buffers (stage.py _backward_metadata_inference): a NaN that is no step's. The
    # guard then judges by the gradients (a non-finite loss gives non-finite gradients) and the
    # step's returned loss (--fault-nan-at-step, which injects through the watch, is pp = 1 only).
    loss_fn = guard.watch_loss(built.loss_fn) if plan.mesh.pp == 1 else built.loss_fn
    pm = parallelize(built.module, plan, loss_fn=loss_fn, example_inputs=built.example_inputs,
                     device=device, init_fn=init_fn, optimizer_kwargs={"lr": args.lr})
    if pm.precision.scaler is None:  # a scaler skips overflowing steps itself
        guard.install(pm.optimizers)
    start, data_pos = 0, 0
    ckpt = _choose_checkpoint(args)
    if ckpt is not None:
        pos = _checkpoints().load_checkpoint(pm, ckpt, verify=False)
        start, data_pos = pos["step"], pos["data_position"]
        if rank == 0:
            print(f"resumed from {ckpt} at step {start} (attempt {_attempt()})", flush=True)
    if rank == 0:
        print(f"plan: {plan}  world={dist.get_world_size()}  model={args.model}", flush=True)
        for note in pm.notes:
            print(f"note: {note}", flush=True)
    data = _data_iter(args, batch, built, data_pos)
    saved = start if ckpt is not None and not args.resume_from else None
    last_saved = ckpt
    skipped: list[int] = []

    def before_commit(step: int):
        if args.fault_kill_in_save == step and not _attempt() and rank == 0:
            return lambda: _kill_self(f"after writing checkpoint step {step}, before its commit")
        return None

    step = start
    try:
        for step in range(start, args.steps):
            _inject_step_faults(args, step + 1)
            x, y = _next_batch(args, data, step + 1, data_pos)
            data_pos += 1
            x, y = (t.to(device) for t in (x, y))
            if x.is_floating_point():
                x = x.to(_DTYPES[args.dtype])
            if y.is_floating_point():
                y = y.to(_DTYPES[args.dtype])
            guard.begin_step(step + 1)
            loss = pm.train_step(pm.local_batch(x, y))
            value = float(loss)
            what = guard.verdict or (None if math.isfinite(value) else "loss")
            if what is not None and (not args.skip_nonfinite or guard.verdict is None):
                applied = "" if guard.verdict else " (the optimizer had applied it: no flag was raised before)"
                raise NonFiniteStep(
                    f"step {step + 1}: non-finite {what} ({'' if what == 'loss' else 'loss '}{value}){applied}; "
                    f"stopped before saving anything "
                    f"of it (last checkpoint: {last_saved or 'none'}). Pass --skip-nonfinite to skip such steps")
            rec = {"step": step + 1, "loss": value if what is None else None,
                   "step_time_s": round(pm.last_step_time_s, 6),
                   "peak_memory_bytes": _peak_memory_bytes(device), "attempt": _attempt()}
            if what is not None:
                skipped.append(step + 1)
                rec["skipped"] = f"non-finite {what}"
                _say(f"runtime.launch: step {step + 1}: non-finite {what}: step skipped (--skip-nonfinite; "
                     f"{len(skipped)} skipped so far)")
            if rank == 0:
                print(json.dumps(rec), flush=True)
                if log:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
            every = args.checkpoint_every
            if args.checkpoint_dir and ((every and (step + 1) % every == 0) or step + 1 == args.steps):
                last_saved = _checkpoints().save_checkpoint(pm, args.checkpoint_dir, step=step + 1, data_position=data_pos,
                                             before_commit=before_commit(step + 1))
                saved = step + 1
        if args.checkpoint_dir and saved != args.steps:  # e.g. loaded from elsewhere: save under this plan
            last_saved = _checkpoints().save_checkpoint(pm, args.checkpoint_dir, step=args.steps, data_position=data_pos)
    except Interrupted as e:
        e.where = f"during step {step + 1} (last checkpoint: {last_saved or 'none'})"
        raise
    if skipped:
        _say(f"runtime.launch: skipped {len(skipped)} step(s) with a non-finite loss or gradient norm: {skipped}")
    return 0


def _exit(line: str | None, code: int) -> None:
    if line is not None:
        print(f"runtime.launch: {line}", file=sys.stderr, flush=True)
    sys.exit(code)


if __name__ == "__main__":
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: end with it
        _die_with_launcher()
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        sys.exit(main())
    except (AgreedStop, NonFiniteStep) as e:  # printed once per node by _run where it could
        _exit(None if e.printed else f"error: {e}", 2 if isinstance(e, AgreedStop) else 3)
    except SpecError as e:  # the user's mistake: one clear line, no traceback
        _exit(f"error: {e}", 2)
    except PeerFailure as e:  # a fault, not a mistake: exit 1 so torchrun may restart the job
        _exit(f"error: {e}", 1)
    except Interrupted as e:  # one line per node, not a traceback per rank
        _exit(f"interrupted by {e} {e.where}".rstrip() if _local_rank_zero() else None, 128 + e.signum)
