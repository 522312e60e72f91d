"""DESIGN.md: imports point one way (specs <- cost_models <- planner <- runtime) and only
runtime/ imports torch.distributed. Walks every module's imports with ast."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["specs", "cost_models", "planner", "runtime"]
# What each package may import from the others (besides itself).
ALLOWED = {
    "specs": set(),
    "cost_models": {"specs"},
    "planner": {"specs", "cost_models"},
    "runtime": {"specs", "cost_models", "planner"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            # `from torch import distributed`
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def violations(root: Path = ROOT) -> list[str]:
    bad = []
    for pkg in ORDER:
        for path in sorted((root / pkg).rglob("*.py")):
            seen = set()
            for lineno, name in _imports(path):
                top = name.split(".")[0]
                where = f"{path.relative_to(root)}:{lineno}"
                if pkg != "runtime" and (name == "torch.distributed" or name.startswith("torch.distributed.")):
                    if (lineno, "dist") not in seen:
                        bad.append(f"{where} imports {name} (only runtime/ may)")
                    seen.add((lineno, "dist"))
                if top in ORDER and top != pkg and top not in ALLOWED[pkg]:
                    if (lineno, top) not in seen:
                        bad.append(f"{where} imports {name} ({pkg} may import only {sorted(ALLOWED[pkg])})")
                    seen.add((lineno, top))
    return bad


def test_layering_holds():
    assert violations() == []


def test_layering_check_catches_a_violation(tmp_path):
    for pkg in ORDER:
        (tmp_path / pkg).mkdir()
    (tmp_path / "cost_models" / "bad.py").write_text("import torch.distributed as dist\nfrom planner import x\n")
    (tmp_path / "specs" / "bad.py").write_text("from torch import distributed\n")
    found = violations(tmp_path)
    assert len(found) == 3, found
    assert any("only runtime/" in f for f in found)
    assert any("cost_models may import only" in f for f in found)


@pytest.mark.parametrize("pkg", ["specs"])
def test_specs_import_only_pydantic_yaml_stdlib(pkg):
    import sys

    stdlib = set(sys.stdlib_module_names)
    for path in (ROOT / pkg).rglob("*.py"):
        for _, name in _imports(path):
            top = name.split(".")[0]
            assert top in stdlib or top in {"pydantic", "yaml", "specs", "__future__"}, f"{path}: {name}"
