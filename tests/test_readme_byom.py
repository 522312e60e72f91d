"""Tier 3: README's "Bring your own model and loop" runs as written: its `# file:` blocks are written
to a fresh folder and its command blocks run there, in order (2 gloo processes for torchrun)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Bring your own model and loop")
    return text[start:text.index("\n## ", start + 1)]


def _blocks(section: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", section, re.S)]


@pytest.mark.tier3
def test_readme_bring_your_own_model_runs_as_written(tmp_path):
    blocks = _blocks(_section())
    files = [b for lang, b in blocks if lang == "python" and b.startswith("# file: ")]
    commands = [line for lang, b in blocks if lang == "" for line in b.splitlines() if line.strip()]
    assert len(files) == 2 and len(commands) == 4, (len(files), commands)
    for body in files:
        name = body.splitlines()[0].removeprefix("# file: ").strip()
        (tmp_path / name).write_text(body)
    bindir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    outputs = []
    for cmd in commands:
        argv = shlex.split(cmd)
        if argv[0] == "torchrun":  # the venv's torchrun; gloo on this CPU machine
            argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
        out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        outputs.append(out.stdout)
    assert (tmp_path / "myplan.yaml").exists()
    losses = [float(x) for x in re.findall(r"step \d+ loss ([0-9.]+)", outputs[-1])]
    assert len(losses) == 8 and losses[-1] < losses[0], outputs[-1]  # 64 samples / global batch 8
    assert "eval loss" in outputs[-1]
    from safetensors.torch import load_file

    sys.path.insert(0, str(tmp_path))
    try:
        from mymodel import TinyLM
    finally:
        sys.path.remove(str(tmp_path))
    fresh = TinyLM()
    fresh.load_state_dict(load_file(str(tmp_path / "trained.safetensors")), strict=True)
    assert all(torch.isfinite(p).all() for p in fresh.parameters())
