"""The requirement files against the code's own import statements (every one, also those inside functions):
requirements.txt pins what the scripts a user runs import (train.py, inference.py, the support/ package, the
tiny-model build script); requirements-playground.txt adds Gradio for the playground (playground.py), which training
does not need; requirements-dev.txt adds what only the tests and benchmarks import, PEFT among them.
"""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCAL_MODULES = {path.stem for folder in ("", "bench", "tests", "models") for path in (REPO / folder).glob("*.py")}
LOCAL_MODULES |= {"bench", "tests", "support"}


def pins(path: Path) -> dict[str, str]:
    """{distribution name (normalised): version} of a requirements file, following `-r other.txt`."""
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            found.update(pins(path.parent / line[3:].strip()))
        elif line.startswith("-e "):
            continue  # the repo itself, installed editable (pyproject.toml)
        elif line:
            name, version = line.split("==")
            found[normalise(name)] = version.strip()
    return found


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_distributions(files) -> dict[str, set[str]]:
    """{distribution: the files importing it} for the third-party modules `files` import."""
    module_to_distributions = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in (m.split(".")[0] for m in modules):
                if module in sys.stdlib_module_names or module in LOCAL_MODULES:
                    continue
                assert module in module_to_distributions, f"{path.name} imports {module}, which is not installed"
                for distribution in module_to_distributions[module]:
                    found.setdefault(normalise(distribution), set()).add(path.relative_to(REPO).as_posix())
    return found


PLAYGROUND = REPO / "playground.py"


def test_requirements_txt_pins_what_the_scripts_import_and_no_test_tool():
    product = [path for path in sorted(REPO.glob("*.py")) if path != PLAYGROUND]
    product += sorted((REPO / "support").glob("*.py"))
    runtime = pins(REPO / "requirements.txt")
    imported = imported_distributions(product + [REPO / "models" / "build_tiny_bloom.py"])
    assert {"torch", "transformers", "datasets", "safetensors"} <= imported.keys()  # the scan sees imports
    missing = {name: files for name, files in imported.items() if name not in runtime}
    assert not missing, f"imported but not in requirements.txt: {missing}"
    assert not {"peft", "pytest", "hypothesis", "psutil", "gradio", "playwright"} & runtime.keys()


def test_requirements_playground_txt_adds_gradio_to_the_runtime_pins():
    runtime, playground = pins(REPO / "requirements.txt"), pins(REPO / "requirements-playground.txt")
    assert runtime.items() <= playground.items()
    assert set(playground) - set(runtime) == {"gradio"}
    imported = imported_distributions([PLAYGROUND])
    assert "gradio" in imported
    missing = {name: files for name, files in imported.items() if name not in playground}
    assert not missing, f"imported but not in requirements-playground.txt: {missing}"


def test_requirements_dev_txt_adds_what_tests_and_benchmarks_import():
    dev = pins(REPO / "requirements-dev.txt")
    assert pins(REPO / "requirements-playground.txt").items() <= dev.items()
    imported = imported_distributions(sorted((REPO / "tests").glob("*.py")) + sorted((REPO / "bench").glob("*.py")))
    assert {"peft", "pytest", "hypothesis", "psutil"} <= imported.keys()
    missing = {name: files for name, files in imported.items() if name not in dev}
    assert not missing, f"imported but not in requirements-dev.txt: {missing}"
