"""End-to-end checks of `python -m cs336_nb.prepare`: outputs, restart, one-line errors, and equal outputs
for any number of BPE worker processes on texts whose chunk cuts are hard (no special token; a long last
document)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, ROOT

from cs336_nb.prepare import main, prepare
from cs336_nb.tokenizer import Tokenizer

STORY = DATA / "tinystories_sample.txt"
EOT = "<|endoftext|>"


def run(*args, cwd=ROOT, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "cs336_nb.prepare", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_prepare_writes_verifies_and_restarts(tmp_path):
    out = tmp_path / "tok"
    args = ["--train-text", STORY, "--out-dir", out, "--name", "ts", "--vocab-size", 300, "--val-fraction", 0.2]
    r = run(*args, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr  # progress and notes go to stdout; stderr is for errors
    assert sorted(p.name for p in out.iterdir()) == [
        ".ts.lock",
        "ts_meta.json",
        "ts_tokenizer",
        "ts_train.uint16.npy",
        "ts_val.uint16.npy",
    ]
    meta = json.loads((out / "ts_meta.json").read_text())
    train, val = np.load(out / "ts_train.uint16.npy"), np.load(out / "ts_val.uint16.npy")
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val)) and len(val) > 0
    assert meta["vocab_size"] == 300 and meta["dtype"] == "uint16" and train.max() < 300
    assert meta["tokenizer_dir"] == str((out / "ts_tokenizer").resolve()) and "tokenizer_dir_name" not in meta
    tok = Tokenizer.from_dir(meta["tokenizer_dir"])
    assert tok.decode(np.concatenate([train, val])) == STORY.read_text(encoding="utf-8")
    # the same command again, from another folder: verified and skipped, files untouched
    stamp = (out / "ts_train.uint16.npy").stat().st_mtime_ns
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout + r.stderr
    assert (out / "ts_train.uint16.npy").stat().st_mtime_ns == stamp
    # a corrupted array is rebuilt identically
    (out / "ts_train.uint16.npy").write_bytes(b"garbage")
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(out / "ts_train.uint16.npy"), train)
    assert not list(out.glob("*.partial")) and not list(out.glob("*.tmp"))


def cli(*args) -> tuple[int, str]:
    """Run the prepare CLI in this process (same code as `python -m`, without the start-up): exit code, stderr."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def test_prepare_errors_are_one_line_exit_2(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["--train-text", tmp_path / "missing.txt"], "training text not found"),
        (["--train-text", empty], "is empty"),
        (["--train-text", STORY, "--val-text", tmp_path / "missing.txt"], "validation text not found"),
        (["--train-text", STORY, "--vocab-size", 256], "too small"),
        (["--train-text", STORY, "--tokenizer-dir", tmp_path], "vocab.json is missing"),
    ]
    for args, message in cases:
        code, err = cli(*args, "--out-dir", tmp_path / "out")
        assert code == 2, (args, err)
        assert err.count("\n") == 1 and err.startswith("prepare: error:") and message in err, err
    # another dataset under the same name and folder is refused, and left alone
    assert cli("--train-text", STORY, "--out-dir", tmp_path / "out", "--vocab-size", 270, "--no-progress")[0] == 0
    code, err = cli("--train-text", STORY, "--out-dir", tmp_path / "out", "--vocab-size", 280)
    assert code == 2 and "different dataset" in err and "--name" in err, err
    assert json.loads((tmp_path / "out" / "tinystories_sample_meta.json").read_text())["vocab_size"] == 270


def test_stdlib_corpus_quick_start_size(tmp_path):
    r = run("--corpus", "stdlib", "--out-dir", tmp_path, "--vocab-size", 1024, "--max-bytes", "1MB", "--no-progress")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "pystdlib_meta.json").read_text())
    assert meta["train_tokens"] > 100_000 and meta["val_tokens"] > 1000
    sizes = [(tmp_path / f"pystdlib_corpus_{s}.txt").stat().st_size for s in ("train", "val")]
    assert sum(sizes) <= 1_000_000


# Texts of ~5 MB (more than the 4 MiB below which BPE counts in one process), built from the shipped data.
# With 3 workers the pre-token count cuts the file near 1/3 and 2/3: in `no_special` there is no special
# token to cut at, in `long_last` both points fall inside the last, 4.7 MB document. Both hung before the
# cut search learned to stop at word ends.
def _texts(folder: Path) -> dict[str, Path]:
    en = (DATA / "corpus.en").read_text(encoding="utf-8")
    stories = STORY.read_text(encoding="utf-8")
    texts = {"no_special": en * 38, "long_last": stories * 60 + en * 36}
    paths = {}
    for name, text in texts.items():
        paths[name] = folder / f"{name}.txt"
        paths[name].write_text(text, encoding="utf-8")
    return paths


@pytest.fixture(scope="module")
def five_mb(tmp_path_factory):
    folder = tmp_path_factory.mktemp("five_mb")
    return folder, _texts(folder)


@pytest.fixture
def alarm():
    """Fail, instead of hanging forever, if a call in this process does not return within 120 s."""

    def ring(*_):
        raise TimeoutError("prepare did not finish within 120 s (a hang?)")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("text", ["no_special", "long_last"])
def test_outputs_equal_for_any_number_of_workers(five_mb, text, capsys, alarm):
    folder, paths = five_mb
    size = paths[text].stat().st_size
    assert size > 4 << 20
    outs = {}
    for workers in (1, 3):
        out = folder / f"{text}_{workers}"
        meta = prepare(paths[text], out_dir=out, name="d", vocab_size=300, progress=False, num_processes=workers)
        outs[workers] = out
    said = capsys.readouterr().out
    for f in ("d_tokenizer/vocab.json", "d_tokenizer/merges.txt", "d_train.uint16.npy", "d_val.uint16.npy"):
        assert (outs[1] / f).read_bytes() == (outs[3] / f).read_bytes(), f
    # the held-out share is what was asked (1%, within half of itself), and a cut inside a document is announced
    cut = meta["settings"]["split"]["val"][0]
    assert 0.005 <= (size - cut) / size <= 0.015, cut / size
    assert said.count("note: no document boundary") == 2, said
    # the tokens decode back to the text
    tok = Tokenizer.from_dir(meta["tokenizer_dir"])
    val = np.load(meta["val_path"])
    assert tok.decode(val) == paths[text].read_bytes()[cut:].decode("utf-8")


def test_starts_without_torch(tmp_path):
    # the import-time trace of `--help` names no torch module, and a whole run in a fresh interpreter loads none
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "cs336_nb.prepare", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "--vocab-size" in r.stdout, r.stderr[-2000:]
    imported = [line.rpartition("|")[2].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert {"cs336_nb.runtime", "cs336_nb.tokenizer", "numpy"} <= set(imported)  # the trace lists what was imported
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")], "prepare --help imported torch"
    probe = (
        "import sys\n"
        "import cs336_nb.prepare\n"
        "assert 'torch' not in sys.modules, 'importing cs336_nb.prepare imported torch'\n"
        "cs336_nb.prepare.main(sys.argv[1:])\n"
        "assert 'torch' not in sys.modules, 'running prepare imported torch'\n"
    )
    args = ["--train-text", STORY, "--out-dir", tmp_path, "--vocab-size", 270, "--val-fraction", 0.2, "--threads", 1]
    r = subprocess.run(
        [sys.executable, "-c", probe, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "tinystories_sample_train.uint16.npy").is_file()


def test_progress_in_a_jupyter_kernel(tmp_path):
    # a notebook cell running prepare shows its progress bars, whether or not ipywidgets is installed
    import importlib.util

    import nbformat
    from nbclient import NotebookClient

    cell = (
        "from cs336_nb.prepare import prepare\n"
        f"meta = prepare({str(STORY)!r}, out_dir={str(tmp_path / 'out')!r}, vocab_size=270, val_fraction=0.2, "
        "num_processes=1)\n"
        "print(meta['train_tokens'], meta['val_tokens'])"
    )
    book = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)])
    NotebookClient(book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = book.cells[0].outputs
    text = {name: "".join(o.get("text", "") for o in outputs if o.get("name") == name) for name in ("stdout", "stderr")}
    everything = json.dumps(outputs)
    assert "IProgress" not in everything and not [o for o in outputs if o.output_type == "error"], everything[-3000:]
    meta = json.loads((tmp_path / "out" / "tinystories_sample_meta.json").read_text())
    assert text["stdout"].splitlines()[-1] == f"{meta['train_tokens']} {meta['val_tokens']}"  # the cell ran to the end
    if importlib.util.find_spec("ipywidgets") is None:  # the text bar, in the cell's stderr, for each split
        assert "encode train: 100%" in text["stderr"] and "encode val: 100%" in text["stderr"], text["stderr"][-2000:]
    else:  # the widget bar
        assert "application/vnd.jupyter.widget-view+json" in everything, everything[-3000:]
