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
    {"cli", "train", "plan", "megatron_args"},
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
        f"{rel}:{line} ({mod})"
        for line, mod in _imports_in_functions(tree)
        if mod == "megatron_endprompt" or mod.startswith("megatron_endprompt.")
    ]
    assert not hidden, "package import inside a function: " + ", ".join(hidden)


def _imported_modules(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: inside the package
            return ["megatron_endprompt." + (node.module or "")]
        return [node.module or ""]
    return [a.name for a in node.names]


def _imports_in_functions(tree: ast.Module) -> list[tuple[int, str]]:
    """``(line, module)`` of every import statement inside a function body (nested ones too)."""
    found: dict[int, tuple[int, str]] = {}
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            for sub in ast.walk(fn):
                if isinstance(sub, ast.Import | ast.ImportFrom):
                    for mod in _imported_modules(sub):
                        found[id(sub), mod] = (sub.lineno, mod)
    return sorted(found.values())


# The only imports allowed inside a function body outside the package's own (which the test above
# confines to the entry points): optional dependencies, loaded only when their feature is used,
# and the one torch import of the torch-free config layer. Exact (file, module) pairs: anything
# else, a megatron-core import included (a required dependency, imported at the module top),
# fails. An entry that no longer matches fails too, so the list stays exact.
LAZY_IMPORTS = {
    # matplotlib (optional): coverage and loss plots only.
    ("coverage.py", "matplotlib.backends.backend_agg"): "optional matplotlib",
    ("coverage.py", "matplotlib.figure"): "optional matplotlib",
    ("training/logging.py", "matplotlib.backends.backend_agg"): "optional matplotlib",
    ("training/logging.py", "matplotlib.figure"): "optional matplotlib",
    # tensorboard (optional): --tensorboard-dir only.
    ("training/logging.py", "torch.utils.tensorboard"): "needs the optional tensorboard package",
    # Transformer Engine (optional): the probe behind --transformer-impl te's install hint.
    # megatron-core's gpt_layer_specs imports without TE, so it sits at the top of model/specs.py.
    ("model/specs.py", "transformer_engine"): "optional Transformer Engine",
    # Tokenizer back ends (optional): only the configured one is loaded.
    ("data/sp_tokenizers.py", "sentencepiece"): "optional sentencepiece",
    ("data/hf_tokenizers.py", "tokenizers"): "optional Hugging Face tokenizers",
    ("data/misc_tokenizers.py", "tiktoken"): "optional tiktoken",
    ("prep/tokenizer_training.py", "sentencepiece"): "optional sentencepiece",
    # nltk (optional): preprocessing's --split-sentences only.
    ("prep/sentences.py", "nltk"): "optional nltk",
    ("prep/sentences.py", "nltk.tokenize"): "optional nltk",
    ("prep/sentences.py", "nltk.tokenize.punkt"): "optional nltk",
    # Hugging Face transformers (optional): --hf-dir evaluation only.
    ("eval/decoding.py", "transformers"): "optional transformers",
    ("eval/loading.py", "transformers"): "optional transformers",
    # The config layer stays torch-free, so a bad flag fails before torch loads.
    ("config/fp8.py", "torch"): "config layer imports torch only to check an FP8 request",
    ("config/batch_ramp.py", "megatron.core.num_microbatches_calculator"): "config layer "
    "imports megatron-core's batch-size calculator only for a --rampup-batch-size run",
    # numpy 2 moved numpy.core to numpy._core: a try/except ImportError version fallback.
    ("checkpoint/shards.py", "numpy._core.multiarray"): "numpy >= 2 / 1.x fallback",
    ("checkpoint/shards.py", "numpy.core.multiarray"): "numpy >= 2 / 1.x fallback",
}


def _lazy_imports() -> list[tuple[str, int, str]]:
    out = []
    for path in MODULES:
        rel = str(path.relative_to(PACKAGE))
        for line, mod in _imports_in_functions(ast.parse(path.read_text(encoding="utf-8"))):
            out.append((rel, line, mod))
    return out


def test_imports_inside_functions_are_optional_dependencies_only():
    bad = [
        f"{rel}:{line} imports {mod} inside a function"
        for rel, line, mod in _lazy_imports()
        if not (mod == "megatron_endprompt" or mod.startswith("megatron_endprompt."))
        and (rel, mod) not in LAZY_IMPORTS
    ]
    assert not bad, (
        "move these imports to the module top (or, for a new optional dependency, add the exact "
        "(file, module) to LAZY_IMPORTS with the reason):\n" + "\n".join(bad)
    )


def test_lazy_import_allowlist_has_no_stale_entries():
    used = {(rel, mod) for rel, _, mod in _lazy_imports()}
    stale = sorted(set(LAZY_IMPORTS) - used)
    assert not stale, f"LAZY_IMPORTS entries that match no import any more: {stale}"


def test_test_module_names_are_unique():
    """pytest imports test files and their helpers by basename (the folders are not packages):
    two files of one name stop the whole run at collection ("import file mismatch").
    conftest.py files are told apart by pytest itself."""
    tests = Path(__file__).resolve().parents[1]
    seen: dict[str, list[str]] = {}
    for path in tests.rglob("*.py"):
        if path.name != "conftest.py":
            seen.setdefault(path.name, []).append(str(path.relative_to(tests)))
    clashes = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not clashes, clashes
