"""README.md is nbs/index.ipynb rendered to Markdown (Quarto, which `nbdev_readme` needs, is not
installable here). `python tests/test_readme.py` rewrites README.md; the test checks they agree and
that README shows the exact install and test commands that `.ci/run` uses.
"""

import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
INSTALL = 'pip install -e ".[dev]"'
TEST = "python -m pytest"


def render_readme() -> str:
    """Markdown cells as they are, code cells as fenced Python blocks, outputs dropped."""
    book = nbformat.read(ROOT / "nbs" / "index.ipynb", as_version=4)
    parts = []
    for cell in book.cells:
        src = cell.source.strip()
        if not src or src.startswith("#| hide"):
            continue
        parts.append(src if cell.cell_type == "markdown" else f"```python\n{src}\n```")
    return (
        "<!-- generated from nbs/index.ipynb by `python tests/test_readme.py`: edit the notebook -->\n\n"
        + "\n\n".join(parts)
        + "\n"
    )


def test_readme_matches_index():
    assert (ROOT / "README.md").read_text(encoding="utf-8") == render_readme(), "run: python tests/test_readme.py"


def test_readme_shows_the_commands_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for command in (INSTALL, TEST, "pip install torch==2.13.0"):
        assert command in readme, command
        assert command in ci, command


if __name__ == "__main__":
    (ROOT / "README.md").write_text(render_readme(), encoding="utf-8")
    sys.exit(0)
