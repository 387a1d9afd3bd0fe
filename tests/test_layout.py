"""The repo's layout, read from the source with `ast` (nothing is imported): the assignment's files on top, the
machinery in the package support/ below them, and no import circle among the repo's own modules."""

import ast
from pathlib import Path

from conftest import REPO

ASSIGNMENT_FILES = {"lora_layer", "lora_model", "train", "inference", "prompter"}
MAX_TOP_LEVEL_FILES = 7


def repo_modules() -> dict[str, Path]:
    """Module name -> file, for the top-level *.py files and the package support/."""
    modules = {path.stem: path for path in REPO.glob("*.py")}
    modules.update({f"support.{path.stem}": path for path in (REPO / "support").glob("*.py")})
    modules["support"] = modules.pop("support.__init__")
    return modules


def imported_names(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (inside functions too), as dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
            # `from support import faults` imports the module support.faults
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}: relative import (level {node.level}); use `from support.x import ...`")
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the repo modules it imports (a package import `support` counts only when it is named alone)."""
    return {name: {m for m in imported_names(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_no_import_circle_among_the_repos_modules():
    graph = import_graph(repo_modules())
    assert graph["inference"] >= {"support.generation"} and "playground" in graph["inference"]  # the graph is read
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_find_cycle_finds_a_circle_through_an_import_inside_a_function(tmp_path):
    """Positive control: the check above would see the old inference <-> playground circle, whose one side was an
    import inside a function."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    graph = {"a": imported_names(tmp_path / "a.py") & {"a", "b"}, "b": imported_names(tmp_path / "b.py") & {"a", "b"}}
    assert find_cycle(graph) in (["a", "b", "a"], ["b", "a", "b"])
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_never_imports_a_top_level_file():
    modules = repo_modules()
    top_level = {name for name in modules if not name.startswith("support")}
    upward = {name: sorted(imports & top_level) for name, imports in import_graph(modules).items()
              if name.startswith("support") and imports & top_level}
    assert not upward, f"support/ imports top-level files: {upward}"


def test_the_top_level_holds_the_assignments_files_and_at_most_seven():
    files = {path.stem for path in REPO.glob("*.py")}
    assert ASSIGNMENT_FILES <= files, f"missing: {sorted(ASSIGNMENT_FILES - files)}"
    assert len(files) <= MAX_TOP_LEVEL_FILES, f"{len(files)} top-level .py files: {sorted(files)}"
