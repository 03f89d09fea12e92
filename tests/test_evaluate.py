"""End-to-end checks of `python -m cs336_nb.evaluate`; the sliding window, the hand-computed bits per byte and
the stride loop are tested in nbs/19_evaluate.ipynb.

A module-scoped run directory as training leaves it: a BPE tokenizer (vocab 300) trained by `train_bpe` on
the English corpus in nbs/data, saved in `<run>/tokenizer/`, and a tiny random model (context 32) saved by
`save_checkpoint` with its config. The corpus's first 3,000 characters are the input, as a text file and as
a token file.
"""

import json
import math
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DATA, run_module

from cs336_nb.checkpoint import save_checkpoint
from cs336_nb.evaluate import main as evaluate_main
from cs336_nb.model import TransformerLM
from cs336_nb.tokenizer import Tokenizer, train_bpe

CONTEXT = 32


def cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m cs336_nb.evaluate args` from the repository root."""
    return run_module("evaluate", *args, timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evaluate")
    tokenizer = Tokenizer(*train_bpe(DATA / "corpus.en", 300, ["<|endoftext|>"]), ["<|endoftext|>"])
    torch.manual_seed(0)
    config = dict(vocab_size=300, context_length=CONTEXT, d_model=32, num_layers=2, num_heads=4, d_ff=64)
    model = TransformerLM.from_config(config | dict(rope_theta=10000.0)).eval()
    save_checkpoint(model, None, 9, root / "run" / "checkpoint_9.pt", config=model.config)
    tokenizer.save(root / "run" / "tokenizer")
    text = (DATA / "corpus.en").read_text(encoding="utf-8")[:3000]
    (root / "input.txt").write_text(text, encoding="utf-8")
    ids = np.array(tokenizer.encode(text), dtype=np.uint16)
    np.save(root / "input.npy", ids)
    return root, model, tokenizer, text, ids


def test_evaluate_data_equals_window_by_window_cross_entropy(run):
    root, model, tokenizer, text, ids = run
    proc = cli(root / "run", "--data", root / "input.npy", "--json", "--batch-size", "3")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    # the reference: non-overlapping windows of CONTEXT inputs, each scored whole by F.cross_entropy
    x = torch.as_tensor(ids.astype(np.int64))
    total = 0.0
    for begin in range(0, len(x) - 1, CONTEXT):
        window = x[begin : min(begin + CONTEXT + 1, len(x))]
        with torch.no_grad():
            total += F.cross_entropy(model(window[None, :-1])[0], window[1:], reduction="sum").item()
    assert result["tokens"] == len(ids) - 1
    assert result["bytes"] == sum(len(tokenizer.vocab[i]) for i in ids[1:].tolist())
    assert math.isclose(result["loss"], total / (len(ids) - 1), rel_tol=1e-5)
    assert math.isclose(result["perplexity"], math.exp(total / (len(ids) - 1)), rel_tol=1e-5)
    assert math.isclose(result["bits_per_byte"], total / math.log(2) / result["bytes"], rel_tol=1e-5)
    assert (result["iteration"], result["stride"], result["kind"]) == (9, CONTEXT, "data")
    written = root / "run" / f"eval_input_9_{result['fingerprint']}.json"  # the default --out
    assert json.loads(written.read_text()) == result
    assert proc.stderr.strip() == f"wrote {written}"


def test_evaluate_at_a_shorter_context_equals_hand_cut_windows(run):
    """--context-length 8 on a model trained at 32: windows of 8 inputs cut by hand, each one F.cross_entropy."""
    root, model, _, _, ids = run
    proc = cli(root / "run", "--data", root / "input.npy", "--json", "--context-length", "8", "--out", root / "c8.json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    x = torch.as_tensor(ids.astype(np.int64))
    starts = list(range(0, len(x) - 1, 8))  # inputs x[s : s + 8] predict x[s + 1 : s + 9]
    assert len(starts) == math.ceil((len(x) - 1) / 8)
    total = 0.0
    with torch.no_grad():
        for s in starts:
            e = min(s + 8, len(x) - 1)
            total += F.cross_entropy(model(x[None, s:e])[0], x[s + 1 : e + 1], reduction="sum").item()
    assert (result["context_length"], result["stride"], result["tokens"]) == (8, 8, len(ids) - 1)
    assert math.isclose(result["loss"], total / (len(ids) - 1), rel_tol=1e-5)
    full = json.loads(cli(root / "run", "--data", root / "input.npy", "--json", "--out", root / "c32.json").stdout)
    assert not math.isclose(result["loss"], full["loss"], rel_tol=1e-6)  # the window length changes the number
    assert result["fingerprint"] != full["fingerprint"]  # and another default file name


def test_evaluate_text_counts_the_file_bytes(run):
    root, _, _, text, _ = run
    proc = cli(root / "run", "--text", root / "input.txt", "--stride", "8", "--out", root / "text.json")
    assert proc.returncode == 0, proc.stderr
    assert "bits/byte" in proc.stdout and "wrote" in proc.stderr
    result = json.loads((root / "text.json").read_text())
    assert result["bytes"] == len(text.encode("utf-8"))  # <|endoftext|> first, then every token of the text scored
    assert result["stride"] == 8 and result["kind"] == "text"


def test_evaluate_errors_are_one_line(run, capsys):
    root = run[0]
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for argv, text in [
        (["--text", root / "input.txt", "--stride", "33"], "--stride"),
        (["--text", root / "latin1.txt"], "not UTF-8"),
        (["--text", root / "missing.txt"], "missing.txt"),
        (["--data", root / "input.npy", "--batch-size", "0"], "--batch-size"),
        (["--data", root / "input.npy", "--max-tokens", "1"], "--max-tokens"),
        (["--data", root / "input.npy", "--context-length", "33"], "pass at most 32"),
        (["--data", root / "input.npy", "--context-length", "0"], "--context-length must be at least 1"),
    ]:
        with pytest.raises(SystemExit) as exit:
            evaluate_main([str(root / "run"), *map(str, argv)])
        err = capsys.readouterr().err
        assert exit.value.code == 2, err
        assert err.startswith("evaluate: error:") and text in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as exit:
        evaluate_main([str(root / "run")])  # neither --text nor --data: argparse's usage error
    assert exit.value.code == 2 and "--text" in capsys.readouterr().err
