"""`autoplan run PLAN --model REF`: check a training launch in this process, then start torchrun.

Every check fails with one line (exit 2) before any process starts: options (runtime.launch's own,
from specs.launch_args), the plan file and the options it cannot run with (--meta-init with
ep > 1), its world size against --nproc, the model (resolved only because the user typed it; it
must give a loss and trace to the plan's fingerprint), --data, the checkpoint folders and the log
file. Then `python -m torch.distributed.run ... -m runtime.launch`
runs (a subprocess: planner never imports runtime/); its stdout streams through, and its stderr is
filtered by `_TorchrunStderr`, which leaves out torchrun's multi-screen failure report in favour of
the workers' own line and returns the failed worker's exit code.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from specs import Plan, SpecError


def cmd_run(args) -> int:
    """Check everything a training launch needs, then start torchrun on this machine.

    Every check fails with one line (exit 2) before any process starts; the checks in order:
    options, the plan file (and the options it cannot run with), its world size against
    --nproc, the model (resolves, has a loss, traces to the plan's fingerprint), --data,
    checkpoint folders and the log file. Returns torchrun's exit code, or the failed worker's
    (the Root Cause of torchrun's report)."""
    try:
        cmd, nproc = _checked_launch(args)
    except SpecError as e:  # a plan with several problems lists them: one line here
        raise SpecError("; ".join(x.strip() for x in str(e).splitlines() if x.strip())) from None
    if args.dry_run:
        import shlex

        print(shlex.join(cmd))
        return 0
    return _start_torchrun(cmd, nproc)


def _checked_launch(args) -> tuple[list[str], int]:
    """The torchrun command and its process count, after every check (SpecError on a problem)."""
    from specs.launch_args import (
        launch_argv,
        validate_launch_args,
        validate_launch_paths,
        validate_launch_plan,
    )

    validate_launch_args(args)
    if args.nproc is not None and args.nproc < 1:
        raise SpecError(f"--nproc: must be >= 1 (got {args.nproc})")
    if args.max_restarts < 0:
        raise SpecError(f"--max-restarts: must be >= 0 (got {args.max_restarts})")
    plan = Plan.from_file(args.plan)
    validate_launch_plan(args, plan)
    nproc = _run_world_size(args, plan)
    _check_run_model(args, plan, nproc)
    _check_run_data(args.data)
    validate_launch_paths(args)
    _check_log_file(args.log_file)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
    ]
    if args.max_restarts:
        cmd.append(f"--max-restarts={args.max_restarts}")
    cmd += ["-m", "runtime.launch", *launch_argv(args)]
    return cmd, nproc


def _replan_hint(args, nproc: int | None, what: str = "machine") -> str:
    n = nproc if nproc is not None else "N"
    return (
        f"make a plan for this {what}: autoplan plan {args.model} --hw cpu:{n} -o plan-{n}.yaml "
        f"(on GPUs a preset such as dgx-h100-80gb:{n})"
    )


def _run_world_size(args, plan) -> int:
    """The processes to start: --nproc, which must be the plan's pp * dp * tp (default: that)."""
    m, hw = plan.mesh, plan.hardware
    arithmetic = f"pp({m.pp}) * dp({m.dp}) * tp({m.tp}) = {m.world_size}"
    if args.nproc is None:
        if hw.num_nodes > 1:
            raise SpecError(
                f"{args.plan}: the plan is for {m.world_size} processes ({arithmetic}) on "
                f"{hw.num_nodes} nodes of {hw.name}; autoplan run starts one machine's processes: "
                f"{_replan_hint(args, None)}, or start each node with torchrun (README: Running a plan)"
            )
        return m.world_size
    if args.nproc != m.world_size:
        raise SpecError(
            f"--nproc {args.nproc}: the plan {args.plan} is for {m.world_size} processes "
            f"({arithmetic}), not {args.nproc}; {_replan_hint(args, args.nproc)}"
        )
    return args.nproc


def _check_run_model(args, plan, nproc: int) -> None:
    """--model resolves (a REF the user typed: imported and called), gives a loss, and traces to
    the plan's fingerprint unless the plan says "*" (as runtime.parallelize.validate_model checks:
    the model in --dtype, traced at batch 1). Built on the meta device: no weights allocated."""
    import torch

    from planner import trace
    from planner.models import build_model
    from specs.launch_args import missing_loss_error

    built = build_model(args.model, batch=1, device="meta", dtype=getattr(torch, args.dtype))
    if built.loss_fn is None:
        raise missing_loss_error(args.model)
    want = plan.model.fingerprint
    if want == "*":
        return
    one = tuple(
        x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in built.example_inputs
    )
    try:
        got = trace(built.module, one).fingerprint
    except SpecError:
        raise
    except Exception as e:  # the user's model failed to trace: name it in one line
        raise SpecError(
            f"--model {args.model}: tracing it to check the plan's fingerprint failed: "
            f"{_first_line(e)}"
        ) from None
    if got != want:
        raise SpecError(
            f"--model {args.model}: the plan {args.plan} was made for {plan.model.name} (fingerprint "
            f"{want}), this model traces to {got}; {_replan_hint(args, nproc, 'model')}"
        )


def _first_line(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _check_run_data(ref: str | None) -> None:
    """--data names an importable callable (the user typed it: its module is imported)."""
    import importlib

    if not ref:
        return
    mod_name, _, fn_name = ref.partition(":")
    if not mod_name or not fn_name:
        raise SpecError(f"--data {ref}: name the dataset factory as package.module:function")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # any import-time failure is the user's module's
        raise SpecError(
            f"--data {ref}: cannot import module {mod_name!r}: {_first_line(e)}"
        ) from None
    if not callable(getattr(mod, fn_name, None)):
        raise SpecError(f"--data {ref}: module {mod_name!r} has no callable {fn_name!r}")


def _check_log_file(path: str | None) -> None:
    """--log-file opens for appending; a file this check created is removed again."""
    from specs.launch_args import open_log_file

    if not path:
        return
    existed = Path(path).exists()
    open_log_file(path).close()
    if not existed:
        Path(path).unlink(missing_ok=True)


def _start_torchrun(cmd: list[str], nproc: int) -> int:
    """Run torchrun with the workers' stdout live and its stderr filtered (_TorchrunStderr)."""
    import os
    import signal
    import subprocess

    env = dict(os.environ)
    if nproc > 1:  # torchrun sets it to 1 itself, with a banner about it
        env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1, env=env
    )
    # Ctrl-C reaches torchrun and its workers from the terminal; this process waits for their
    # lines. SIGTERM is passed on.
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda sig, frame: proc.send_signal(sig)),
    }
    try:
        stderr = _TorchrunStderr(sys.stderr)
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr.feed(line)
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return stderr.finish(rc)


class _TorchrunStderr:
    """torchrun's stderr, which its workers share, passed on line by line without torchrun's
    own noise: its log lines about stopping workers, its traceback (frames in
    torch/distributed/run.py) and the ChildFailedError report after it. The report's Root Cause
    gives the exit code of the worker that failed first. Identical `runtime.launch:` lines from
    several ranks are shown once."""

    _LOG = re.compile(r"^[DIWEC]\d{4} [\d:.]+ +\d+ \S+:\d+\] (.*)")
    _NOISE = ("closing signal", "failed (exitcode", "death signal")
    _ROOT = re.compile(r"exitcode\s*:\s*(-?\d+)")

    def __init__(self, out):
        self.out = out
        self.seen: set[str] = set()
        self.held: list[str] | None = None  # a traceback, until its exception line
        self.report: list[str] | None = None  # torchrun's traceback and report: not shown
        self.worker_said = False

    def feed(self, line: str) -> None:
        if self.report is not None:
            self.report.append(line)
        elif self.held is not None:
            self.held.append(line)
            if not line.strip() or line[0] in " \t" or line.startswith("Traceback"):
                return
            block, self.held = self.held, None
            if any("torch/distributed/run.py" in x for x in block):
                self.report = block
            else:
                for x in block:
                    self._emit(x)
        elif line.startswith("Traceback (most recent call last):"):
            self.held = [line]
        elif m := self._LOG.match(line):
            if not any(n in m.group(1) for n in self._NOISE):
                self._emit(f"torchrun: {m.group(1)}\n")
        elif line.startswith("runtime.launch: "):
            if line not in self.seen:
                self.seen.add(line)
                self.worker_said = True
                self._emit(line)
        else:
            self._emit(line)

    def _emit(self, line: str) -> None:
        self.out.write(line)
        self.out.flush()

    def finish(self, rc: int) -> int:
        """The exit code to return; one line of our own when a failed worker said nothing."""
        for x in self.held or []:
            self._emit(x)
        if rc == 0:
            return 0
        report = "".join(self.report or [])
        root = report.partition("Root Cause")[2]
        code = int(m.group(1)) if (m := self._ROOT.search(root)) else None
        if "SignalException" in report and "signal: 2" in report:
            return 130  # Ctrl-C: the workers said where they were
        if code is not None and code < 0:
            import signal

            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            self._emit(
                f"autoplan run: error: a worker was killed by {name} (the other ranks were "
                f"stopped)\n"
            )
            return 128 - code
        if not self.worker_said:
            self._emit(
                f"autoplan run: error: torchrun failed with exit code {rc}"
                f"{f' (a worker exited with {code})' if code is not None else ''}\n"
            )
        return code if code else rc


# ------------------------------------------------------------------ parser
