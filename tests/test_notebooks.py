"""Run every notebook in `nbs/` through nbdev's own test runner (`nbdev.test.test_nb`), one pytest
test per notebook, so a failure names its chapter and the summary line counts them.

`nbdev_test` alone prints only `Success.` and exits 0 when a path typo selects no notebook; this
wrapper fails loudly instead. Cells flagged `#| slow` run too, unless CS336_SKIP_SLOW=1.
"""

import os

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
