"""The package's import graph, read from the source: no cycle, and the engine free of Dagster and the CLI.

Every import counts, also those inside functions (a lazy import still ties two modules together).
``from imgpipe_dagster.x import y`` is an edge to ``imgpipe_dagster.x.y`` when that is a module, else
to ``imgpipe_dagster.x``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "imgpipe_dagster"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / PACKAGE
ENGINE_FOLDERS = ("fetch", "resilience", "store", "engine", "gpu_server", "corpus", "throttle")
FORBIDDEN_IN_ENGINE = ("dagster", f"{PACKAGE}.cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def imported_names(path: Path, name: str) -> set[str]:
    """Every module name an import statement of the file refers to (relative imports resolved)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (names that are attributes, not modules, fall away)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {target for target in imported_names(path, name) if target in modules and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, …, a], or None (depth-first search with colours)."""
    visiting, done = set(), set()
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        visiting.add(node)
        stack.append(node)
        for target in sorted(graph[node]):
            if target in visiting:
                return [*stack[stack.index(target) :], target]
            if target not in done and (cycle := visit(target)):
                return cycle
        visiting.discard(node)
        done.add(node)
        stack.pop()
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)):
            return cycle
    return None


def test_the_walk_sees_the_package():
    modules = package_modules()
    graph = import_graph(modules)
    # known edges: if the walk stopped resolving imports, the checks below would pass on nothing
    assert f"{PACKAGE}.store.database" in graph[f"{PACKAGE}.cli.db"]
    assert f"{PACKAGE}.cli.status" in graph[f"{PACKAGE}.cli"]
    assert f"{PACKAGE}.engine.stats" in graph[f"{PACKAGE}.engine.runner"]
    assert "dagster" in imported_names(modules[f"{PACKAGE}.partitions"], f"{PACKAGE}.partitions")


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph(package_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("folder", ENGINE_FOLDERS)
def test_engine_never_reaches_dagster_or_the_cli(folder):
    """Not directly and not through another module of the package (say, an asset or a resource)."""
    modules = package_modules()
    graph = import_graph(modules)
    own = [name for name in modules if name.startswith(f"{PACKAGE}.{folder}.") or name == f"{PACKAGE}.{folder}"]
    assert own, f"no modules under {folder}/"
    offenders = []
    for start in own:
        reached, todo = {start}, [start]
        while todo:
            for target in graph[todo.pop()] - reached:
                reached.add(target)
                todo.append(target)
        for name in sorted(reached):
            bad = [
                imported
                for imported in imported_names(modules[name], name)
                if any(imported == f or imported.startswith(f + ".") for f in FORBIDDEN_IN_ENGINE)
            ]
            if bad:
                offenders.append(f"{start} reaches {name}, which imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def test_nothing_below_the_cli_imports_it():
    modules = package_modules()
    cli = f"{PACKAGE}.cli"
    importers = [
        name
        for name, path in modules.items()
        if not (name == cli or name.startswith(cli + "."))
        and any(imported == cli or imported.startswith(cli + ".") for imported in imported_names(path, name))
    ]
    assert importers == [], f"modules that import the CLI: {importers}"
