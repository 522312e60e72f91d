"""The one compiled kernel of the cost model: cost_models.jit's numba passes, and when they load.

The pipeline simulation (cost_models.simulator) compiles a schedule's structure into a
dependency order once per (schedule, pp, m, v) and plays it once per distinct set of stage
times by the max-plus pass

    end(a) = max(end(prev_on_rank(a)), end(dep(a)) + p2p) + duration(a).

In CPython the pass runs at ~0.1-0.3 us per action and the compile at ~1-2 us per action; on the
largest spaces (a 1T-parameter model on thousands of GPUs: pp 32-64, hundreds of micro-batches)
they are most of a search's time. cost_models.jit holds both passes ported line for line to numba
(a few ns per action), bit-identical to the Python passes, which stay as the reference and as the
path without numba (tests/test_cost_kernels.py compares them).

Loading costs time once per process (measured here: 0.2-0.4 s importing numba + ~0.15 s loading
the cached machine code, CPU; compiling them the first time on a machine ~5 s), so it happens at
one defined point: when a CostModel is made with `compiled=True`, or with the default
`compiled=None` for a space of cost_models.model.KERNELS_FROM_DEVICES devices or more whose
machine code is already cached (`cache_ready`). A plan never compiles: with the cache missing it
goes on in Python and starts one background process that builds the cache
(`build_cache_in_background`, niced; `make` runs `python -m cost_models.kernels` at install).
AUTOPLAN_JIT_BUILD=0 turns the background build off; `AUTOPLAN_JIT=0` (or numba missing) keeps
everything in Python. Either way the results are the same, bit for bit.

Loading is guarded, as a search must not fail for an optimisation's sake:
- numba's machine-code cache goes under the user's cache home (`cache_dir`: $AUTOPLAN_CACHE_DIR,
  else $XDG_CACHE_HOME/autoplan, else ~/.cache/autoplan; then numba/), never beside the installed
  sources (numba's default, often read-only or shared). NUMBA_CACHE_DIR is set to it before numba
  is imported, unless the user set NUMBA_CACHE_DIR themselves;
- numba's import runs `import coverage` (numba.misc.coverage_support); a file named coverage.py
  in the user's working folder shadows the package and breaks it ("module 'coverage' has no
  attribute 'types'"). Unless coverage is already imported (then it is the one in use), that
  import is answered "not installed" while numba loads: the user's file is not run;
- any other failure to import, compile or load the kernels leaves the Python passes in place with
  one RuntimeWarning (tests/test_kernel_loading.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from types import ModuleType

import numpy as np
import numpy.typing as npt

AVAILABLE = os.environ.get("AUTOPLAN_JIT", "1") != "0" and importlib.util.find_spec("numba") is not None
ready = False  # kernels loaded (callers check this flag, then call jit.<kernel>)
jit: ModuleType | None = None  # the cost_models.jit module once loaded
failed: str | None = None  # why loading failed (then the Python passes stay; warned once)


def cache_dir() -> Path:
    """Where numba caches the kernels' machine code: <autoplan cache home>/numba, the home being
    $AUTOPLAN_CACHE_DIR, else $XDG_CACHE_HOME/autoplan, else ~/.cache/autoplan."""
    from specs.hardware import cache_home

    return cache_home() / "numba"


def use_cache_dir() -> None:
    """Point numba's cache at `cache_dir()` (unless NUMBA_CACHE_DIR is the user's own); call before
    cost_models.jit is imported (numba picks a function's cache place when it is decorated)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    os.environ["NUMBA_CACHE_DIR"] = str(cache_dir())
    config = sys.modules.get("numba.core.config")
    if config is not None:  # numba imported earlier by someone else: re-read the environment
        config.reload_config()


KERNELS = ("run_plain", "compile_order")
_build_started = False


def cache_ready() -> bool:
    """True when numba's cache holds an index for every kernel for this Python (numba's own layout:
    <cache dir>/<source folder>_<sha1 of its path>/jit.<kernel>-<line>.pyXY.nbi). An index left by
    an older jit.py (a developer's edit) makes numba recompile on load: a cost, never a wrong result."""
    src = Path(__file__).with_name("jit.py").resolve()
    folder = src.parent
    sub = f"{folder.name}_{hashlib.sha1(str(folder).encode()).hexdigest()}"
    where = Path(os.environ.get("NUMBA_CACHE_DIR") or cache_dir()) / sub
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    try:
        return all(any(where.glob(f"jit.{name}-*.{tag}.nbi")) for name in KERNELS)
    except OSError:
        return False


def build_cache_in_background() -> bool:
    """Start (once per process) a detached, niced `python -m cost_models.kernels` that compiles the
    kernels into the cache for later processes. False when not started (off, started, or failed)."""
    global _build_started
    if _build_started or not AVAILABLE or os.environ.get("AUTOPLAN_JIT_BUILD", "1") == "0":
        return False
    _build_started = True
    try:
        subprocess.Popen(
            [sys.executable, "-c", "from cost_models import kernels; kernels.main()"],
            cwd=str(Path(__file__).resolve().parents[1]), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=(lambda: os.nice(19)) if hasattr(os, "nice") else None,  # noqa: PLW1509
        )
    except OSError:
        return False
    return True


def load() -> bool:
    """Load the kernels (compiling them the first time on a machine); True when they are loaded.
    A failure warns once and leaves the Python passes in place (False)."""
    warm_up()
    return ready


def warm_up() -> float:
    """Load (or, the first time on a machine, compile) the kernels now; returns the CPU seconds it
    took (0.0 when already loaded, unavailable or failed). A failure warns once and leaves the
    Python passes in place."""
    global ready, jit, failed
    if ready or not AVAILABLE or failed is not None:
        return 0.0
    t0 = time.process_time()
    try:
        mod = _load()
    except Exception as e:  # anything numba raises: the kernels are an optimisation only
        failed = f"{type(e).__name__}: {e}"
        warnings.warn(f"autoplan: the compiled pipeline kernels did not load ({failed}); planning goes on "
                      f"with the Python passes (same results, slower). AUTOPLAN_JIT=0 skips them.",
                      RuntimeWarning, stacklevel=2)
        return time.process_time() - t0
    jit, ready = mod, True
    return time.process_time() - t0


def _load() -> ModuleType:
    """Import cost_models.jit (numba) and run each kernel once on a tiny input (compiles or loads
    its cached machine code)."""
    use_cache_dir()
    shadow = "coverage" not in sys.modules
    if shadow:  # numba.misc.coverage_support's `import coverage` must not run a user's coverage.py
        sys.modules["coverage"] = None  # type: ignore[assignment]  # "not installed" for that import
    try:
        from cost_models import jit as mod
    finally:
        if shadow and sys.modules.get("coverage", 0) is None:
            del sys.modules["coverage"]
    one = np.zeros(1, dtype=np.int64)
    cnt = np.zeros((1, 3), dtype=np.int64)
    T = np.zeros((1, 4))
    mod.run_plain(one, one, one, one, cnt, one, T, False, 1)
    mod.compile_order(one, one, one, np.array([0, 1]), one, 1, 1, 1, 1)
    return mod


def index_array(xs: npt.ArrayLike, none: int) -> npt.NDArray[np.int64]:
    """int64 array of `xs` with -1 ("none") replaced by `none`, the sentinel slot; `none` = -1
    keeps the values as they are (arrays without a "none")."""
    a = np.array(xs, dtype=np.int64)
    if none >= 0:
        a[a < 0] = none
    return a


def times_array(times: Sequence[tuple[float, float, float, float]]) -> npt.NDArray[np.float64]:
    """(F, B, W, p2p) per stage as an S x 4 float64 array."""
    return np.fromiter(chain.from_iterable(times), np.float64, 4 * len(times)).reshape(len(times), 4)


def main() -> None:
    """Compile the kernels into the cache (`make` runs this at install; a search starts it in the
    background when the cache is missing) and say where it is."""
    seconds = warm_up()
    print(f"autoplan kernels: {'ready' if ready else 'not built: ' + str(failed)} "
          f"({seconds:.1f} s CPU), cache {os.environ.get('NUMBA_CACHE_DIR') or cache_dir()}")
    sys.exit(0 if ready or not AVAILABLE else 1)
