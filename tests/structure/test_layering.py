"""The package's layering: a module imports only from its own layer or lower ones.

Layers, lowest first (DESIGN.md): pure helpers < config < device (process groups, the one module
that names CUDA) < data (runtime) and prep (offline) < model < checkpoint < training <
eval / convert / planning < the command-line front ends. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_endprompt"

LAYERS = [
    {"positions", "atomic_io", "passkey_text"},
    {"config", "run_config", "fp8", "recipes", "cli_utils"},
    {"device"},
    {"data", "prep"},
    {"model"},
    {"checkpoint"},
    {"training"},
    {"eval", "convert", "coverage"},
    {"cli", "train", "plan"},
]


def _unit(module: str) -> str:
    """``megatron_endprompt.a.b`` -> ``a`` (the top-level module or subpackage)."""
    return module.split(".")[1]


def _layer(unit: str) -> int:
    for i, units in enumerate(LAYERS):
        if unit in units:
            return i
    raise AssertionError(f"megatron_endprompt.{unit} is in no layer: add it to LAYERS")


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods = [node.module]
            if node.module == "megatron_endprompt":  # from megatron_endprompt import device
                mods = [f"megatron_endprompt.{a.name}" for a in node.names]
            found += [(node.lineno, m) for m in mods]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in found if m.startswith("megatron_endprompt.")]


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_imports_point_down(path):
    rel = path.relative_to(PACKAGE)
    own = rel.parts[0].removesuffix(".py")
    if own == "__init__":
        return
    bad = [
        f"{rel}:{line} imports {mod} (layer {_layer(_unit(mod))} > {_layer(own)})"
        for line, mod in _imports(path)
        if _layer(_unit(mod)) > _layer(own)
    ]
    assert not bad, "\n".join(bad)


def test_every_unit_has_a_layer():
    units = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in MODULES}
    for unit in units - {"__init__"}:
        _layer(unit)


# Entry points import the heavy stack lazily, so a bad flag fails in a second, before torch and
# megatron-core load; everywhere else the package's own imports sit at the top of the module.
LAZY_ENTRY_POINTS = {"train.py", "eval/cli.py"}


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_package_imports_are_at_module_top(path):
    rel = str(path.relative_to(PACKAGE))
    if rel in LAZY_ENTRY_POINTS:
        return
    tree = ast.parse(path.read_text(encoding="utf-8"))
    hidden = [
        f"{rel}:{sub.lineno} in {fn.name}()"
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        for sub in ast.walk(fn)
        if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("megatron_endprompt")
    ]
    assert not hidden, "package import inside a function: " + ", ".join(hidden)
