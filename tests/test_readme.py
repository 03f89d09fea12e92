"""README.md is nbs/index.ipynb rendered to Markdown (Quarto, which `nbdev_readme` needs, is not
installable here). `python tests/test_readme.py` rewrites README.md; the tests check they agree, that
README shows the exact install and test commands that `.ci/run` runs (pip's and uv's), and that every
flag README gives a `python -m cs336_nb.<command>` exists in that command's `--help`.
"""

import contextlib
import importlib
import io
import re
import shlex
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL = 'pip install -e ".[dev]"'
TEST = "python -m pytest"
UV_QUICKSTART = "uv run python -m cs336_nb.quickstart"
UV_TEST = "uv run pytest"


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
    for command in (INSTALL, TEST, "pip install torch==2.13.0", UV_QUICKSTART, UV_TEST):
        assert command in readme, command
        assert command in ci, command


def _readme_commands() -> list[tuple[str, list[str]]]:
    """(module, flags) of each `python -m cs336_nb.<module> ...` line in README's shell blocks."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        for line in block.splitlines():
            match = re.search(r"-m cs336_nb\.(\w+)(.*)", line)
            if match:
                words = shlex.split(match.group(2), comments=True)
                found.append((match.group(1), [w.split("=")[0] for w in words if w.startswith("--")]))
    return found


def _help(module: str) -> str:
    """`python -m cs336_nb.<module> --help`, called in this process (each command's `main` takes argv)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        importlib.import_module(f"cs336_nb.{module}").main(["--help"])
    assert done.value.code == 0, module
    return out.getvalue()


def test_readme_flags_exist():
    commands = _readme_commands()
    assert len(commands) >= 20 and {m for m, _ in commands} >= {"train", "prepare", "generate", "evaluate", "export"}
    helps = {module: _help(module) for module in sorted({m for m, _ in commands})}
    if "quickstart" in helps:  # the quick start hands the flags it does not know to train
        helps["quickstart"] += helps.get("train") or _help("train")
    missing = [
        (module, flag)
        for module, flags in commands
        for flag in flags
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[module])
    ]
    assert not missing, f"README gives flags these commands do not have: {missing}"


def test_readme_flags_check_can_fail():
    assert not re.search(r"(?<![\w-])--max-lr(?![\w-])", "--max-lr-x  --min-lr")
    assert ("train", ["--config", "--resume"]) in _readme_commands()


if __name__ == "__main__":
    (ROOT / "README.md").write_text(render_readme(), encoding="utf-8")
    sys.exit(0)
