"""Executes every notebook of notebooks/ top to bottom (nbclient), with its tiny settings.

Each notebook reads ``LCLM_NOTEBOOK_SMALL=1`` and then trains a few steps on tiny shapes, so a
notebook that an API change breaks fails here rather than in a user's Colab. The notebooks
assert their own results (kernels against references, logits after a checkpoint round trip,
greedy generation against the forward pass); this test asserts that no cell raised, that
every code cell ran and that a plot was drawn. Skipped when nbclient, nbformat or ipykernel
is not installed (the ``test`` extra installs them).
"""

from __future__ import annotations

import os

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs nbformat (pip install -e '.[test]')")
nbclient = pytest.importorskip("nbclient", reason="needs nbclient (pip install -e '.[test]')")
pytest.importorskip("ipykernel", reason="needs ipykernel to run a python3 kernel "
                    "(pip install -e '.[test]')")

NOTEBOOKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "notebooks")
NOTEBOOKS = ["01_quickstart", "02_kernels", "03_position_extrapolation", "04_architectures",
             "05_pretrained"]
CELL_TIMEOUT_S = 300  # Per cell; the whole notebook takes ~30 s with the tiny settings.


def test_the_notebooks_folder_holds_exactly_these_notebooks():
  found = sorted(name[:-len(".ipynb")] for name in os.listdir(NOTEBOOKS_DIR)
                 if name.endswith(".ipynb"))
  assert found == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
  nb = nbformat.read(os.path.join(NOTEBOOKS_DIR, f"{name}.ipynb"), as_version=4)
  nbformat.validate(nb)
  code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert all(not cell.outputs and cell.execution_count is None for cell in code_cells)
  # The first code cell installs lclm (Colab or checkout), the second holds the settings.
  assert "REPO_URL" in code_cells[0].source and "pip" in code_cells[0].source
  assert 'os.environ.get("LCLM_NOTEBOOK_SMALL") == "1"' in code_cells[1].source
  assert "USE_ACCELERATOR_SETTINGS" in code_cells[1].source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, monkeypatch, tmp_path):
  monkeypatch.setenv("LCLM_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("LCLM_NOTEBOOK_NO_INSTALL", "1")  # Check the import only; install nothing.
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # The notebooks' run directories go here.
  # The kernel is a second process beside this one: on a GPU, neither may take most of its
  # memory up front.
  monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  # Compilation is most of a tiny run's time: XLA's CPU backend without its expensive LLVM
  # passes compiles about twice as fast (same semantics; the tiny programs run no slower).
  monkeypatch.setenv("XLA_FLAGS", " ".join([
      os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
      "--xla_llvm_disable_expensive_passes=true"]).strip())
  nb = nbformat.read(os.path.join(NOTEBOOKS_DIR, f"{name}.ipynb"), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": NOTEBOOKS_DIR}})
  client.execute()  # Raises CellExecutionError (with the cell and its traceback) on failure.
  code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert all(cell.execution_count is not None for cell in code_cells)
  errors = [out for cell in code_cells for out in cell.outputs if out.output_type == "error"]
  assert not errors, errors
  # Every notebook shows its results as at least one plot (inline PNG).
  assert any(out.output_type == "display_data" and "image/png" in out.get("data", {})
             for cell in code_cells for out in cell.outputs), f"{name} drew no plot"
