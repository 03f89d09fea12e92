"""End-to-end checks of the faces that use a finished run: `python -m cs336_nb.generate` and
`python -m cs336_nb.plot`, in subprocesses, on a run that the real training CLI makes here.

One module-scoped run is shared by every test: a byte-level BPE tokenizer (vocab 300) trained by
`train_bpe` on the TinyStories sample in nbs/data and saved with `Tokenizer.save`, the sample encoded
to `tiny_train.uint16.npy` / `tiny_val.uint16.npy`, and 10 training steps of a tiny model with
`--tokenizer-dir` naming that tokenizer. The run directory must then hold its own copy in
`tokenizer/`, which is all generation reads (no --tokenizer flag).
"""

import re
import struct
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from conftest import DATA, assert_one_line_error
from conftest import run_module as cli

from cs336_nb.generate import generate, sample_text
from cs336_nb.generate import main as generate_main
from cs336_nb.plot import FIGSIZE
from cs336_nb.runtime import load_model
from cs336_nb.tokenizer import Tokenizer, train_bpe

PROMPT = "Once upon a time"


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
    vocab, merges = train_bpe(DATA / "tinystories_sample.txt", 300, ["<|endoftext|>"])
    Tokenizer(vocab, merges, ["<|endoftext|>"]).save(data / "tiny_tokenizer")
    tokenizer = Tokenizer.from_dir(data / "tiny_tokenizer")
    ids = np.array(tokenizer.encode((DATA / "tinystories_sample.txt").read_text(encoding="utf-8")), dtype=np.uint16)
    cut = int(0.8 * len(ids))
    np.save(data / "tiny_train.uint16.npy", ids[:cut])
    np.save(data / "tiny_val.uint16.npy", ids[cut:])
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
        "--tokenizer-dir",
        data / "tiny_tokenizer",
        "--device",
        "cpu",
        "--threads",
        1,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (run_dir / "metrics.jsonl").is_file() and list(run_dir.glob("checkpoint_*.pt")), sorted(run_dir.iterdir())
    assert (run_dir / "tokenizer" / "vocab.json").is_file(), sorted(run_dir.iterdir())  # the run's own copy
    return run_dir


def test_generate_cli_streams_the_sample_of_the_newest_checkpoint(run):
    proc = cli(
        "generate", "--checkpoint", run, "--prompt", PROMPT, "--max-new-tokens", 24, "--seed", 0, "--device", "cpu"
    )
    assert proc.returncode == 0, proc.stderr
    loaded, speed = proc.stderr.splitlines()
    assert "checkpoint_10.pt" in loaded  # the newest of checkpoint_5.pt, checkpoint_10.pt
    # independent of the CLI's plumbing: the same model, the tokenizer the run was trained with, the same seed
    model, _, _ = load_model(run / "checkpoint_10.pt")
    tokenizer = Tokenizer.from_dir(run.parent / "data" / "tiny_tokenizer")
    expected = sample_text(model, tokenizer, PROMPT, 24, 0.8, 0.9, None, seed=0)
    assert len(tokenizer.encode(expected)) > len(tokenizer.encode(PROMPT))
    assert proc.stdout == expected + "\n"
    # the speed line counts the tokens drawn (the same draw by hand: generate with the same seed)
    eos = tokenizer.encode("<|endoftext|>")[0]
    drawn = generate(model, tokenizer.encode(PROMPT), 24, 0.8, 0.9, None, eos, torch.Generator().manual_seed(0))
    match = re.fullmatch(r"generated (\d+) tokens in [0-9.]+ s \(\d+ tok/s\)", speed)
    assert match is not None and int(match[1]) == len(drawn), speed


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
        (["--checkpoint", run, "--prompt", PROMPT, "--tokenizer", tmp_path / "nope"], "no such directory"),
        (["--checkpoint", run, "--prompt", PROMPT, "--temperature", "-1"], "temperature"),
    ]
    for argv, text in cases:
        with pytest.raises(SystemExit) as exit:
            generate_main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and text in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert err.startswith("generate: error: "), err


def test_checkpoint_copied_elsewhere_needs_its_tokenizer_named(run, tmp_path, capsys):
    # the checkpoint carries its model config: no config.json is needed beside it, but the tokenizer is
    # not guessed from the paths the config recorded: the error names the flag, and the flag works
    (tmp_path / "checkpoint_10.pt").write_bytes((run / "checkpoint_10.pt").read_bytes())
    argv = ["--checkpoint", str(tmp_path), "--prompt", PROMPT, "--max-new-tokens", "4", "--device", "cpu"]
    with pytest.raises(SystemExit) as exit:
        generate_main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "--tokenizer DIR" in err and len(err.strip().splitlines()) == 1, err
    generate_main([*argv, "--tokenizer", str(run / "tokenizer"), "--seed", "0", "--threads", "1"])
    assert capsys.readouterr().out.startswith(PROMPT)


def test_plot_cli_writes_a_png_of_the_expected_size_into_the_run(run):
    proc = cli("plot", run, "--log-y", "--smooth", "0.9")
    assert proc.returncode == 0, proc.stderr
    out = run / "curves.png"
    # --smooth means the factor given; on a run this short it says so in one warning line
    points = (run / "metrics.jsonl").read_text().count('"type": "train"')
    assert points == 6  # steps 0, 2, 4, 6, 8 and the last, 9
    warning = (
        f"plot: warning: tiny_run: smoothing 0.9 averages over about 10 of its {points} logged losses, "
        "so the smoothed curve trails the raw one (too few points to smooth: use 0)\n"
    )
    assert proc.stdout == f"wrote {out}\n" and proc.stderr == warning, (proc.stdout, proc.stderr)
    width, height = png_size(out)
    assert (width, height) == (round(FIGSIZE[0] * 100), round(FIGSIZE[1] * 100))
    assert mpimg.imread(out).shape[:2] == (height, width)  # and it decodes
