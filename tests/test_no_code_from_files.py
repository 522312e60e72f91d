"""Nothing reachable from a plan or hardware file imports or calls code (issue 20, part 0).

Plans and hardware files name targets that would run something if imported and called
(`os:abort`, `os:system`, `builtins:exec`, `subprocess:call`, and a module of this test's own
whose import writes a marker file and which sits on sys.path and in the working directory).
Every command that reads such a file (explain, explain --why-not with knobs or a plan file,
--format json, --html, compare, export to each target, plan --hw FILE) is run on them in-process
with os.abort / os.system / subprocess.call replaced by recorders and importlib.import_module
spied on: nothing is called, no named module is imported, the marker is never written, and
each command exits 0 or 2 with one clear line. One run as a real subprocess checks that the
process is not aborted (exit 2, not SIGABRT). Only `--model REF` on the command line imports.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from planner.cli import main
from specs import HardwareSpec, TrainSpec

ROOT = Path(__file__).resolve().parents[1]
EVIL = "evil_nocode_ap"
TARGETS = ("os:abort", "os:system", "builtins:exec", "subprocess:call", f"{EVIL}:build", f"{EVIL}:pwn")
TARGET_MODULES = {t.split(":")[0] for t in TARGETS}


@pytest.fixture(scope="module")
def real_plan():
    """A plan the planner made for gpt-tiny on 2 CPU processes (so a tp change is a new point to score)."""
    from planner import autoplan

    return autoplan("gpt-tiny", HardwareSpec.preset("cpu", devices=2), train=TrainSpec(global_batch_size=8))


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """cwd and sys.path hold the marker-writing module; the dangerous callables only record."""
    marker = tmp_path / "MARKER"
    (tmp_path / f"{EVIL}.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("imported")
        def build():
            pathlib.Path({str(marker)!r}).write_text("called")
        pwn = build
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    calls: list[str] = []

    def recorder(name):
        def fn(*args, **kwargs):
            calls.append(name)
            raise RuntimeError(f"{name} was called")
        return fn

    monkeypatch.setattr(os, "abort", recorder("os.abort"))
    monkeypatch.setattr(os, "system", recorder("os.system"))
    monkeypatch.setattr(subprocess, "call", recorder("subprocess.call"))
    real_import = importlib.import_module
    imported: list[str] = []

    def spy(name, package=None):
        imported.append(name)
        return real_import(name, package)

    monkeypatch.setattr(importlib, "import_module", spy)
    sys.modules.pop(EVIL, None)
    yield tmp_path, marker, calls, imported
    sys.modules.pop(EVIL, None)


def _plan_data(plan, target: str) -> dict:
    data = copy.deepcopy(plan.model_dump(mode="json"))
    data["model"]["name"] = target
    data["hardware"]["name"] = target
    data["hardware"]["device"]["name"] = target
    data["hardware"]["sources"] = {"name": target}
    return data


def _write(path: Path, data: dict) -> str:
    if path.suffix == ".json":
        path.write_text(json.dumps(data))
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _new_point(plan) -> str:
    """A knob change that is a new point to score (not the plan's own choice)."""
    return "tp=2" if plan.mesh.tp == 1 else "tp=1"


def _commands(tmp: Path, plan_file: str, other_file: str, new_point: str) -> list[list[str]]:
    return [
        ["explain", plan_file],
        ["explain", plan_file, "--format", "json"],
        ["explain", plan_file, "--why-not", new_point],
        ["explain", plan_file, "--why-not", new_point, "--format", "json"],
        ["explain", plan_file, "--why-not", other_file],
        ["explain", plan_file, "--html", str(tmp / "report.html")],
        ["compare", plan_file, other_file],
        ["compare", plan_file, other_file, "--format", "json"],
        *(["export", plan_file, "--to", to] for to in ("deepspeed", "torchtitan", "megatron")),
        ["export", plan_file, "--to", "megatron", "-o", str(tmp / "megatron.sh")],
    ]


def _check_clean(argv, rc: int, err: str, seconds: float) -> list[str]:
    problems = []
    if rc not in (0, 2):
        problems.append(f"exit {rc}")
    if rc == 2 and (len(err.strip().splitlines()) != 1 or not err.startswith("autoplan ")):
        problems.append(f"not one clear line: {err!r}")
    if "Traceback" in err:
        problems.append("traceback")
    if seconds > 10:
        problems.append(f"took {seconds:.1f} s")
    return [f"{' '.join(argv)}: {p}" for p in problems]


@pytest.mark.parametrize("target", TARGETS)
def test_plan_files_naming_code_run_nothing(target, real_plan, sandbox, capsys):
    tmp, marker, calls, imported = sandbox
    plan_file = _write(tmp / "plan.yaml", _plan_data(real_plan, target))
    other = _plan_data(real_plan, target)
    other["predicted"] = None  # --why-not OTHER must score it: the model is needed again
    other_file = _write(tmp / "other.json", other)
    failures = []
    for argv in _commands(tmp, plan_file, other_file, _new_point(real_plan)):
        t0 = time.perf_counter()
        rc = main(argv)
        seconds = time.perf_counter() - t0
        _, err = capsys.readouterr()
        failures += _check_clean(argv, rc, err, seconds)
        if "--why-not" in argv:  # scoring a new point needs the model: refused, with what to do
            assert rc == 2 and "is not a bundled model" in err and "--model" in err, err
    assert not failures, "\n".join(failures)
    assert not calls, calls
    assert not marker.exists(), marker.read_text()
    assert EVIL not in sys.modules
    named = [m for m in imported if m.split(".")[0] in TARGET_MODULES]
    assert not named, named
    exported = (tmp / "megatron.sh").read_text()
    assert all(ln.startswith(("#", "MEGATRON_ARGS=(", "  --", ")")) for ln in exported.splitlines())


def test_control_characters_in_names_cannot_add_lines_to_exports(real_plan, sandbox, capsys):
    """A name holding a newline would end the comment line of an exported config and start a
    command in the Megatron args file that users `source`."""
    tmp, marker, _calls, _imported = sandbox
    evil = f"gpt-tiny\ntouch {marker}\n# "
    plan_file = _write(tmp / "plan.yaml", _plan_data(real_plan, evil))
    for to in ("torchtitan", "megatron"):
        out = tmp / f"out.{to}"
        assert main(["export", plan_file, "--to", to, "-o", str(out)]) == 0
        capsys.readouterr()
        lines = out.read_text().splitlines()
        assert not any(ln.startswith("touch") for ln in lines)
        assert any("gpt-tiny\\ntouch" in ln for ln in lines if ln.startswith("#"))


def test_hardware_files_naming_code_run_nothing(sandbox, capsys):
    """`plan --hw FILE` with every string of the hardware file naming code: planned as data."""
    tmp, marker, calls, imported = sandbox
    data = HardwareSpec.preset("cpu", devices=2).model_dump(mode="json")
    data["name"] = "os:abort"
    data["device"]["name"] = f"{EVIL}:build"
    data["sources"] = {t: t for t in TARGETS}
    failures = []
    for suffix in (".yaml", ".json"):
        hw = _write(tmp / f"hw{suffix}", data)
        argv = ["plan", "gpt-tiny", "--hw", hw, "--format", "json", "-o", str(tmp / "p.yaml")]
        t0 = time.perf_counter()
        rc = main(argv)
        seconds = time.perf_counter() - t0
        out, err = capsys.readouterr()
        failures += _check_clean(argv, rc, err, seconds)
        assert rc == 0 and json.loads(out)["plan"]["hardware"]["name"] == "os:abort"
    assert not failures, "\n".join(failures)
    assert not calls and not marker.exists() and EVIL not in sys.modules
    assert not [m for m in imported if m.split(".")[0] in TARGET_MODULES]


def test_python_tags_are_refused(sandbox, capsys):
    """YAML tags that would construct Python objects stay refused by the safe loader."""
    tmp, marker, calls, _imported = sandbox
    tagged = tmp / "tagged.yaml"
    tagged.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    for argv in (["explain", str(tagged)], ["plan", "gpt-tiny", "--hw", str(tagged)]):
        rc = main(argv)
        _, err = capsys.readouterr()
        assert rc == 2 and "malformed YAML" in err and len(err.strip().splitlines()) == 1, err
    assert not calls and not marker.exists()


def test_only_the_command_line_model_is_imported(real_plan, sandbox, capsys):
    """`--model REF` is the user's own choice: it is imported (the marker appears), and a model
    that is not the plan's is refused by fingerprint, as one line."""
    tmp, marker, _calls, _imported = sandbox
    plan_file = _write(tmp / "plan.yaml", _plan_data(real_plan, f"{EVIL}:build"))
    point = _new_point(real_plan)
    rc = main(["explain", plan_file, "--why-not", point, "--model", "gpt-tiny", "--format", "json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["why_not"]["verdict"] in ("slower", "faster", "same", "does_not_fit")
    assert not marker.exists()
    rc = main(["explain", plan_file, "--why-not", point, "--model", "mlp-tiny"])
    _, err = capsys.readouterr()
    assert rc == 2 and "traces to a different model" in err and len(err.strip().splitlines()) == 1, err
    rc = main(["explain", plan_file, "--why-not", point, "--model", f"{EVIL}:build"])
    capsys.readouterr()
    assert rc == 2 and marker.exists()  # imported because the user asked for it


def test_subprocess_is_not_aborted(real_plan, tmp_path):
    """The issue's reproduction, as a real process: exit 2 with one line, not SIGABRT."""
    plan_file = _write(tmp_path / "plan.yaml", _plan_data(real_plan, "os:abort"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    proc = subprocess.run(
        [sys.executable, "-m", "planner.cli", "explain", plan_file, "--why-not", _new_point(real_plan)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--model" in proc.stderr
