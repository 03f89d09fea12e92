"""Store the small, deterministic outputs of the chapters in the notebooks, so a reader who opens a
chapter on GitHub sees its figures and tables without running anything.

    python tools/render_outputs.py                 # every chapter
    python tools/render_outputs.py nbs/02_model.ipynb

Each notebook runs top to bottom in a Jupyter kernel (from `nbs/`, as a reader runs it). Kept: figures
(PNG) and tables a cell displays as Markdown or HTML. Dropped: printed text, plain reprs, errors and
progress bars, since those carry timings, paths and random samples that would change on every run
and turn each commit into noise. Run `nbdev_clean` afterwards (CI checks it changes nothing).
"""

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
KEEP = ("image/png", "text/markdown")


def _keep(output) -> bool:
    """A figure, or a table displayed as Markdown/HTML (not a progress bar)."""
    if output.get("output_type") not in ("display_data", "execute_result"):
        return False
    data = output.get("data", {})
    if any(kind in data for kind in KEEP):
        return True
    html = data.get("text/html", "")
    if html.startswith('<div class="cs336-view">'):  # the notebook view's final state (bar, table, notes)
        return True
    return "<table" in html and "progress" not in html


def _clean(output):
    """The output with only the rich formats a reader's viewer draws (the text/plain fallback stays)."""
    data = {k: v for k, v in output["data"].items() if k in (*KEEP, "text/html", "text/plain")}
    out = nbformat.v4.new_output("display_data", data=data)
    return out


def render(path: Path) -> int:
    """Run `path` in a kernel and store the outputs worth keeping; returns how many were kept."""
    book = nbformat.read(path, as_version=4)
    env = dict(os.environ, MPLBACKEND="module://matplotlib_inline.backend_inline")
    os.environ.update(env)
    client = NotebookClient(
        book, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    kept = 0
    for cell in book.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs = [_clean(o) for o in cell.outputs if _keep(o)]
        cell.execution_count = None
        kept += len(cell.outputs)
    nbformat.write(book, path)
    return kept


def main(argv: list[str]) -> None:
    paths = [Path(p) for p in argv] or sorted(p for p in NBS.glob("[0-9]*.ipynb"))
    for path in paths:
        start = time.perf_counter()
        kept = render(path.resolve())
        print(f"{path.name}: {kept} outputs kept ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
