"""The options of one training launch, and the checks on them that need no model and no process group.

Two launchers read this one definition: `runtime.launch` (every worker, under torchrun) and
`autoplan run` (before it starts torchrun, so that a mistake costs one line and no processes).
It lives in specs because specs is the one package both may import (DESIGN.md: planner never
imports runtime). Plain argparse and stdlib; the model, the data and the plan are checked by the
callers, which can import them.

- `add_launch_arguments(parser)`: the options (PLAN, --model, --steps, ...), from one table.
- `launch_argv(args)`: parsed options back as runtime.launch's argv (what `autoplan run` passes on).
- `validate_launch_args(args)`: numbers in range, options that need one another. Pure.
- `validate_launch_plan(args, plan)`: options the plan cannot run with (--meta-init with ep > 1). Pure.
- `validate_launch_paths(args)`: what the file system must give before training starts: a committed
  checkpoint for --resume / --resume-from, a writable --checkpoint-dir. It creates --checkpoint-dir
  (training would) and writes and removes one empty probe file there.
- `open_log_file(path)`: --log-file opened for appending, or one line saying why not.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from specs._base import SpecError

if TYPE_CHECKING:
    from specs.plan import Plan

DTYPES = ("float32", "float64")

# runtime/checkpoint.py's layout (_STEP_DIR, COMMITTED): a checkpoint is a step_N folder holding a
# COMMITTED marker; tests/test_autoplan_run.py checks that both read a folder alike.
_STEP_DIR = re.compile(r"^step_(\d+)$")
_COMMITTED = "COMMITTED"
# torch.Generator.manual_seed accepts [-2**63, 2**64 - 1]; batch k is drawn with seed + k
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1

# (flags, argparse keywords): the options of runtime.launch that both launchers understand
_OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (
        ("--model",),
        {
            "required": True,
            "metavar": "REF",
            "help": "bundled model name or package.module:factory (imported and called)",
        },
    ),
    (("--steps",), {"type": int, "default": 10, "help": "train until this step (default 10)"}),
    (("--lr",), {"type": float, "default": 3e-4, "help": "learning rate (default 3e-4)"}),
    (("--seed",), {"type": int, "default": 0, "help": "initial weights and synthetic batches"}),
    (("--dtype",), {"choices": DTYPES, "default": "float32", "help": "parameter dtype"}),
    (
        ("--data",),
        {
            "default": None,
            "metavar": "PKG.MOD:FN",
            "help": "dataset factory fn(batch_size=, seed=) yielding (inputs, targets)",
        },
    ),
    (("--checkpoint-dir",), {"default": None, "metavar": "DIR"}),
    (
        ("--checkpoint-every",),
        {
            "type": int,
            "default": 0,
            "metavar": "K",
            "help": "steps between checkpoints (0: only at the end)",
        },
    ),
    (
        ("--resume",),
        {"action": "store_true", "help": "continue from the newest checkpoint in --checkpoint-dir"},
    ),
    (
        ("--resume-from",),
        {
            "default": None,
            "metavar": "CKPT",
            "help": "continue from this checkpoint (a step_N directory)",
        },
    ),
    (
        ("--meta-init",),
        {"action": "store_true", "help": "build on the meta device, materialise shards only"},
    ),
    (
        ("--timeout-s",),
        {"type": float, "default": 300.0, "help": "collective timeout (a dead peer fails the job)"},
    ),
    (
        ("--log-file",),
        {"default": None, "metavar": "FILE", "help": "append per-step JSON lines here (rank 0)"},
    ),
    (
        ("--skip-nonfinite",),
        {
            "action": "store_true",
            "help": "skip a step whose loss or gradient norm is not finite (default: stop the run)",
        },
    ),
)


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """Add PLAN and runtime.launch's options to `parser`."""
    parser.add_argument("plan", help="plan file (YAML or JSON)")
    for flags, kwargs in _OPTIONS:
        parser.add_argument(*flags, **kwargs)


def launch_argv(args: argparse.Namespace) -> list[str]:
    """PLAN and the options that differ from their defaults, as runtime.launch's argv.

    Values travel as `--flag=value`, so a value that starts with "-" stays a value."""
    argv = [args.plan]
    for flags, kwargs in _OPTIONS:
        dest = flags[0].lstrip("-").replace("-", "_")
        value = getattr(args, dest)
        if kwargs.get("action") == "store_true":
            argv += [flags[0]] if value else []
        elif value is not None and (kwargs.get("required") or value != kwargs.get("default")):
            argv.append(
                f"{flags[0]}={value!r}" if isinstance(value, float) else f"{flags[0]}={value}"
            )
    return argv


def validate_launch_args(args: argparse.Namespace) -> None:
    """Raise SpecError (one line) for a number out of range or options that need one another."""
    for name in ("steps", "checkpoint_every"):
        if getattr(args, name) < 0:
            raise SpecError(f"--{name.replace('_', '-')}: must be >= 0 (got {getattr(args, name)})")
    if not (args.timeout_s > 0 and math.isfinite(args.timeout_s)):
        raise SpecError(f"--timeout-s: must be > 0 seconds (got {args.timeout_s})")
    if not (args.lr >= 0 and math.isfinite(args.lr)):
        raise SpecError(f"--lr: must be a finite number >= 0 (got {args.lr})")
    if not _SEED_MIN <= args.seed <= _SEED_MAX - args.steps:
        raise SpecError(
            f"--seed: must be between {_SEED_MIN} and 2**64 - 1 - --steps "
            f"(= {_SEED_MAX - args.steps}; got {args.seed})"
        )
    if args.checkpoint_every and not args.checkpoint_dir:
        raise SpecError("--checkpoint-every needs --checkpoint-dir")
    if args.resume and not args.checkpoint_dir:
        raise SpecError("--resume needs --checkpoint-dir")


def validate_launch_plan(args: argparse.Namespace, plan: Plan) -> None:
    """Raise SpecError (one line) for options that `plan` cannot run with. Pure."""
    if args.meta_init and plan.mesh.ep > 1:
        raise SpecError(
            f"--meta-init: the plan shards the experts (mesh.ep={plan.mesh.ep}), which the runtime "
            f"does from real weights; leave out --meta-init, or re-plan with --pin ep=1"
        )


def has_committed_checkpoint(directory: str | os.PathLike[str]) -> bool:
    """Whether `directory` holds a committed checkpoint (a step_N folder with a COMMITTED marker)."""
    d = Path(directory)
    return d.is_dir() and any(
        p.is_dir() and _STEP_DIR.match(p.name) and (p / _COMMITTED).is_file() for p in d.iterdir()
    )


def validate_launch_paths(args: argparse.Namespace) -> None:
    """Raise SpecError (one line) when --resume, --resume-from or --checkpoint-dir cannot work.

    Creates --checkpoint-dir when missing (training would) and probes it with an empty file."""
    if args.resume and not args.checkpoint_dir:
        raise SpecError("--resume needs --checkpoint-dir")
    if args.resume and not has_committed_checkpoint(args.checkpoint_dir):
        d = Path(args.checkpoint_dir)
        what = (
            "does not exist"
            if not d.exists()
            else "is not a directory"
            if not d.is_dir()
            else "holds no committed checkpoint (no step_N directory with a COMMITTED marker)"
        )
        raise SpecError(
            f"--resume: --checkpoint-dir {d} {what}; nothing to resume from "
            f"(leave out --resume to start at step 0)"
        )
    if args.resume_from and not (Path(args.resume_from) / _COMMITTED).is_file():
        raise SpecError(
            f"--resume-from {args.resume_from}: not a committed checkpoint (no {_COMMITTED} marker)"
        )
    if args.checkpoint_dir:
        _check_writable_dir(args.checkpoint_dir, "--checkpoint-dir")


def _check_writable_dir(path: str, flag: str) -> None:
    d = Path(path)
    try:
        if d.exists() and not d.is_dir():
            raise NotADirectoryError(20, "exists and is not a directory")
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-probe-{socket.gethostname()}-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SpecError(
            f"{flag} {path}: cannot write checkpoints there ({type(e).__name__}: {e.strerror or e})"
        ) from None


def open_log_file(path: str) -> TextIO:
    """`path` opened for appending (the caller closes it), or SpecError saying why it cannot be."""
    try:
        return open(path, "a")  # noqa: SIM115 - the caller closes it
    except OSError as e:
        raise SpecError(
            f"--log-file {path}: cannot open it for appending ({type(e).__name__}: "
            f"{e.strerror or e})"
        ) from None


def missing_loss_error(model_ref: str) -> SpecError:
    """The error for a model factory that gave no loss: training refuses to guess one."""
    return SpecError(
        f"--model {model_ref}: the factory returned (module, example_inputs) and no loss; to train, "
        f"return (module, example_inputs, loss_fn) with loss_fn(outputs, targets) -> the mean loss, "
        f"or a planner.models.BuiltModel (batches: --data package.module:function, else synthetic "
        f"(x, x))"
    )
