"""DESIGN.md: imports point one way (specs <- cost_models <- planner <- runtime) and only
runtime/ imports torch.distributed. Walks every module's imports with ast: import statements at
any depth, and dynamic imports of a name the code spells out (`importlib.import_module("x")`,
`__import__("x")`, `runpy.run_module("x")`, also through an alias or an f-string of constants).
A module name computed at run time (a user's `--model pkg.mod:fn`) is the user's, not ours."""

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


# functions that import the module named by their first argument
DYNAMIC_IMPORTERS = {"import_module", "__import__", "run_module"}


def _constant_str(node: ast.expr) -> str | None:
    """A string the code spells out: a literal, "a" + "b", or an f-string of literals."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _constant_str(node.left), _constant_str(node.right)
        return None if left is None or right is None else left + right
    if isinstance(node, ast.JoinedStr):
        parts = [_constant_str(v) for v in node.values]
        return None if None in parts else "".join(p for p in parts if p is not None)
    return None


def _dynamic_import(node: ast.Call) -> str | None:
    """The module `importlib.import_module("runtime.mesh")` and the like import, if spelled out."""
    func = node.func
    if isinstance(func, ast.Attribute):
        name = func.attr
    elif isinstance(func, ast.Name):
        name = func.id
    else:
        return None
    if name not in DYNAMIC_IMPORTERS:
        return None
    keywords = [k.value for k in node.keywords if k.arg == "name"]
    module = node.args[0] if node.args else next(iter(keywords), None)
    return None if module is None else _constant_str(module)


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
        elif isinstance(node, ast.Call) and (module := _dynamic_import(node)):
            out.append((node.lineno, module))
    return out


def violations(root: Path = ROOT) -> list[str]:
    bad = []
    for pkg in ORDER:
        for path in sorted((root / pkg).rglob("*.py")):
            seen = set()
            for lineno, name in _imports(path):
                top = name.split(".")[0]
                where = f"{path.relative_to(root)}:{lineno}"
                distributed = name == "torch.distributed" or name.startswith("torch.distributed.")
                if pkg != "runtime" and distributed:
                    if (lineno, "dist") not in seen:
                        bad.append(f"{where} imports {name} (only runtime/ may)")
                    seen.add((lineno, "dist"))
                if top in ORDER and top != pkg and top not in ALLOWED[pkg]:
                    if (lineno, top) not in seen:
                        allowed = sorted(ALLOWED[pkg])
                        bad.append(f"{where} imports {name} ({pkg} may import only {allowed})")
                    seen.add((lineno, top))
    return bad


def test_layering_holds():
    assert violations() == []


def test_layering_check_catches_a_violation(tmp_path):
    for pkg in ORDER:
        (tmp_path / pkg).mkdir()
    (tmp_path / "cost_models" / "bad.py").write_text(
        "import torch.distributed as dist\nfrom planner import x\n"
    )
    (tmp_path / "specs" / "bad.py").write_text("from torch import distributed\n")
    found = violations(tmp_path)
    assert len(found) == 3, found
    assert any("only runtime/" in f for f in found)
    assert any("cost_models may import only" in f for f in found)


def test_layering_check_catches_dynamic_imports(tmp_path):
    for pkg in ORDER:
        (tmp_path / pkg).mkdir()
    (tmp_path / "planner" / "cli.py").write_text(
        "import importlib\n"
        "import importlib as il\n"
        "from importlib import import_module\n"
        "def run():\n"
        "    importlib.import_module('runtime.launch')\n"          # line 5
        "    __import__('importlib').import_module('runtime')\n"  # 6: the old cli.py trick
        "    il.import_module(name='runtime.' + 'calibrate')\n"   # 7
        "    import_module(f'runtime.mesh')\n"                    # 8
        "    __import__('torch.distributed')\n"                   # 9
        "    importlib.import_module(user_module)\n"              # a name the user gives: fine
        "    __import__('importlib').import_module('planner.models')\n"  # planner itself: fine
    )
    found = violations(tmp_path)
    lines = sorted(int(f.split(":")[1].split()[0]) for f in found)
    assert lines == [5, 6, 7, 8, 9], found
    assert any("runtime.calibrate" in f for f in found) and any("only runtime/" in f for f in found)


@pytest.mark.parametrize("pkg", ["specs"])
def test_specs_import_only_pydantic_yaml_stdlib(pkg):
    import sys

    stdlib = set(sys.stdlib_module_names)
    for path in (ROOT / pkg).rglob("*.py"):
        for _, name in _imports(path):
            top = name.split(".")[0]
            allowed = {"pydantic", "yaml", "specs", "__future__"}
            assert top in stdlib or top in allowed, f"{path}: {name}"
