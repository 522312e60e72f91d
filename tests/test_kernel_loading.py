"""Tier 1: the compiled kernels load at a guarded point, cache under the user's cache home, and a
failure to load them never fails a search (cost_models.kernels' module docstring)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import cost_models
from cost_models import kernels

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(cost_models.__file__).resolve().parent

needs_numba = pytest.mark.skipif(not kernels.AVAILABLE, reason="numba missing or AUTOPLAN_JIT=0")

# Plans a small pipelined GPT with the kernels forced to load first; prints what happened.
PLAN = textwrap.dedent("""
    import json, sys, warnings
    sys.path.append(sys.argv[1])  # the repository, after the working folder (where coverage.py is)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from cost_models import kernels
        kernels.warm_up()
        from planner.api import autoplan
        from specs import Constraints, HardwareSpec, TrainSpec
        from tests.graphs import gpt_graph
        g = gpt_graph(vocab=1024, hidden=256, layers=4, heads=8, seq_len=128)
        hw = HardwareSpec.preset("dgx-a100-80gb", devices=8)
        train = TrainSpec(global_batch_size=16)
        plan = autoplan(None, hw, graph=g, train=train, constraints=Constraints(pp=2))
    mine = [str(w.message) for w in caught if "autoplan" in str(w.message)]
    print(json.dumps({"ready": kernels.ready, "failed": kernels.failed, "warnings": mine,
                      "step_time_s": plan.predicted.step_time_s}))
""")


def _plan_in(folder: Path, **env_extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NUMBA_CACHE_DIR")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PLAN, str(ROOT)], cwd=folder, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.tier1
@needs_numba
@pytest.mark.parametrize("user_file", [
    'raise RuntimeError("user file")\n',
    '# a module named coverage without coverage.types\nVERSION = "mine"\n',
])
def test_a_users_coverage_py_does_not_break_planning(tmp_path, user_file):
    """A file named coverage.py in the working folder shadows the coverage package that numba
    imports: the search still succeeds, the kernels load, and at most one warning is given."""
    (tmp_path / "coverage.py").write_text(user_file)
    got = _plan_in(tmp_path)
    assert got["step_time_s"] > 0
    assert len(got["warnings"]) <= 1, got["warnings"]
    assert got["ready"] and got["failed"] is None, got  # the user's file was not imported


@pytest.mark.tier1
def test_a_failed_load_warns_once_and_plans_in_python(monkeypatch):
    def broken():
        raise AttributeError("module 'coverage' has no attribute 'types'")

    monkeypatch.setattr(kernels, "_load", broken)
    monkeypatch.setattr(kernels, "AVAILABLE", True)
    monkeypatch.setattr(kernels, "ready", False)
    monkeypatch.setattr(kernels, "jit", None)
    monkeypatch.setattr(kernels, "failed", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernels.warm_up()
        for _ in range(3):
            assert not kernels.load()  # a failed load is not tried again
        from cost_models import CostModel
        from planner.api import autoplan
        from specs import Constraints, HardwareSpec, Knobs, TrainSpec
        from tests.graphs import gpt_graph

        g = gpt_graph(vocab=1024, hidden=256, layers=4, heads=8, seq_len=128)
        hw = HardwareSpec.preset("dgx-a100-80gb", devices=8)
        plan = autoplan(None, hw, graph=g, train=TrainSpec(global_batch_size=16), constraints=Constraints(pp=2))
        cm = CostModel(g, hw, TrainSpec(global_batch_size=16), compiled=True)  # asked for, not there
        est = cm.estimate(Knobs(pp=2, dp=4, tp=1, num_micro_batches=4), [(0, 2, "none"), (3, 5, "none")])
    mine = [w for w in caught if "compiled pipeline kernels" in str(w.message)]
    assert len(mine) == 1 and issubclass(mine[0].category, RuntimeWarning)
    assert "has no attribute 'types'" in str(mine[0].message)
    assert not kernels.ready and kernels.failed and not cm.compiled
    assert plan.predicted.step_time_s > 0 and est.step_time_s > 0


@pytest.mark.tier1
def test_the_cache_is_under_the_users_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("AUTOPLAN_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    default = kernels.cache_dir()
    assert default == Path.home() / ".cache" / "autoplan" / "numba"
    assert not default.resolve().is_relative_to(PACKAGE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kernels.cache_dir() == tmp_path / "xdg" / "autoplan" / "numba"
    monkeypatch.setenv("AUTOPLAN_CACHE_DIR", str(tmp_path / "mine"))
    assert kernels.cache_dir() == tmp_path / "mine" / "numba"


@pytest.mark.tier1
@needs_numba
def test_numba_caches_the_kernels_there(tmp_path):
    """numba's own idea of where each kernel's cache lives (decided when cost_models.jit is
    imported; nothing is compiled here) is the cache home, not the package."""
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        from cost_models import kernels
        kernels.use_cache_dir()
        from cost_models import jit
        print(jit.run_plain._cache._cache_path)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NUMBA_CACHE_DIR")}
    env["AUTOPLAN_CACHE_DIR"] = str(tmp_path / "home")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    path = Path(out.stdout.strip().splitlines()[-1]).resolve()
    assert path.is_relative_to((tmp_path / "home" / "numba").resolve())
    assert not path.is_relative_to(PACKAGE)


@pytest.mark.tier1
def test_a_search_never_compiles_it_builds_the_cache_in_the_background(monkeypatch, tmp_path):
    """No multi-second compile on a user's first plan. The kernel loads at one point, when a
    CostModel is made: for a large space with cached machine code it loads; with no cache it stays
    in Python and starts one background build; a small space never touches numba."""
    from cost_models import CostModel
    from cost_models.model import KERNELS_FROM_DEVICES
    from specs import HardwareSpec, TrainSpec
    from tests.graphs import gpt_graph

    monkeypatch.setenv("AUTOPLAN_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.delenv("AUTOPLAN_JIT_BUILD", raising=False)
    for name, value in (("ready", False), ("failed", None), ("_build_started", False), ("AVAILABLE", True)):
        monkeypatch.setattr(kernels, name, value)
    started, loaded = [], []
    monkeypatch.setattr(kernels.subprocess, "Popen", lambda cmd, **kw: started.append(cmd))
    monkeypatch.setattr(kernels, "warm_up", lambda: loaded.append(1) or 0.0)
    g = gpt_graph(vocab=1024, hidden=256, layers=4, heads=8, seq_len=128)
    train = TrainSpec(global_batch_size=1024)
    small = HardwareSpec.preset("dgx-a100-80gb", devices=8)
    big = HardwareSpec.preset("dgx-a100-80gb", nodes=KERNELS_FROM_DEVICES // 8)
    assert not kernels.cache_ready()
    assert not CostModel(g, small, train).compiled
    assert started == [] and loaded == []  # a small space: nothing
    assert not CostModel(g, big, train).compiled and not CostModel(g, big, train).compiled
    assert len(started) == 1 and "kernels.main()" in started[0][-1] and loaded == []  # one build, no load

    monkeypatch.setattr(kernels, "_build_started", False)
    monkeypatch.setattr(kernels, "cache_ready", lambda: True)
    CostModel(g, big, train)
    assert loaded == [1] and len(started) == 1

    monkeypatch.setattr(kernels, "_build_started", False)
    monkeypatch.setattr(kernels, "cache_ready", lambda: False)
    monkeypatch.setenv("AUTOPLAN_JIT_BUILD", "0")
    CostModel(g, big, train)
    assert len(started) == 1  # the background build is off


@pytest.mark.tier1
@needs_numba
def test_cache_ready_sees_the_built_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NUMBA_CACHE_DIR")}
    env["AUTOPLAN_CACHE_DIR"] = str(tmp_path)
    check = "from cost_models import kernels; print(kernels.cache_ready())"
    before = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True)
    assert before.stdout.strip() == "False"
    build = subprocess.run([sys.executable, "-c", "from cost_models import kernels; kernels.main()"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0 and "ready" in build.stdout, build.stdout + build.stderr[-2000:]
    after = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True)
    assert after.stdout.strip() == "True"
