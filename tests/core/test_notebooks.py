"""The example notebooks (``notebooks/*.ipynb``): each runs top to bottom in a fresh kernel, offline, on
the interpreter running the tests, and each is committed without outputs.

Each notebook gets its own kernel (no state shared between notebooks) whose working directory is a
temporary folder, so nothing is written into the repository.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from jupyter_client.kernelspec import KernelSpec  # noqa: E402 - after the importorskip guards
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ["01_tiling.ipynb", "02_tools_langchain.ipynb", "03_llamaindex_query_engine.ipynb"]
# Per cell; the notebooks take seconds on an idle machine (tiny checkpoint, short answers).
CELL_TIMEOUT_S = 300

# Test-support modules a notebook must not import: notebooks are self-contained examples.
TEST_MODULES = ("conftest", "fourth_task", "langchain_helpers", "llamaindex_support", "servers")


class ThisInterpreterKernelManager(AsyncKernelManager):
    """A kernel manager whose kernel is ipykernel on *this* interpreter (``sys.executable``).

    A ``python3`` kernelspec found on the machine (user or system Jupyter folders) may point at
    another Python without this project installed; this one never does.
    """

    @property
    def kernel_spec(self) -> KernelSpec:
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name=f"Python {sys.version_info.major}.{sys.version_info.minor} (tests)",
            language="python",
            resource_dir=str(NOTEBOOK_DIR),
        )


def kernel_env() -> dict[str, str]:
    """The kernel's environment: offline, and with progress bars as a notebook user sees them."""
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "LANGSMITH_TRACING": "false",
            "LANGCHAIN_TRACING_V2": "false",
            # Any HTTP(S) request a notebook makes goes to a closed local port and fails at once.
            "HTTP_PROXY": "http://127.0.0.1:9",
            "HTTPS_PROXY": "http://127.0.0.1:9",
            "ALL_PROXY": "http://127.0.0.1:9",
            "NO_PROXY": "",
        }
    )
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        env.pop(name, None)
    # conftest turns progress bars off for the test process; the notebooks show them (tqdm.auto path).
    env.pop("HD4K_NO_PROGRESS", None)
    # Two shared cores: one intra-op thread avoids OpenMP spin-waiting when the machine is busy.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def execute(nb: Any, cwd: Path) -> float:
    """Run ``nb`` in place (raises ``CellExecutionError`` on the first failing cell); seconds taken."""
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        kernel_manager_class=ThisInterpreterKernelManager,
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(cwd)}},
    )
    start = time.perf_counter()
    client.execute(env=kernel_env())
    return time.perf_counter() - start


def code_cells(nb: Any) -> Iterator[Any]:
    return (cell for cell in nb.cells if cell.cell_type == "code")


def outputs(nb: Any) -> Iterator[dict[str, Any]]:
    return (output for cell in code_cells(nb) for output in cell.get("outputs", []))


def read(name: str) -> Any:
    return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def load_strip_script() -> Any:
    spec = importlib.util.spec_from_file_location("strip_notebooks", ROOT / "scripts" / "strip_notebooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------
# Committed form
# ----------------------------------------------------------------------------------------------------
def test_the_notebooks_exist() -> None:
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name: str) -> None:
    nb = read(name)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    assert "widgets" not in nb.metadata
    for index, cell in enumerate(code_cells(nb)):
        where = f"{name}, code cell {index + 1} ({cell.source.splitlines()[0] if cell.source else ''!r})"
        assert cell.outputs == [], f"{where} has outputs; run scripts/strip_notebooks.py"
        assert cell.execution_count is None, f"{where} has an execution count; run scripts/strip_notebooks.py"
        assert "execution" not in cell.metadata, f"{where} has timing metadata; run scripts/strip_notebooks.py"
    # The stripping tool agrees: a committed notebook is a fixed point of it.
    assert load_strip_script().strip_notebook(read(name)) == nb


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_self_contained(name: str) -> None:
    source = "\n".join(cell.source for cell in code_cells(read(name)))
    for module in TEST_MODULES:
        assert f"import {module}" not in source and f"from {module} " not in source, module
    assert "%run" not in source and "!pip" not in source and "%pip" not in source


def test_strip_script_removes_outputs_and_counts() -> None:
    strip = load_strip_script()
    nb = read(NOTEBOOKS[0])
    cell = next(code_cells(nb))
    cell.execution_count = 3
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hi\n")]
    cell.metadata["execution"] = {"iopub.execute_input": "2024-01-01T00:00:00Z"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.7", "mimetype": "text/x-python"}
    stripped = strip.strip_notebook(nb)
    assert stripped == read(NOTEBOOKS[0])


# ----------------------------------------------------------------------------------------------------
# Execution
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kernel_runs_this_interpreter_offline(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                "import os, sys\nprint(sys.executable)\nprint(os.getcwd())\nprint(os.environ.get('HF_HUB_OFFLINE'))"
            )
        ]
    )
    execute(nb, tmp_path)
    (cell,) = nb.cells
    printed = "".join(o["text"] for o in cell.outputs if o["output_type"] == "stream").splitlines()
    assert printed == [sys.executable, str(tmp_path), "1"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name: str, tmp_path: Path) -> None:
    nb = read(name)
    before = sorted(p.name for p in NOTEBOOK_DIR.iterdir())
    seconds = execute(nb, tmp_path)
    print(f"{name}: {seconds:.1f} s")

    errors = [o for o in outputs(nb) if o["output_type"] == "error"]
    assert not errors, [f"{e['ename']}: {e['evalue']}" for e in errors]
    assert all(cell.execution_count is not None for cell in code_cells(nb))
    # Nothing was written next to the notebooks or into the kernel's working directory.
    assert sorted(p.name for p in NOTEBOOK_DIR.iterdir()) == before
    assert list(tmp_path.iterdir()) == []

    rich = [o.get("data", {}) for o in outputs(nb) if o["output_type"] in ("display_data", "execute_result")]
    if name == "01_tiling.ipynb":
        assert sum("image/png" in d for d in rich) >= 5  # inputs, two plan sheets, tiles, auto plan
        tables = [d["text/html"] for d in rich if "text/html" in d]
        assert len(tables) == 3 and all("<table>" in t for t in tables)
        assert "✗" not in "".join(tables)  # every row matches the token formula
    else:
        # Results rendered through TaskResult/DocumentResult._repr_html_ (thumbnail + plan + answer).
        html = [d["text/html"] for d in rich if "text/html" in d]
        assert len(html) >= 3
        assert all("hd4k-result" in h and "data:image/jpeg;base64," in h for h in html)
    if name == "02_tools_langchain.ipynb":
        # read_document(progress=True) drew its bar through tqdm.auto inside the kernel: the notebook
        # widget (ipywidgets is a dev/notebook dependency).
        widgets = [d for d in rich if "application/vnd.jupyter.widget-view+json" in d]
        assert any("PDF pages" in d.get("text/plain", "") for d in widgets), widgets
