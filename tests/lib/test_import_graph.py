"""The library's import graph: every module imports alone, no cycle, no stage imports one above it.

Stages, bottom to top, follow the README's pipeline. A module may import from its own stage or
any below it; ``catalogue`` (every built-in criterion and recovery step) sits above all the
stages it lists, and only the session and the CLI above it look things up by name.
"""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "explorer"
STAGES = [
    ["errors", "progress", "registry"],
    ["model"],
    ["data", "evaluate", "text_safety", "zero_shot"],
    ["scoring"],
    ["planning"],
    ["apply"],
    ["recovery"],
    ["export"],
    ["catalogue"],
    ["session", "policy"],
    ["cli", "__main__", ""],  # "": the package's own __init__ (lazily imports the export)
]
LEVEL = {name: level for level, names in enumerate(STAGES) for name in names}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["explorer", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ``explorer`` that ``name`` imports anywhere (also inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "explorer")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "explorer":
                base = node.module
            else:
                continue
            for alias in node.names:  # "from .scoring import criteria" imports a module
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return found & known


def stage(name: str) -> int:
    return LEVEL[name.split(".")[1] if "." in name else ""]


def graph() -> nx.DiGraph:
    mods = modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, path in mods.items():
        g.add_edges_from((name, target) for target in imports(name, path, set(mods)))
    return g


def test_every_module_has_a_stage():
    for name in modules():
        stage(name)  # a KeyError names a module that STAGES forgot


def test_no_import_cycle():
    cycles = list(nx.simple_cycles(graph()))
    assert not cycles, cycles


def test_no_module_imports_from_a_stage_above_it():
    upward = [(a, b) for a, b in graph().edges if stage(b) > stage(a)]
    assert not upward, upward


def test_the_library_imports_no_ui():
    for name, path in modules().items():
        text = path.read_text()
        assert "import gradio" not in text and "from components" not in text, name


def test_every_module_imports_alone():
    """Each module in a fresh set of ``explorer`` modules: nothing relies on an import order."""
    names = sorted(set(modules()) - {"explorer.__main__"})  # a script: it runs the CLI
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] == 'explorer']:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_catalogue_lists_every_criterion_and_step_defined():
    """Explicit registration: a Criterion or RecoveryStep defined but not listed is a mistake."""
    from explorer import catalogue
    from explorer.recovery.steps import RecoveryStep
    from explorer.scoring.base import Criterion

    defined = {Criterion: set(), RecoveryStep: set()}
    for name in modules():
        if name.startswith(("explorer.scoring", "explorer.recovery")):
            for value in vars(importlib.import_module(name)).values():
                for kind in defined:
                    if isinstance(value, kind):
                        defined[kind].add(value.name)
    assert defined[Criterion] == set(catalogue.CRITERIA)
    assert defined[RecoveryStep] == set(catalogue.RECOVERY_STEPS)
