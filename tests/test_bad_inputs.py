"""Bad input catalogue (issue 8): every case gives ONE clear message naming the field / module /
arithmetic, the value and what to do; the CLI exits 2 with no traceback.

Each case is a (name, callable, needles) entry: the callable must raise specs.SpecError (a
ValueError) whose message is one line (or pydantic's "N problems" block, never its raw dump)
and contains every needle. CLI cases run `planner.cli.main` in-process (an escaping exception
fails the test as a traceback would) and a few run the installed `autoplan` script as a
subprocess to check exit code 2 and a traceback-free stderr. `benchmarks/reliability_report.py`
counts the same catalogue.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from planner.models import build_model
from runtime.mesh import validate_world
from specs import Constraints, HardwareSpec, Plan, SpecError, TrainSpec
from specs._base import validate_model
from tests.graphs import gpt_graph
from tests.runtime_plans import make_plan

ROOT = Path(__file__).resolve().parents[1]
AUTOPLAN = str(ROOT / ".venv" / "bin" / "autoplan")


def _good() -> dict:
    return make_plan("gpt-tiny").model_dump(mode="json")


def _mut(fn):
    """A Plan.from_dict call on a copy of a valid plan dict changed by fn."""
    data = copy.deepcopy(_good())
    fn(data)
    return lambda: Plan.from_dict(data)


def _write(tmp: Path, name: str, text: str | bytes) -> str:
    p = tmp / name
    (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    return str(p)


def _hw_dict() -> dict:
    return HardwareSpec.preset("dgx-a100-80gb", devices=8).model_dump(mode="json")


def _hw_file(tmp: Path, fn) -> str:
    import yaml

    data = _hw_dict()
    fn(data)
    return _write(tmp, "hw.yaml", yaml.safe_dump(data))


class Untraceable(nn.Module):
    """Control flow on a tensor value: neither fx nor export can capture it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return y if y.sum() > 0 else -y


def _plan(**kw):
    from planner import autoplan

    return autoplan(None, kw.pop("hw"), **kw)


def _untraceable():
    from planner import trace

    return trace(Untraceable(), (torch.zeros(2, 4),))


def _wrong_shape():
    from planner import trace

    built = build_model("gpt-tiny", device="meta")
    return trace(built.module, (torch.zeros(2, 3, 4, dtype=torch.long, device="meta"),))


def _fingerprint():
    from runtime.parallelize import validate_model as validate_runtime_model

    built = build_model("gpt-tiny", device="meta")
    validate_runtime_model(built.module, make_plan("gpt-tiny", fingerprint="0" * 32), built.example_inputs)


PY_TAG_YAML = "model: !!python/object/apply:os.system ['echo pwned > /tmp/autoplan-pwned']\n"


def api_cases(tmp: Path) -> list[tuple[str, object, tuple[str, ...]]]:
    """Bad inputs to the Python API (specs, plans, constraints, planner, models, runtime checks)."""
    g6 = gpt_graph(vocab=1000, hidden=240, layers=4, heads=6, seq_len=128)
    g = gpt_graph(vocab=1000, hidden=256, layers=4, heads=8, seq_len=128)
    big = gpt_graph(vocab=50000, hidden=12288, layers=96, heads=96, seq_len=2048)
    hw8 = HardwareSpec.preset("dgx-a100-80gb", devices=8)
    hw1 = HardwareSpec.preset("dgx-a100-80gb", devices=1)
    good_yaml = Path(tmp / "good.yaml")
    make_plan("gpt-tiny").to_file(good_yaml)
    text = good_yaml.read_text()
    return [
        # --- files: syntax, shape, safety
        ("malformed YAML", lambda: Plan.from_file(_write(tmp, "m.yaml", "mesh: {dp: 1\ntp: [")),
         ("m.yaml", "malformed YAML at line")),
        ("malformed JSON", lambda: Plan.from_file(_write(tmp, "m.json", '{"mesh": {"dp": 1,}}')),
         ("m.json", "malformed JSON at line 1")),
        ("plan is a list", lambda: Plan.from_file(_write(tmp, "l.yaml", "- 1\n- 2\n")),
         ("a plan file must be a mapping (got list)",)),
        ("empty plan file", lambda: Plan.from_file(_write(tmp, "e.yaml", "")),
         ("a plan file must be a mapping (got NoneType)",)),
        ("binary plan file", lambda: Plan.from_file(_write(tmp, "b.yaml", b"\x80\xff\x00\x81")),
         ("not a text file",)),
        ("missing plan file", lambda: Plan.from_file(tmp / "nope.yaml"), ("nope.yaml: file not found",)),
        ("python tag in YAML", lambda: Plan.from_file(_write(tmp, "evil.yaml", PY_TAG_YAML)),
         ("malformed YAML", "python/object/apply")),
        ("python tag in hardware", lambda: HardwareSpec.load(_write(tmp, "evil-hw.yaml", PY_TAG_YAML)),
         ("malformed YAML", "python/object/apply")),
        # --- plans: keys, values, arithmetic
        ("unknown top-level key", _mut(lambda d: d.update(meshh={"dp": 1})), ("meshh: unknown key",)),
        ("unknown nested key", _mut(lambda d: d["mesh"].update(dpp=2)), ("mesh.dpp: unknown key", "spelling")),
        ("zero tp", _mut(lambda d: d["mesh"].update(tp=0)), ("mesh.tp", "greater than 0", "got 0")),
        ("negative dp", _mut(lambda d: d["mesh"].update(dp=-2)), ("mesh.dp", "greater than 0", "got -2")),
        ("non-integer degree", _mut(lambda d: d["mesh"].update(pp="two")), ("mesh.pp", "integer", "'two'")),
        ("zero micro-batch", _mut(lambda d: d["pipeline"].update(micro_batch_size=0)),
         ("pipeline.micro_batch_size", "greater than 0")),
        ("degrees vs devices", _mut(lambda d: d["mesh"].update(tp=2)),
         ("tp(2) * pp(1) * dp(1) = 2, but the hardware has 1 devices",)),
        ("stages skip blocks", _mut(lambda d: d["pipeline"]["stages"][0].update(first=1)),
         ("pipeline.stages.0: starts at block 1 but block 0 is next", "skips")),
        ("stages repeat blocks", lambda: _repeat_stage(), ("pipeline.stages.1", "repeats")),
        ("stage last before first", _mut(lambda d: d["pipeline"]["stages"][0].update(first=3, last=2)),
         ("last block 2 comes before first block 3",)),
        ("unknown schedule", _mut(lambda d: d["pipeline"].update(schedule="pipedream")),
         ("pipeline.schedule", "'gpipe', '1f1b', 'interleaved_1f1b' or 'zero_bubble'", "'pipedream'")),
        ("virtual stages need interleaving", _mut(lambda d: d["pipeline"].update(virtual_stages=2)),
         ("pipeline.virtual_stages: 2 needs schedule interleaved_1f1b",)),
        ("batch arithmetic", _mut(lambda d: d["train"].update(global_batch_size=7)),
         ("micro_batch_size(8) * num_micro_batches(1) * dp(1) = 8", "global_batch_size is 7")),
        ("plan version", lambda: Plan.from_file(_write(tmp, "v.yaml", text.replace("version: 1", "version: 99"))),
         ("plan format version 99", "autoplan plan")),
        ("hsdp shard size", _mut(lambda d: d["data_parallel"].update(sharding="hsdp", hsdp_shard_size=3)),
         ("data_parallel.hsdp_shard_size", "divides dp(1)")),
        ("plan for another world size", lambda: validate_world(Plan.from_file(good_yaml), 4),
         ("pp(1) * dp(1) * tp(1) = 1 processes, but 4 were launched", "--nproc-per-node")),
        ("plan for another model", _fingerprint, ("model.fingerprint: the plan was made for a model",)),
        # --- hardware
        ("unknown preset", lambda: HardwareSpec.load("dgx-z100"), ("unknown hardware preset 'dgx-z100'", "cpu")),
        ("preset syntax", lambda: HardwareSpec.load("dgx a100"), ("hardware 'dgx a100'", "dgx-a100-80gb:16")),
        ("devices not whole nodes", lambda: HardwareSpec.load("dgx-a100-80gb:12"),
         ("12 devices is not a whole number of 8-device nodes",)),
        ("zero devices", lambda: HardwareSpec.load("dgx-a100-80gb:0"), ("devices: must be >= 1 (got 0)",)),
        ("negative device memory", lambda: HardwareSpec.load(_hw_file(tmp, lambda d: d["device"].update(memory_bytes=-1))),
         ("device.memory_bytes", "greater than 0", "got -1")),
        ("zero peak flops", lambda: HardwareSpec.load(_hw_file(tmp, lambda d: d["device"]["peak_flops_per_s"].update(bf16=0))),
         ("peak_flops_per_s.bf16: must be > 0",)),
        # --- train spec and constraints (as loaded from data)
        ("zero global batch", lambda: validate_model(TrainSpec, {"global_batch_size": 0}, "train"),
         ("train: global_batch_size", "greater than 0")),
        ("unknown precision", lambda: validate_model(TrainSpec, {"precision": "fp12"}, "train"),
         ("train: precision", "'fp32', 'bf16' or 'fp16'")),
        ("negative pin", lambda: validate_model(Constraints, {"tp": -1}, "constraints"),
         ("constraints: tp", "greater than 0", "got -1")),
        ("sequence parallel without tp", lambda: validate_model(Constraints, {"tp": 1, "sequence_parallel": True}, "constraints"),
         ("sequence_parallel: needs tp > 1",)),
        ("pin above bound", lambda: validate_model(Constraints, {"tp": 8, "max_tp": 4}, "constraints"),
         ("tp: pinned to 8 but max_tp is 4",)),
        # --- planner
        ("tp does not divide heads", lambda: _plan(hw=hw8, graph=g6, constraints=Constraints(tp=4)),
         ("no valid configuration", "tp=4 does not divide", "divisor 6")),
        ("pinned degrees vs devices", lambda: _plan(hw=hw8, graph=g, constraints=Constraints(dp=3)),
         ("constraints: dp(3) = 3 does not divide the 8 devices",)),
        ("all degrees pinned wrong", lambda: _plan(hw=hw8, graph=g, constraints=Constraints(dp=2, tp=2, pp=1)),
         ("dp(2) * tp(2) = 4, but", "has 8 devices")),
        ("memory no plan fits", lambda: _plan(hw=hw1, graph=big),
         ("no configuration fits 80.0 GiB per device", "GiB for model states", "use more devices")),
        # --- models
        ("untraceable model", _untraceable, ("cannot trace module", "Untraceable", "torch.export failed")),
        ("example inputs of the wrong shape", _wrong_shape,
         ("running Transformer on fake tensors failed", "check that example_inputs ((2, 3, 4) int64)")),
        ("model REF does not import", lambda: build_model("nosuchpkg.models:build"),
         ("model 'nosuchpkg.models:build': cannot import module 'nosuchpkg.models'", "ModuleNotFoundError")),
        ("model REF without the factory", lambda: build_model("json:build"),
         ("module 'json' has no callable 'build'",)),
        ("unknown bundled model", lambda: build_model("gpt-huge"), ("unknown model 'gpt-huge'", "gpt-tiny")),
    ]


def _repeat_stage():
    data = make_plan("gpt-tiny", pp=2, num_micro_batches=2).model_dump(mode="json")
    data["pipeline"]["stages"][1]["first"] -= 1  # block first-1 is in both stages
    return Plan.from_dict(data)


FACTORY = '''
import torch
from torch import nn

def wrong_shape():
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), (torch.zeros(2, 5),)

def module_only():
    return nn.Linear(4, 4)

def boom():
    raise RuntimeError("factory bug")


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return y if y.sum() > 0 else -y


def untraceable():
    return nn.Sequential(Branchy(), nn.Linear(4, 4)), (torch.zeros(2, 4),)
'''


def cli_cases(tmp: Path) -> list[tuple[str, list[str], tuple[str, ...]]]:
    """Bad CLI arguments: (name, argv, needles); each must exit 2 with one message."""
    evil = _write(tmp, "evil.yaml", PY_TAG_YAML)
    bad = _write(tmp, "bad.yaml", "mesh: [\n")
    good = tmp / "plan.yaml"
    make_plan("gpt-tiny").to_file(good)
    return [
        ("explain malformed YAML", ["explain", bad], ("bad.yaml: malformed YAML at line",)),
        ("explain python tag", ["explain", evil], ("evil.yaml: malformed YAML", "python/object/apply")),
        ("explain missing file", ["explain", str(tmp / "none.yaml")], ("none.yaml: file not found",)),
        ("unknown preset", ["plan", "gpt-tiny", "--hw", "tpu-v9"], ("unknown hardware preset 'tpu-v9'",)),
        ("bad --pin value", ["plan", "gpt-tiny", "--hw", "cpu:2", "--pin", "tp=banana"],
         ("knob tp: 'banana' is not allowed; allowed: a positive integer",)),
        ("bad --pin name", ["plan", "gpt-tiny", "--hw", "cpu:2", "--pin", "tpp=2"], ("unknown knob 'tpp'",)),
        ("bad --pin form", ["plan", "gpt-tiny", "--hw", "cpu:2", "--pin", "tp"], ("expected NAME=VALUE",)),
        ("zero --batch", ["plan", "gpt-tiny", "--hw", "cpu:2", "--batch", "0"],
         ("train: global_batch_size", "greater than 0 (got 0)")),
        ("zero --top-k", ["plan", "gpt-tiny", "--hw", "cpu:2", "--top-k", "0"], ("top_k",)),
        ("pinned degrees vs devices", ["plan", "gpt-tiny", "--hw", "dgx-a100-80gb:8", "--pin", "dp=3"],
         ("dp(3) = 3 does not divide the 8 devices",)),
        ("model REF does not import", ["plan", "nosuch.pkg:build", "--hw", "cpu:2"],
         ("cannot import module 'nosuch.pkg'",)),
        ("factory raises", ["trace", "badfactory_ap:boom"], ("RuntimeError", "factory bug")),
        ("factory without inputs", ["trace", "badfactory_ap:module_only"], ("without example inputs",)),
        ("factory inputs of the wrong shape", ["trace", "badfactory_ap:wrong_shape"],
         ("check that example_inputs ((2, 5) float32)",)),
        ("untraceable factory", ["trace", "badfactory_ap:untraceable"],
         ("cannot trace module '0' (Branchy)", "torch.cond")),
        ("memory no plan fits", ["plan", "gpt3-175b", "--hw", "dgx-a100-80gb:1"], ("no configuration fits",)),
    ]


def _is_one_message(msg: str) -> bool:
    return "Traceback" not in msg and "errors.pydantic.dev" not in msg and "\n" not in msg.strip()


# ------------------------------------------------------------------ tests


def test_api_catalogue(tmp_path):
    cases = api_cases(tmp_path)
    assert len(cases) >= 30
    failures = []
    for name, fn, needles in cases:
        try:
            fn()
        except SpecError as e:
            msg = str(e)
            missing = [n for n in needles if n not in msg]
            if missing or not _is_one_message(msg):
                failures.append(f"{name}: {msg!r} lacks {missing}")
            continue
        except Exception as e:  # anything else is a crash, not a message
            failures.append(f"{name}: {type(e).__name__}: {e}")
            continue
        failures.append(f"{name}: no error")
    assert not failures, "\n".join(failures)
    assert not Path("/tmp/autoplan-pwned").exists()  # the python tag did not run


def test_cli_catalogue(tmp_path, monkeypatch, capsys):
    from planner.cli import main

    (tmp_path / "badfactory_ap.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    failures = []
    for name, argv, needles in cli_cases(tmp_path):
        rc = main(argv)
        err = capsys.readouterr().err
        missing = [n for n in needles if n not in err]
        if rc != 2 or missing or not _is_one_message(err) or not err.startswith("autoplan "):
            failures.append(f"{name}: rc={rc} {err!r} lacks {missing}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("argv,needle", [
    (["explain", "{bad}"], "malformed YAML"),
    (["plan", "gpt-tiny", "--hw", "cpu:2", "--pin", "zero=7"], "knob"),
    (["trace", "badfactory_ap:wrong_shape"], "check that example_inputs"),
    (["trace", "badfactory_ap:untraceable"], "cannot trace module"),
])
def test_cli_subprocess_exit_2_without_traceback(tmp_path, argv, needle):
    """The installed script: exit 2, one message, and nothing from torch's loggers."""
    (tmp_path / "badfactory_ap.py").write_text(FACTORY)
    bad = _write(tmp_path, "bad.yaml", "mesh: [\n")
    argv = [a.replace("{bad}", bad) for a in argv]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    proc = subprocess.run([AUTOPLAN if os.path.exists(AUTOPLAN) else sys.executable, *(
        [] if os.path.exists(AUTOPLAN) else ["-m", "planner.cli"]), *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_model_ref_imported_only_when_named(tmp_path, monkeypatch):
    """Loading and validating a plan that names a factory REF does not import it; building does."""
    marker = tmp_path / "imported"
    (tmp_path / "sidefx_ap.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("yes")
        import torch
        def build():
            return torch.nn.Linear(2, 2), (torch.zeros(1, 2),)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    data = _good()
    data["model"]["name"] = "sidefx_ap:build"
    path = tmp_path / "p.yaml"
    Plan.from_dict(data).to_file(path)
    plan = Plan.from_file(path)
    validate_world(plan, 1)
    assert plan.model.name == "sidefx_ap:build" and not marker.exists()
    build_model("sidefx_ap:build", device="meta")
    assert marker.exists()
