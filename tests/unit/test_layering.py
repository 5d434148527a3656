"""The package's folders are its layers (docs/internals.md): a module imports only from its
own package and the packages below it, and no modules import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Lowest first. A package may import its own modules and those of any package listed
# before it; the commands (dcgan/train.py, eval.py, generate.py, shards.py, __init__.py)
# may import anything.
LAYERS = ["base", "models", "config", "run", "data", "checkpoint", "quality", "tracking", "preflight", "training"]
COMMANDS = {"__init__", "train", "eval", "generate", "shards"}


def dcgan_imports(path: Path) -> set[str]:
    """The dcgan modules ``path`` imports, at any depth of the file (also inside functions:
    a lazy import is still a dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dcgan":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (REPO / (sub.replace(".", "/") + ".py")).exists() else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "dcgan"}
    return found


def modules() -> dict[str, set[str]]:
    return {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): dcgan_imports(p)
        for p in sorted((REPO / "dcgan").rglob("*.py"))
    }


def layer_of(module: str) -> str:
    """'dcgan.data.cache' -> 'data'; 'dcgan.preflight' -> 'preflight'; a command -> its name."""
    return module.split(".")[1] if module != "dcgan" else "__init__"


def test_no_module_imports_a_higher_layer():
    wrong = []
    for module, imported in modules().items():
        mine = layer_of(module)
        if mine in COMMANDS:
            continue
        assert mine in LAYERS, f"{module}: a package or module of dcgan/ that LAYERS does not place"
        for other in imported:
            theirs = layer_of(other)
            if theirs in COMMANDS or LAYERS.index(theirs) > LAYERS.index(mine):
                wrong.append(f"{module} ({mine}) imports {other} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = modules()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(graph.get(module, ())):
            if other not in graph:
                continue
            if state.get(other) == 1:
                cycles.append(" -> ".join([*path[path.index(other) :], other]))
            elif other not in state:
                visit(other, [*path, other])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)
