"""The layout ARCHITECTURE.md describes: no import cycles (imports inside functions and
type-checking blocks count too), the core free of the CLI's libraries, and a light CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import transferkit

PACKAGE = Path(transferkit.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every transferkit module -> the transferkit modules it imports, wherever it does."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            found |= {t for t in targets if t in modules and t != "transferkit"}
        graph[name] = found - {name}
    return graph


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError(" -> ".join([*cycle]))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_core_never_imports_the_cli_libraries():
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "cli":  # the edge: the only package that imports them
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {alias.name.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module.split(".")[0] for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and node.module}
        assert not names & {"typer", "rich"}, path


# ARCHITECTURE.md's layers, top first; a module may import its own layer and those below. A
# module's package gives its layer; only the modules directly under transferkit/ are named.
PACKAGES = ["cli", "commands", "reports", "training", None, "data runs bases", None]
FOUNDATIONS = {"files", "cache", "workers"}  # beside data/, runs/ and bases/
LEAVES = {"", "config", "errors", "reporting", "quiet", "stats"}
BLOCKS, LOW, LEAF = 4, 5, 6


def _layer(module: str) -> int:
    name = module.removeprefix("transferkit").removeprefix(".")
    top = name.split(".")[0]
    if name == "__main__":
        return 0
    for layer, packages in enumerate(PACKAGES):
        if packages is not None and top in packages.split() and "." in name or (
                packages is not None and name in packages.split()):
            return layer
    return LEAF if top in LEAVES else LOW if name in FOUNDATIONS else BLOCKS


def test_every_module_has_a_layer_and_no_import_points_up():
    upward = [f"{module} -> {target}" for module, targets in _imports().items()
              for target in targets if _layer(target) < _layer(module)]
    assert upward == []


def test_leaves_import_no_other_transferkit_module():
    graph = _imports()
    assert graph["transferkit.errors"] == set() and graph["transferkit.reporting"] == set()
    assert graph["transferkit.config"] <= {"transferkit.errors", "transferkit.config.fields"}
    assert graph["transferkit.config.fields"] <= {"transferkit.errors"}
    assert graph["transferkit.cache"] <= {"transferkit.errors"}
    assert graph["transferkit.stats"] == set()


def test_importing_the_cli_loads_no_tensorflow():
    check = ("import sys, transferkit.cli; "
             "assert not {'tensorflow', 'keras'} & set(sys.modules), 'loaded at import'")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def test_functions_stay_short_and_the_cli_thin():
    """The longest function reads in one screen; cli/app.py is options -> config -> core:
    about 15 lines per command beside the shared helpers (the cheap checks are in
    prechecks.py, the error rendering and TensorFlow's loading in running.py)."""
    longest = max(
        (node.end_lineno - node.lineno + 1, f"{path.name}:{node.name}")
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))
    assert longest[0] < 60, longest
    assert len((PACKAGE / "cli" / "app.py").read_text(encoding="utf-8").splitlines()) < 450
