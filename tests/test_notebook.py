"""The repo as a package a user's notebook imports: pyproject.toml's module list, and notebooks/quickstart.ipynb run
top to bottom the way a user runs it, from a folder outside the repo, importing the repo's modules through the
editable install (`-e .` in requirements-dev.txt) in a Jupyter kernel of this environment."""

import importlib.metadata
import tomllib
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import install as install_kernelspec
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def test_pyproject_lists_every_top_level_module_and_package():
    """The editable install maps exactly what is listed, so a module left out would not import outside the repo."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed, packages = setuptools["py-modules"], setuptools["packages"]
    files = {path.stem for path in REPO.glob("*.py")}
    assert len(listed) == len(set(listed)), f"py-modules lists a module twice: {sorted(listed)}"
    assert set(listed) == files, (f"pyproject.toml's py-modules: add {sorted(files - set(listed))}, "
                                  f"remove {sorted(set(listed) - files)}")
    found = {path.parent.name for path in REPO.glob("*/__init__.py")}
    assert set(packages) == found, f"pyproject.toml's packages: {sorted(packages)}, the repo's: {sorted(found)}"


def stdout_text(cell) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")


@pytest.mark.slow
def test_quickstart_notebook_runs_outside_the_repo(tmp_path, monkeypatch):
    """About 18 s on 2 shared CPU cores (13 s of it the ten training steps): kernel start, training, five
    generations, the loss curve."""
    try:
        importlib.metadata.distribution("alpaca-lora-course")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("the repo is not installed in this environment: pip install -r requirements-dev.txt (it has -e .)")
    # The kernel is this interpreter (ipykernel writes its path into the spec), found first through JUPYTER_PATH;
    # Jupyter's and IPython's runtime files go to tmp_path, not the home folder.
    jupyter = tmp_path / "jupyter"
    jupyter.mkdir()
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter / "share" / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(jupyter / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(jupyter / "ipython"))
    install_kernelspec(kernel_name="python3", prefix=str(jupyter))
    monkeypatch.delenv("PYTHONPATH", raising=False)  # the repo must come from the install, as for a user
    # One thread, as the suite's other runs: the toy model's ops take microseconds, and on a shared 2-core machine a
    # 2-thread pool waiting for a busy core makes the notebook many times slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    work = tmp_path / "work"
    work.mkdir()

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") or cell.get("execution_count") for cell in notebook.cells), (
        "commit the notebook with its outputs cleared")
    NotebookClient(notebook, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(work)}}).execute()

    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert f"repo: {REPO}" in stdout_text(code_cells[0]), "the kernel imported another copy: pip install -e ."
    adapter = work / "outputs" / "notebook"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    generating = [cell for cell in code_cells if "generate_inference(" in cell.source]
    assert len(generating) == 3
    for cell in generating:
        assert stdout_text(cell).strip(), f"no answer printed by:\n{cell.source}"
    assert any("image/png" in out.get("data", {}) for out in code_cells[-1].outputs), "the loss curve is not shown"
