"""The package's layering, read from its sources with ``ast`` (imports inside functions included): no import
cycle, no import that runs up a floor, and the data and model layers independent of each other and of
everything above them. A failure prints the chain of imports that breaks the rule, file and line per step."""
from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "ser_lightning"
ROOT = "ser_lightning"

FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (  # top first; names relative to the package ("" is the package)
    ("entry point", ("cli", "__main__")),
    ("commands and studies", ("lightning_commands", "studies", "inference")),
    ("one run", ("run",)),
    ("configuration parser", ("parser",)),
    ("evaluation, checkpoints, callbacks", ("evaluation", "checkpoints", "callbacks")),
    ("data and models", ("data", "models")),
    ("foundation", ("", "batch", "configs", "errors", "functionals", "normalization", "ops", "outputs", "padding",
                    "plotting", "runtime")),
)
ALLOWED_UP = {("ser_lightning", "ser_lightning.inference.recognizer")}
"""The package's lazy ``EmotionRecognizer`` (imported on first use by ``ser_lightning.__getattr__``)."""
NEVER = {  # importer -> what it never imports, directly or through other modules
    "data": ("models", "evaluation", "run", "studies", "inference", "cli", "parser", "lightning_commands"),
    "models": ("data", "evaluation", "run", "studies", "cli", "parser", "lightning_commands"),
}
"""What the issue asks: the data layer never imports models, evaluation (or the studies), inference or the command
line; the models never import data, evaluation or the command line."""
INDEPENDENT = (("data", "models"), ("lightning_commands", "studies", "inference"))
"""Parts of one floor that never import each other."""

Edge = tuple[str, str, str]  # (importer, imported, "path:line")


def module_names(package_dir: Path, root: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every Python file of the package."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [root, *path.relative_to(package_dir).with_suffix("").parts]
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that runs (at module level or in a function), not those under ``if TYPE_CHECKING:``."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        children = node.orelse if isinstance(node, ast.If) and _is_type_checking(node.test) else ast.iter_child_nodes(node)
        todo.extend(children)
    return sorted(found, key=lambda node: node.lineno)


def _bound_names(path: Path) -> set[str]:
    """Names a package's ``__init__`` binds or exports (what ``from package import name`` can take from it)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(target.id for target in targets if isinstance(target, ast.Name))
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
                names.update(ast.literal_eval(node.value))
    return names


def import_edges(package_dir: Path = PACKAGE_DIR, root: str = ROOT) -> list[Edge]:
    """Every import of one of the package's modules by another, with where it is written."""
    modules = module_names(package_dir, root)
    edges = []
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])])
                # ``from package import name``: the submodule ``name`` unless the package's __init__ binds it (a name
                # it neither binds nor has as a source file is a compiled submodule, such as _C: no imports to follow)
                package_init = base in modules and modules[base].name == "__init__.py"
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules
                           or (package_init and alias.name not in _bound_names(modules[base])) else base
                           for alias in node.names]
            edges += [(module, target, f"{path.relative_to(package_dir.parent)}:{node.lineno}")
                      for target in targets if target in modules and target != module]
    return edges


def _part(module: str, root: str = ROOT) -> str:
    """The first name below the package (``ser_lightning.data.audio`` -> ``data``; the package itself -> "")."""
    return module[len(root) + 1:].split(".")[0] if module != root else ""


def floor_of(module: str) -> int:
    part = _part(module)
    for number, (_, parts) in enumerate(FLOORS):
        if part in parts:
            return number
    raise AssertionError(f"{module} is on no floor: add it to FLOORS in tests/test_layering.py")


def shortest_chain(edges: list[Edge], start: str, goal) -> list[Edge] | None:
    """The shortest chain of imports from ``start`` to a module for which ``goal(module)`` holds."""
    graph: dict[str, list[Edge]] = {}
    for edge in edges:
        graph.setdefault(edge[0], []).append(edge)
    came: dict[str, Edge | None] = {start: None}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for edge in graph.get(module, []):
            if goal(edge[1]):
                chain, at = [edge], edge[0]
                while came[at] is not None:
                    chain.append(came[at])
                    at = came[at][0]
                return chain[::-1]
            if edge[1] not in came:
                came[edge[1]] = edge
                queue.append(edge[1])
    return None


def find_cycle(edges: list[Edge]) -> list[Edge] | None:
    """One import cycle (its edges, in order), or None."""
    for module in sorted({edge[0] for edge in edges}):
        chain = shortest_chain(edges, module, lambda m, start=module: m == start)
        if chain:
            return chain
    return None


def shown(chain: list[Edge]) -> str:
    return "\n".join(f"  {importer} imports {imported}   ({where})" for importer, imported, where in chain)


# ----------------------------------------------------------------------------- the package
@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    found = import_edges()
    assert len(found) > 100, "the import reader found too few imports to be reading the package"
    return found


def test_no_import_cycle(edges):
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle:\n" + shown(cycle)


def test_no_import_runs_up_a_floor(edges):
    upward = [edge for edge in edges if floor_of(edge[1]) < floor_of(edge[0]) and edge[:2] not in ALLOWED_UP]
    assert not upward, "imports up a floor:\n" + "\n".join(
        f"  {a} ({FLOORS[floor_of(a)][0]}) imports {b} ({FLOORS[floor_of(b)][0]})   ({where})" for a, b, where in upward)


@pytest.mark.parametrize("layer", sorted(NEVER))
def test_a_layer_never_reaches_what_it_must_not_import(layer, edges):
    for module in sorted({edge[0] for edge in edges if _part(edge[0]) == layer}):
        chain = shortest_chain(edges, module, lambda m: _part(m) in NEVER[layer])
        assert chain is None, f"{layer}/ reaches {chain[-1][1]}:\n" + shown(chain)


@pytest.mark.parametrize("parts", INDEPENDENT, ids="-".join)
def test_parts_of_one_floor_stay_apart(parts, edges):
    crossing = [edge for edge in edges if _part(edge[0]) in parts and _part(edge[1]) in parts
                and _part(edge[0]) != _part(edge[1])]
    assert not crossing, "imports between parts that stay apart:\n" + shown(crossing)


def test_every_command_names_a_function_of_the_package():
    from ser_lightning.cli import COMMANDS

    modules = module_names(PACKAGE_DIR, ROOT)
    for name, (_, target) in COMMANDS.items():
        module, function = target.split(":")
        assert module in modules, f"command {name}: no module {module}"
        tree = ast.parse(modules[module].read_text(encoding="utf-8"))
        assert function in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, \
            f"command {name}: {module} defines no function {function}"


# ----------------------------------------------------------------------------- the reader, on a package written here
def write_package(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = folder / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder / "pkg"


def test_the_reader_finds_imports_in_functions_and_relative_ones_and_skips_type_checking(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "from typing import Any\n__all__ = ['Thing']\n",
        "low.py": "import os\n",
        "sub/__init__.py": "",
        "sub/a.py": "from ..low import x\n\ndef f():\n    from pkg.sub import b\n",
        "sub/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.a import f\nelse:\n    import pkg.low\n",
        "sub/c.py": "from pkg import _compiled, Thing\n",
    })
    found = {(a, b) for a, b, _ in import_edges(package, "pkg")}
    assert found == {("pkg.sub.a", "pkg.low"), ("pkg.sub.a", "pkg.sub.b"), ("pkg.sub.b", "pkg.low"), ("pkg.sub.c", "pkg")}


def test_a_cycle_through_a_function_import_is_found_with_its_chain(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "", "a.py": "import pkg.b\n", "b.py": "def late():\n    from pkg import c\n", "c.py": "from . import a\n",
    })
    cycle = find_cycle(import_edges(package, "pkg"))
    assert [(a, b) for a, b, _ in cycle] == [("pkg.a", "pkg.b"), ("pkg.b", "pkg.c"), ("pkg.c", "pkg.a")]
    assert "pkg.b imports pkg.c   (pkg/b.py:2)" in shown(cycle)
