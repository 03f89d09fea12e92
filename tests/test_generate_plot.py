"""End-to-end checks of the faces that use a finished run: `python -m cs336_nb.generate` and
`python -m cs336_nb.plot`, in subprocesses, on a run that the real training CLI makes here.

One module-scoped run is shared by every test: a byte-level BPE tokenizer (vocab 300) trained by
`train_bpe` on the shared TinyStories sample and saved with `Tokenizer.save`, the sample encoded to
`tiny_train.uint16.npy` / `tiny_val.uint16.npy` with a `tiny_meta.json` beside them (as data
preparation writes it), and 10 training steps of a tiny model. Generation must find that tokenizer
through the meta file alone (the run is trained without --tokenizer-dir).
"""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from conftest import ROOT, SHARED_DATA

from cs336_nb.generate import find_tokenizer, load_model, sample_text
from cs336_nb.generate import main as generate_main
from cs336_nb.plot import FIGSIZE
from cs336_nb.plot import main as plot_main
from cs336_nb.tokenizer import Tokenizer, train_bpe

PROMPT = "Once upon a time"


def cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m cs336_nb.<module> args` from the repository root, this checkout first on the path."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONIOENCODING": "utf-8",
    }
    return subprocess.run(
        [sys.executable, "-m", f"cs336_nb.{module}", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, text: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert text in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG signature and IHDR chunk, read by hand."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 10-step training run of a tiny model on BPE-encoded TinyStories; returns its run directory."""
    tmp = tmp_path_factory.mktemp("generate_plot")
    data = tmp / "data"
    data.mkdir()
    vocab, merges = train_bpe(SHARED_DATA / "tinystories_sample.txt", 300, ["<|endoftext|>"])
    Tokenizer(vocab, merges, ["<|endoftext|>"]).save(data / "tiny_tokenizer")
    tokenizer = Tokenizer.from_dir(data / "tiny_tokenizer")
    ids = np.array(
        tokenizer.encode((SHARED_DATA / "tinystories_sample.txt").read_text(encoding="utf-8")), dtype=np.uint16
    )
    cut = int(0.8 * len(ids))
    np.save(data / "tiny_train.uint16.npy", ids[:cut])
    np.save(data / "tiny_val.uint16.npy", ids[cut:])
    (data / "tiny_meta.json").write_text(json.dumps({"tokenizer_dir": str(data / "tiny_tokenizer"), "vocab_size": 300}))
    run_dir = tmp / "tiny_run"
    proc = cli(
        "train",
        "--train-data",
        data / "tiny_train.uint16.npy",
        "--val-data",
        data / "tiny_val.uint16.npy",
        "--vocab-size",
        300,
        "--context-length",
        32,
        "--d-model",
        32,
        "--num-layers",
        2,
        "--num-heads",
        4,
        "--d-ff",
        64,
        "--batch-size",
        4,
        "--max-iters",
        10,
        "--warmup-iters",
        2,
        "--max-lr",
        3e-3,
        "--log-interval",
        2,
        "--eval-interval",
        5,
        "--eval-iters",
        2,
        "--checkpoint-interval",
        5,
        "--checkpoint-dir",
        run_dir,
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (run_dir / "metrics.jsonl").is_file() and list(run_dir.glob("checkpoint_*.pt")), sorted(run_dir.iterdir())
    return run_dir


def test_generate_cli_streams_the_sample_of_the_newest_checkpoint(run):
    proc = cli(
        "generate", "--checkpoint", run, "--prompt", PROMPT, "--max-new-tokens", 24, "--seed", 0, "--device", "cpu"
    )
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint_10.pt" in proc.stderr  # the newest of checkpoint_5.pt, checkpoint_10.pt
    # independent of the CLI's plumbing: the same model, tokenizer and seed through the library call
    model, config, path = load_model(run / "checkpoint_10.pt")
    tokenizer = find_tokenizer(config, path)
    expected = sample_text(model, tokenizer, PROMPT, 24, 0.8, 0.9, None, seed=0)
    assert len(tokenizer.encode(expected)) > len(tokenizer.encode(PROMPT))
    assert proc.stdout == expected + "\n"


def test_generate_cli_bad_input_is_one_line(run, tmp_path, capsys):
    assert_one_line_error(
        cli("generate", "--checkpoint", tmp_path / "missing.pt", "--prompt", PROMPT), "checkpoint not found"
    )
    # the rest in-process: the same code path without an interpreter start-up each
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint_3.pt").write_bytes((run / "checkpoint_10.pt").read_bytes()[:1000])  # truncated
    cases = [
        (["--checkpoint", corrupt, "--prompt", PROMPT], "checkpoint_3.pt"),
        (["--checkpoint", tmp_path, "--prompt", PROMPT], "no checkpoint_<iter>.pt"),
        (["--checkpoint", run, "--prompt", ""], "empty prompt"),
        (["--checkpoint", run, "--prompt", PROMPT, "--tokenizer", tmp_path], "no tokenizer in"),
        (["--checkpoint", run, "--prompt", PROMPT, "--temperature", "-1"], "--temperature"),
    ]
    for argv, text in cases:
        with pytest.raises(SystemExit) as exit:
            generate_main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and text in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_checkpoint_copied_elsewhere_still_finds_its_tokenizer(run, tmp_path):
    # the checkpoint carries its config (data paths included): no config.json is needed beside it
    (tmp_path / "checkpoint_10.pt").write_bytes((run / "checkpoint_10.pt").read_bytes())
    model, config, path = load_model(tmp_path)
    assert find_tokenizer(config, path).encode(PROMPT) == Tokenizer.from_dir(
        run.parent / "data" / "tiny_tokenizer"
    ).encode(PROMPT)
    with pytest.raises(FileNotFoundError, match="pass --tokenizer"):  # a config that names no data
        find_tokenizer({**config, "train_data": None, "tokenizer_dir": None}, path)


def test_plot_cli_writes_a_png_of_the_expected_size(run, tmp_path):
    out = tmp_path / "curves.png"
    proc = cli("plot", run, "--out", out, "--log-y", "--title", "tiny run")
    assert proc.returncode == 0, proc.stderr
    width, height = png_size(out)
    assert (width, height) == (round(FIGSIZE[0] * 100), round(FIGSIZE[1] * 100))
    assert mpimg.imread(out).shape[:2] == (height, width)  # and it decodes
    with pytest.raises(SystemExit) as exit:  # bad input, in-process (the notebook tests the others)
        plot_main([str(tmp_path / "nope"), "--out", str(out)])
    assert exit.value.code == 2
