"""Every notebook in `nbs/` runs through nbdev's own test runner, two ways.

- `test_notebook`: one pytest test per notebook through `nbdev.test.test_nb`, with the cells flagged
  `#| slow` included (what `nbdev_test --flags slow` runs), so a failure names its chapter and the
  summary line counts them. CS336_SKIP_SLOW=1 leaves the slow cells out.
- `test_nbdev_test_as_is`: the `nbdev_test` command itself, as a user types it at the repository root,
  slow cells skipped. It catches a plain cell that uses a name only a slow cell defines.

`nbdev_test` alone prints only `Success.` and exits 0 when a path typo selects no notebook; both
tests here fail loudly instead.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NBS, ROOT
from nbdev.config import get_config
from nbdev.test import test_nb as run_notebook

NOTEBOOKS = sorted(p for p in NBS.glob("*.ipynb") if not p.name.startswith("_"))


def test_found_the_notebooks():
    # a typo in the path must not turn into "nothing to test"
    assert len(NOTEBOOKS) >= 4, NOTEBOOKS
    assert (NBS / "index.ipynb") in NOTEBOOKS


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook(nb, monkeypatch):
    monkeypatch.chdir(NBS)
    flags = get_config().tst_flags.split()
    force = [] if os.environ.get("CS336_SKIP_SLOW") == "1" else flags
    ok, _ = run_notebook(nb.absolute(), skip_flags=flags, force_flags=force, basepath=ROOT)
    assert ok, f"{nb.name} failed (the cell's traceback is printed above)"


def test_nbdev_test_as_is():
    nbdev_test = Path(sys.executable).with_name("nbdev_test")
    command = [str(nbdev_test) if nbdev_test.exists() else "nbdev_test", "--n_workers", "1", "--do_print", "--timing"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    ran = [nb.name for nb in NOTEBOOKS if re.search(rf"Completed \S*/{re.escape(nb.name)}\s", out)]
    assert ran == [nb.name for nb in NOTEBOOKS], f"nbdev_test did not run every notebook:\n{out[-4000:]}"
    assert "Success" in out, out[-4000:]
