"""End-to-end checks of `python -m cs336_nb.prepare` in a subprocess: outputs, restart, one-line errors."""

import json
import os
import subprocess
import sys
import time

import numpy as np
from conftest import ROOT, SHARED_DATA

STORY = SHARED_DATA / "tinystories_sample.txt"


def run(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "cs336_nb.prepare", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_prepare_writes_verifies_and_restarts(tmp_path):
    out = tmp_path / "tok"
    r = run("--train-text", STORY, "--out-dir", out, "--name", "ts", "--vocab-size", 300, "--val-fraction", 0.2)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "ts_meta.json",
        "ts_tokenizer",
        "ts_train.uint16.npy",
        "ts_val.uint16.npy",
    ]
    meta = json.loads((out / "ts_meta.json").read_text())
    train, val = np.load(out / "ts_train.uint16.npy"), np.load(out / "ts_val.uint16.npy")
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val)) and len(val) > 0
    assert meta["vocab_size"] == 300 and meta["dtype"] == "uint16" and train.max() < 300
    from cs336_nb.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(out / "ts_tokenizer")
    assert tok.decode(np.concatenate([train, val])) == STORY.read_text(encoding="utf-8")
    # the same command again: verified and skipped, files untouched
    stamp = (out / "ts_train.uint16.npy").stat().st_mtime_ns
    r = run("--train-text", STORY, "--out-dir", out, "--name", "ts", "--vocab-size", 300, "--val-fraction", 0.2)
    assert r.returncode == 0 and "nothing to do" in r.stderr, r.stderr
    assert (out / "ts_train.uint16.npy").stat().st_mtime_ns == stamp
    # a corrupted array is rebuilt identically
    (out / "ts_train.uint16.npy").write_bytes(b"garbage")
    r = run("--train-text", STORY, "--out-dir", out, "--name", "ts", "--vocab-size", 300, "--val-fraction", 0.2)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(out / "ts_train.uint16.npy"), train)
    assert not list(out.glob("*.partial"))


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
        r = run(*args, "--out-dir", tmp_path / "out")
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("prepare: error:") and message in r.stderr, r.stderr
    # another dataset under the same name and folder is refused, and left alone
    assert run("--train-text", STORY, "--out-dir", tmp_path / "out", "--vocab-size", 270).returncode == 0
    r = run("--train-text", STORY, "--out-dir", tmp_path / "out", "--vocab-size", 280)
    assert r.returncode == 2 and "different dataset" in r.stderr and "--name" in r.stderr, r.stderr
    assert json.loads((tmp_path / "out" / "tinystories_sample_meta.json").read_text())["vocab_size"] == 270


def test_stdlib_corpus_quick_start_size(tmp_path):
    t0 = time.perf_counter()
    r = run("--corpus", "stdlib", "--out-dir", tmp_path, "--vocab-size", 1024, "--max-bytes", "1MB", "--no-progress")
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "pystdlib_meta.json").read_text())
    assert meta["train_tokens"] > 100_000 and meta["val_tokens"] > 1000
    assert (tmp_path / "pystdlib_corpus_train.txt").stat().st_size + (
        tmp_path / "pystdlib_corpus_val.txt"
    ).stat().st_size <= 1_000_000
    assert seconds < 60, seconds  # the quick start prepares 2-4 MB: this 1 MB run must be quick
