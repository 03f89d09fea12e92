"""Each chapter also runs top to bottom in a real Jupyter kernel, as a reader in JupyterLab runs it:
every cell, in order, through `nbclient` and `ipykernel` (not nbdev's in-process shell).

IN_TEST=1 is set so demo cells keep their work small, exactly as under `nbdev_test`.
"""

import os

import nbformat
import pytest
from conftest import NBS, ROOT
from nbclient import NotebookClient

NOTEBOOKS = sorted(p for p in NBS.glob("*.ipynb") if not p.name.startswith("_"))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_in_a_kernel(nb, monkeypatch):
    monkeypatch.setenv("IN_TEST", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    book = nbformat.read(nb, as_version=4)
    client = NotebookClient(book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NBS)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
