"""The import rules of the package layout (README, Layout of the code): every import of a transferlab module
points down the list of layers, and reporting imports only what reads result files."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "transferlab"
LAYERS = ["core", "data", "models", "features", "train", "sweep", "reporting", "deploy", "track", "api", "cli"]
RANK = {name: i for i, name in enumerate(LAYERS)}
SAME_FLOOR = {frozenset({"reporting", "deploy"})}  # neither imports the other
REPORTING_MAY_IMPORT = {"transferlab.core", "transferlab.train.limits", "transferlab.sweep.ledger", "transferlab.sweep.manifest",
                        "transferlab.reporting"}


def imports() -> list[tuple[str, str, str]]:
    """(layer of the importing file, imported transferlab module, file) for every import in src."""
    found = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        layer = rel.parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transferlab"):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("transferlab")]
            found += [(layer, name, str(rel)) for name in names]
    return found


def test_every_layer_has_a_package():
    assert {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(LAYERS) - {"api"}


def test_imports_point_down_the_layers():
    upward = []
    for layer, module, where in imports():
        target = module.split(".")[1] if "." in module else "cli"  # the package face stands above everything
        if layer not in RANK or target not in RANK or target == layer:
            continue
        if RANK[target] > RANK[layer] or frozenset({layer, target}) in SAME_FLOOR:
            upward.append(f"{where} imports {module}")
    assert upward == []


def test_reporting_reads_result_files_only():
    wrong = [f"{where} imports {module}" for layer, module, where in imports()
             if layer == "reporting" and not any(module == m or module.startswith(m + ".") for m in REPORTING_MAY_IMPORT)]
    assert wrong == []


def test_a_module_has_at_most_350_lines_and_a_class_at_most_150():
    big = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > 350:
            big.append(f"{path.relative_to(SRC)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 150:
                big.append(f"{path.relative_to(SRC)}:{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert big == []


def test_no_modules_import_each_other_in_a_loop():
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        parts = ["transferlab", *rel.parts]
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        targets = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transferlab"):
                targets |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}  # a submodule, or a name
    modules = set(graph)
    graph = {m: {t for t in targets if t in modules} - {m} for m, targets in graph.items()}
    for m, targets in graph.items():  # "from package import submodule" names the submodule, not the package face
        graph[m] = {t for t in targets if not any(s.startswith(t + ".") and s in targets for s in targets)}
    loops = []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        if node in stack:
            loops.append(" -> ".join(stack[stack.index(node):] + [node]))
            return
        if node in done:
            return
        for target in sorted(graph.get(node, ())):
            visit(target, stack + [node], done)
        done.add(node)

    finished: set[str] = set()
    for module in sorted(graph):
        visit(module, [], finished)
    assert loops == []
