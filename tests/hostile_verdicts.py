"""Running hostile inputs (issue 20): each case under a time limit, in a sandbox, with one verdict.

A case is a name, a group and a probe that feeds one input and judges the answer (`api` for a
Python call, `cli` for `autoplan ARGV` in this process); `run_cases` runs them in `sandbox` and
`run_case` adds what the probe cannot see (time, code run). Verdicts:
- clear: refused with one SpecError line naming what is wrong, or specs' "FILE: N problems:" block
  of one indented line per field (CLI: exit 2, one `autoplan ...: error:` line on stderr, with
  that block under it); or, where the input may legitimately load, a value its oracle accepts.
- unclear: refused, but with several lines, a pydantic dump or without naming the field.
- crash: an exception other than SpecError escaped (a traceback for the user).
- hang: no answer within LIMIT_S (SIGALRM interrupts Python code; a late answer counts too).
- silent-wrong: a bad input accepted (exit 0, or a value its oracle rejects).
- code-executed: something imported or called the code a file named (`os:system`, EVIL).
The catalogue is tests/hostile_inputs.py.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specs import SpecError

LIMIT_S = 10.0
VERDICTS = ("clear", "unclear", "crash", "hang", "silent-wrong", "code-executed")
EVIL = "hostile_evil_ap"  # a module whose import or call writes MARKER (see `sandbox`)
CODE_TARGETS = ("os:system", "os:abort", "builtins:exec", "subprocess:call", f"{EVIL}:build", EVIL)


class CaseTimeout(BaseException):
    """Raised by SIGALRM in a case that ran past LIMIT_S (a BaseException: nothing catches it)."""


@dataclass(frozen=True)
class Case:
    """One hostile input: `probe()` feeds it and returns (verdict, detail)."""

    name: str
    group: str
    probe: Callable[[], tuple[str, str]]


@dataclass(frozen=True)
class Result:
    name: str
    group: str
    verdict: str
    detail: str
    seconds: float


# ------------------------------------------------------------------ probes
def _one_line(msg: str) -> bool:
    """One line, or specs' "FILE: N problems:" block with one indented `field: why` line each."""
    if "Traceback" in msg or "errors.pydantic.dev" in msg:
        return False
    first, *rest = msg.strip().splitlines() or [""]
    return not rest or (first.endswith(" problems:") and all(ln.startswith("  ") and ": " in ln for ln in rest))


def api(name: str, group: str, fn: Callable[[], Any], needles: tuple[str, ...] = (), expect: str = "error",
        wrong: Callable[[Any], str | None] | None = None) -> Case:
    """fn() must raise one SpecError line holding every needle; with expect="either" it may
    instead return a value for which `wrong(value)` finds nothing wrong."""

    def probe() -> tuple[str, str]:
        try:
            value = fn()
        except SpecError as e:
            msg = str(e)
            missing = [n for n in needles if n not in msg]
            if missing or not _one_line(msg):
                return "unclear", f"{msg[:200]!r} lacks {missing}"
            return "clear", msg[:160]
        except Exception as e:  # noqa: BLE001 - what escapes is what we count
            return "crash", f"{type(e).__name__}: {str(e)[:160]}"
        if expect == "error":
            return "silent-wrong", f"accepted: {str(value)[:120]}"
        problem = wrong(value) if wrong else None
        return ("silent-wrong", problem) if problem else ("clear", "accepted, valid")

    return Case(name, group, probe)


def cli(name: str, group: str, argv: list[str], needles: tuple[str, ...] = (), expect: str = "error") -> Case:
    """`autoplan ARGV` in this process: exit 2 with one `autoplan CMD: error:` line holding every
    needle (other stderr lines may only be our own `autoplan CMD: note` lines); with
    expect="either", exit 0 is fine too."""

    def probe() -> tuple[str, str]:
        from planner.cli import main

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(list(argv))
            except SystemExit as e:  # argparse
                rc = e.code
            except Exception as e:  # noqa: BLE001
                return "crash", f"{type(e).__name__}: {str(e)[:160]}"
        text = err.getvalue()
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("  ")]  # N problems: below
        if not _one_line(text.split(": error: ", 1)[-1]):
            return "unclear", f"rc={rc} {text[:200]!r}"
        errors = [ln for ln in lines if ": error: " in ln]
        if "Traceback" in text:
            return "crash", text[-200:]
        if rc == 0:
            return ("silent-wrong", "exit 0") if expect == "error" else ("clear", "exit 0")
        missing = [n for n in needles if n not in text]
        ok = (rc == 2 and len(errors) == 1 and errors[0].startswith("autoplan") and not missing
              and all(ln.startswith("autoplan") for ln in lines))
        return ("clear", errors[0][:160]) if ok else ("unclear", f"rc={rc} {text[:200]!r} lacks {missing}")

    return Case(name, group, probe)


# ------------------------------------------------------------------ running
@contextlib.contextmanager
def sandbox(tmp: Path) -> Iterator[tuple[Path, list[str]]]:
    """cwd and sys.path hold EVIL (its import or build() writes the marker); os.system, os.abort,
    os.popen, subprocess.call and the `autoplan run` torchrun start only record. Yields (marker,
    calls)."""
    from planner import run_cmd

    home = tmp / "sandbox"
    home.mkdir(parents=True, exist_ok=True)
    marker = home / "MARKER"
    (home / f"{EVIL}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n\n"
        f"def build(*a, **k):\n    pathlib.Path({str(marker)!r}).write_text('called')\n"
    )
    calls: list[str] = []

    def recorder(what: str):
        def fn(*a, **k):
            calls.append(what)
            raise RuntimeError(f"{what} was called")
        return fn

    saved = [(os, "system"), (os, "abort"), (os, "popen"), (subprocess, "call"), (run_cmd, "_start_torchrun")]
    originals = [getattr(m, a) for m, a in saved]
    cwd = os.getcwd()
    os.chdir(home)
    sys.path.insert(0, str(home))
    for m, a in saved:
        setattr(m, a, recorder(f"{getattr(m, '__name__', m)}.{a}"))
    try:
        yield marker, calls
    finally:
        for (m, a), f in zip(saved, originals, strict=True):
            setattr(m, a, f)
        sys.path.remove(str(home))
        os.chdir(cwd)
        sys.modules.pop(EVIL, None)


def _alarm(signum, frame):
    raise CaseTimeout


def run_case(case: Case, marker: Path, calls: list[str], limit_s: float = LIMIT_S) -> Result:
    """Run one case inside `sandbox`, interrupted after limit_s; code run beats every other verdict."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    t0 = time.perf_counter()
    try:
        verdict, detail = case.probe()
    except CaseTimeout:
        verdict, detail = "hang", f"no answer in {limit_s:.0f} s"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    seconds = time.perf_counter() - t0
    if seconds > limit_s and verdict != "hang":
        verdict, detail = "hang", f"answered after {seconds:.1f} s: {detail}"
    if marker.exists() or calls or EVIL in sys.modules:
        verdict, detail = "code-executed", f"marker: {marker.exists()}, calls: {calls}"
        marker.unlink(missing_ok=True)
        calls.clear()
        sys.modules.pop(EVIL, None)
    return Result(case.name, case.group, verdict, detail, seconds)


def run_cases(cases: list[Case], tmp: Path, limit_s: float = LIMIT_S) -> list[Result]:
    with sandbox(tmp) as (marker, calls):
        return [run_case(c, marker, calls, limit_s) for c in cases]


def counts(results: list[Result]) -> dict[str, int]:
    return {v: sum(r.verdict == v for r in results) for v in VERDICTS}
