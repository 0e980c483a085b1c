"""The package's architecture, checked: layers import downward only, no cycles, no class past ~300 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "src" / "fastema"

# Lower layers first; a module may import its own layer and the layers before it, never a later one.
LAYERS = [
    ("core",),
    ("posthoc", "averagers"),
    ("distributed",),
    ("fastai", "_trainer", "lightning", "transformers", "diffusers", "deepspeed"),
    ("bench", "demo", "__main__", "__init__", "_extras", "_compat", "sharded", "callback", "learner_checkpoint"),
]
# `_extras` (optional-framework errors) is a leaf every layer may use.
LEAVES = {"_extras"}
MAX_CLASS_LINES = 300


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def layer_of(name: str) -> int:
    top = name.split(".")[0]
    for index, members in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"fastema.{name} belongs to no layer: add it to LAYERS in {__file__}")


def imports_of(path: Path) -> set[str]:
    """The fastema modules `path` imports (at import time or inside functions), as names inside the package."""
    me = module_name(path)
    # The package a relative import starts from: a package's own name (the root's is empty), else the parent's.
    own_package = [] if me == "__init__" else me.split(".")
    package = own_package if path.name == "__init__.py" else me.split(".")[:-1]
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {  # `if TYPE_CHECKING:` imports never run
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for statement in node.body
        for inner in ast.walk(statement)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "fastema":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from . import x` names a module; `from .x import y` a member of x
                candidate = [*target, alias.name]
                is_module = (PACKAGE.joinpath(*candidate).with_suffix(".py")).exists() or PACKAGE.joinpath(
                    *candidate
                ).is_dir()
                found.add(".".join(candidate if is_module else target))
        elif isinstance(node, ast.Import):
            found.update(
                ".".join(alias.name.split(".")[1:]) for alias in node.names if alias.name.split(".")[0] == "fastema"
            )
    found.discard("")
    found.discard(me)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {module_name(path): imports_of(path) for path in MODULES}


def test_the_walk_sees_the_imports_it_should():
    # A positive control: the walk must find these, or every test below passes vacuously.
    assert "core.tracker" in GRAPH["core.model_ema"]
    assert "core.model_ema" in GRAPH["fastai.callbacks"]
    assert "posthoc.averager" in GRAPH["posthoc"]
    assert {"_compat", "core.model_ema"} <= GRAPH["__init__"]


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_every_module_imports_its_own_layer_or_lower_ones_only(module):
    upward = [target for target in GRAPH[module] if target not in LEAVES and layer_of(target) > layer_of(module)]
    assert not upward, f"fastema.{module} imports a higher layer: {upward}"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if target not in GRAPH:
                continue
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in GRAPH:
        if module not in state:
            visit(module, [module])


def test_no_class_is_past_its_size():
    too_big = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_big.append(f"{module_name(path)}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_big


def test_every_module_imports_alone():
    # What a cycle or a missing import looks like at run time: a module that works only after another ran. One
    # interpreter (torch and the frameworks load once); every fastema module is forgotten before each import.
    names = ["fastema" if not name else f"fastema.{name}" for name in GRAPH]
    script = (
        "import importlib, sys, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m == 'fastema' or m.startswith('fastema.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as error:\n"
        "        failed.append((name, repr(error)))\n"
        "print(failed)\n"
        "sys.exit(1 if failed else 0)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("fastema.sharded", "fastema.distributed"),
        ("fastema.callback", "fastema.fastai"),
        ("fastema.learner_checkpoint", "fastema.fastai.checkpoint"),
    ],
)
def test_a_moved_module_keeps_its_old_path_and_warns_at_the_importing_line(old, new):
    code = (
        "import importlib, warnings\n"
        f"new = importlib.import_module({new!r})\n"  # first, with its own frameworks' warnings as they are
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    import {old} as old\n"
        "for warning in caught:\n"
        "    print('warned', warning.category.__name__, warning.filename, warning.lineno, warning.message)\n"
        "for name in old.__all__:\n"
        "    assert getattr(old, name) is getattr(new, name), name\n"
        "print('names', sorted(old.__all__))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    # Pointed at the user's import (line 5 of the script), so that the user sees it and knows where.
    assert f"warned DeprecationWarning <string> 5 {old} moved to {new}" in run.stdout
    documented = {  # every name the docs showed under the old path
        "fastema.sharded": ["ShardedEMAState", "consolidate_ema", "load_sharded", "save_sharded"],
        "fastema.callback": ["EMACallback", "EMASchedule", "PostHocEMACallback", "posthoc_sweep"],
        "fastema.learner_checkpoint": ["export", "export_ema", "load", "save"],
    }[old]
    assert f"names {documented}" in run.stdout
