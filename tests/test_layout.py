"""The repo's layout, read from the source with `ast` (nothing is imported): the assignment's files on top, the
machinery in the package support/ below them, and no import circle among the repo's own modules."""

import ast
import re
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


# --- the README's map of the assignment -------------------------------------------------------------------------------

README_SECTION = "## The assignment, question by question"
ASSIGNMENT_ROWS = ("Q1 merge", "Q2 forward", "Q3 ", "Q4 mixed precision", "Q5 DDP")


def readme_rows() -> list[tuple[str, str]]:
    """(question, where) for each row of the README's assignment table."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return [(question.strip(), where.strip()) for question, where in rows[1:]]  # past the header


def pointers(where: str) -> list[tuple[str, str, list[str]]]:
    """The cell's (file, `Name` or `Class.attr`, [excerpts in brackets after it]), in order. A `*.py` file starts
    a group; a backticked name outside brackets is a pointer into it, one inside brackets an excerpt of it."""
    found, file, depth = [], None, 0
    for part in re.split(r"(`[^`]+`|[()])", where):
        if part in ("(", ")"):
            depth += 1 if part == "(" else -1
        elif part.startswith("`"):
            token = part.strip("`")
            if token.endswith(".py"):
                file = token
            elif depth == 0:
                assert file, f"{token!r} before any file in {where!r}"
                found.append((file, token, []))
            elif found:
                found[-1][2].append(token)
    return found


def definition(tree: ast.Module, dotted: str) -> ast.AST | None:
    """The function or class `Name`, or `Class.method`, or the assignment to `self.attr` in `Class`."""
    name, _, attr = dotted.partition(".")
    top = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name]
    if not top or not attr:
        return top[0] if top else None
    for node in ast.walk(top[0]):
        if isinstance(node, ast.FunctionDef) and node.name == attr:
            return node
        if isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.ctx, ast.Store):
            return node
    return None


def check_pointers(where: str) -> list[str]:
    """What in `where` does not exist: a missing file, a name not defined there, an excerpt not in its function."""
    problems = []
    files = set(re.findall(r"`([\w/]+\.py)`", where))
    problems += [f"{file}: no such file" for file in sorted(files) if not (REPO / file).is_file()]
    for file, name, excerpts in pointers(where):
        if not (REPO / file).is_file():
            continue
        source = (REPO / file).read_text(encoding="utf-8")
        node = definition(ast.parse(source), name)
        if node is None:
            problems.append(f"{file}: no {name}")
            continue
        code = ast.get_source_segment(source, node)
        problems += [f"{file}: {name} has no {e!r}" for e in excerpts if e not in code]
    return problems


def test_the_readme_table_follows_the_assignments_numbering():
    questions = [question for question, _ in readme_rows()]
    assert [q for q in questions if q.startswith("Q")] == [
        next(q for q in questions if q.startswith(prefix)) for prefix in ASSIGNMENT_ROWS]
    assert any("Challenge" in q for q in questions) and any(q.startswith("Inference") for q in questions)


def test_every_pointer_in_the_readme_table_lands_on_code_that_exists():
    rows = readme_rows()
    assert sum(len(pointers(where)) for _, where in rows) >= 20  # the table was read
    problems = [f"{question}: {p}" for question, where in rows for p in check_pointers(where)]
    assert not problems, "README's assignment table points at nothing:\n" + "\n".join(problems)


def test_the_pointer_check_catches_a_wrong_name_and_a_misplaced_excerpt():
    """Positive control: names and excerpts that are not where the cell says are reported."""
    assert check_pointers("`train.py`: `Trainer.batch_loss` (`with self.ctx`)") == []
    assert check_pointers("`train.py`: `Trainer.optimizer_step` (`with self.ctx`)") == [
        "train.py: Trainer.optimizer_step has no 'with self.ctx'"]
    assert check_pointers("`lora_layer.py`: `Linear.merge_all`; `nowhere.py`: `x`") == [
        "nowhere.py: no such file", "lora_layer.py: no Linear.merge_all"]
