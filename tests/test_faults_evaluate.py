"""A hostile user against `python -m cs336_nb.evaluate`: a table of attacks (an `--out` aimed at a checkpoint,
`metrics.jsonl`, `config.json`, a folder or a pipe; inputs that are pipes, devices, folders, text given as
tokens, broken sidecars and `.npy` files; absurd sizes), each checked for exit status 2, exactly one stderr
line naming the problem, no hang, and every file under the work folder byte for byte as it was. Then what
must succeed without losing a result: two inputs of one name, a rerun, the file-size limit.

The attacks run `main` in this process under an alarm (a hang fails the test instead of blocking the run);
the file-size limit and one pipe run the command line in a real process, with a timeout. The run attacked is
made by hand: a tiny random model (context 32) saved the way training saves it, a byte-level tokenizer in
its `tokenizer/`, a `config.json` and a `metrics.jsonl`.
"""

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, call_main

from cs336_nb.checkpoint import save_checkpoint
from cs336_nb.evaluate import main as evaluate_main
from cs336_nb.model import TransformerLM
from cs336_nb.tokenizer import Tokenizer

CONTEXT = 32
TIMEOUT = 60  # seconds for any one attack


def cli(argv: list, cwd: Path, timeout: int = TIMEOUT) -> tuple[int, str, str]:
    """`python -m cs336_nb.evaluate argv` in this process, from `cwd`, under an alarm: (status, stdout, stderr)."""
    return call_main(evaluate_main, argv, cwd, timeout)


def snapshot(d: Path) -> dict[str, str]:
    """Every regular file under `d` and a hash of its bytes (pipes, devices and links to them are skipped)."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def one_line(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """run/ (checkpoint_9.pt, config.json, metrics.jsonl, tokenizer/), val.txt and val.npy of the same text."""
    d = tmp_path_factory.mktemp("faults_evaluate")
    torch.manual_seed(0)
    config = dict(vocab_size=257, context_length=CONTEXT, d_model=32, num_layers=1, num_heads=2, d_ff=64)
    model = TransformerLM.from_config(config | dict(rope_theta=10000.0)).eval()
    save_checkpoint(model, None, 9, d / "run" / "checkpoint_9.pt", config=model.config)
    (d / "run" / "config.json").write_text(json.dumps({**model.config, "run_id": "abc"}))
    (d / "run" / "metrics.jsonl").write_text('{"type": "train", "step": 0, "loss": 5.6}\n')
    tokenizer = Tokenizer({i: bytes([i]) for i in range(256)} | {256: b"<|endoftext|>"}, [], ["<|endoftext|>"])
    tokenizer.save(d / "run" / "tokenizer")
    text = "Once upon a time there was a tiny model that scored every byte. " * 8
    (d / "val.txt").write_text(text, encoding="utf-8")
    np.save(d / "val.npy", np.array([256, *text.encode("utf-8")], dtype=np.uint16))
    return d


@pytest.fixture
def work(base, tmp_path) -> Path:
    shutil.copytree(base, tmp_path / "w")
    return tmp_path / "w"


def _file(work: Path, name: str, content: bytes) -> Path:
    (work / name).write_bytes(content)
    return work / name


def _pipe(work: Path, name: str) -> Path:
    os.mkfifo(work / name)
    return work / name


def _link(work: Path, name: str, target: str) -> Path:
    (work / name).symlink_to(target)
    return work / name


def _raw(work: Path, sidecar: str | None) -> Path:
    np.arange(100, dtype=np.uint16).tofile(work / "ids.bin")
    if sidecar is not None:
        (work / "ids.bin.json").write_text(sidecar)
    return work / "ids.bin"


def _truncated_npy(work: Path) -> Path:
    np.save(work / "long.npy", np.arange(200, dtype=np.uint16))
    data = (work / "long.npy").read_bytes()
    (work / "long.npy").write_bytes(data[: len(data) // 2])
    return work / "long.npy"


def _ids(work: Path, ids: list[int]) -> Path:
    np.save(work / "big.npy", np.array(ids, dtype=np.uint16))
    return work / "big.npy"


DATA = ["run", "--data", "val.npy"]
TEXT = ["run", "--text", "val.txt"]

# attack: (set-up -> the arguments, words the one line must hold). Every attack runs from the work folder, and
# every regular file under it must be unchanged afterwards (nothing written, nothing replaced).
ATTACKS = {
    # never write over what is not ours
    "--out is the checkpoint": (lambda w: [*DATA, "--out", "run/checkpoint_9.pt"], "not a name for a result"),
    "--out is metrics.jsonl": (lambda w: [*DATA, "--out", "run/metrics.jsonl"], "not a name for a result"),
    "--out is config.json": (lambda w: [*DATA, "--out", "run/config.json"], "not a name for a result"),
    "--out is a tokenizer file": (lambda w: [*DATA, "--out", "run/tokenizer/vocab.json"], "not a name for a result"),
    "--out is a JSON that is no result": (
        lambda w: [*DATA, "--out", w / "run" / "tokenizer" / "special_tokens.json"],
        "not a name for a result",
    ),
    "--out is someone's JSON": (
        lambda w: [*DATA, "--out", _file(w, "notes.json", b'{"keep": 1}')],
        "is not an evaluate result",
    ),
    "--out is a folder": (lambda w: (w / "x.json").mkdir() or [*DATA, "--out", "x.json"], "not a regular file"),
    "--out is empty": (lambda w: [*DATA, "--out", ""], "--out is empty"),
    "--out is a pipe": (lambda w: [*DATA, "--out", _pipe(w, "p.json")], "not a regular file"),
    "--out links to /dev/null": (lambda w: [*DATA, "--out", _link(w, "n.json", "/dev/null")], "not a regular file"),
    "--out links nowhere": (lambda w: [*DATA, "--out", _link(w, "gone.json", "nowhere")], "not a regular file"),
    "--out inside the checkpoint file": (
        lambda w: [*DATA, "--out", "run/checkpoint_9.pt/eval.json"],
        "run/checkpoint_9.pt is a file, not a folder",
    ),
    # refuse what prepare refuses
    "--text is a pipe": (lambda w: ["run", "--text", _pipe(w, "p.txt")], "not a regular file"),
    "--data is a pipe": (lambda w: ["run", "--data", _pipe(w, "p.npy")], "not a regular file"),
    "--text is /dev/zero": (lambda w: ["run", "--text", "/dev/zero"], "not a regular file"),
    "--data is /dev/zero": (lambda w: ["run", "--data", "/dev/zero"], "not a regular file"),
    "--data links to /dev/urandom": (lambda w: ["run", "--data", _link(w, "r.npy", "/dev/urandom")], "regular"),
    "--data is a folder": (lambda w: ["run", "--data", "run"], "is a folder"),
    "--text is missing": (lambda w: ["run", "--text", "gone.txt"], "no such file"),
    "a text file given to --data": (lambda w: ["run", "--data", "val.txt"], "use --text val.txt"),
    "sidecar names banana": (lambda w: ["run", "--data", _raw(w, '{"dtype": "banana"}')], "names no integer dtype"),
    "sidecar names float32": (lambda w: ["run", "--data", _raw(w, '{"dtype": "float32"}')], "names no integer dtype"),
    "sidecar is a number": (lambda w: ["run", "--data", _raw(w, "5")], "names no integer dtype"),
    "sidecar is torn": (lambda w: ["run", "--data", _raw(w, '{"dtype": "uin')], "names no integer dtype"),
    "raw tokens, no sidecar": (lambda w: ["run", "--data", _raw(w, None)], "dtype sidecar"),
    "empty .npy": (lambda w: ["run", "--data", _file(w, "e.npy", b"")], "cannot be read"),
    "a .npy of garbage": (lambda w: ["run", "--data", _file(w, "g.npy", b"\x93NUMPY garbage")], "cannot be read"),
    "truncated .npy": (lambda w: ["run", "--data", _truncated_npy(w)], "cannot be read"),
    "text renamed .npy": (lambda w: shutil.copy(w / "val.txt", w / "t.npy") and ["run", "--data", "t.npy"], "--text"),
    "ids beyond the model": (lambda w: ["run", "--data", _ids(w, [1, 2, 300])], "300"),
    "one token only": (lambda w: ["run", "--data", _ids(w, [5])], "at least 2"),
    "not UTF-8": (lambda w: ["run", "--text", _file(w, "l.txt", b"caf\xe9")], "not UTF-8"),
    # absurd sizes and windows
    "--batch-size 10**9": (lambda w: [*DATA, "--batch-size", 10**9], "--batch-size 1,000,000,000 needs"),
    "--batch-size 0": (lambda w: [*DATA, "--batch-size", 0], "--batch-size"),
    "--context-length beyond the model's": (lambda w: [*DATA, "--context-length", 33], "pass at most 32"),
    "--context-length 0": (lambda w: [*DATA, "--context-length", 0], "at least 1"),
    "--context-length -5": (lambda w: [*DATA, "--context-length", -5], "at least 1"),
    "--stride 0": (lambda w: [*DATA, "--stride", 0], "--stride"),
    "--stride beyond the window": (lambda w: [*DATA, "--context-length", 8, "--stride", 9], "context_length=8"),
    "empty checkpoint argument": (lambda w: ["", "--data", "val.npy"], "checkpoint argument is empty"),
    "--tokenizer is a file": (lambda w: [*DATA, "--tokenizer", "val.txt"], "--tokenizer"),
    "--tokenizer ''": (lambda w: [*DATA, "--tokenizer", ""], "--tokenizer is empty"),
    "checkpoint is a text file": (lambda w: ["val.txt", "--data", "val.npy"], "val.txt"),
}


# A device read whole never returns to Python, so no alarm can stop it: these run in a real process, with a
# timeout and a memory limit (a regression then fails in seconds, with MemoryError, instead of filling the machine).
REAL_PROCESS = {"--text is /dev/zero", "--data is /dev/zero", "--data links to /dev/urandom", "--data is a pipe"}


@pytest.mark.parametrize("case", list(ATTACKS))
def test_attack(case, work):
    setup, words = ATTACKS[case]
    argv = setup(work)
    before = snapshot(work)
    if case in REAL_PROCESS:
        proc = command(argv, work, data_limit=4 << 30)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        code, out, err = cli(argv, work)
    assert code == 2, (out, err)
    one_line(err, words)
    assert "dtype=" not in err  # no argument the command line does not have
    assert snapshot(work) == before  # nothing written, nothing replaced
    assert not list(work.rglob("*.tmp"))


def test_text_given_to_data_points_to_text(work):
    code, _, err = cli(["run", "--data", "val.txt"], work)
    assert code == 2
    assert err.strip() == (
        "evaluate: error: val.txt is neither a .npy token array nor raw tokens with a dtype sidecar "
        '(for a text file use --text val.txt; for raw uint16 tokens write val.txt.json holding {"dtype": "uint16"})'
    )


# --- what must succeed, and keep every result ----------------------------------------------------------------------


def results(run: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(run.glob("eval_*.json"))}


def test_two_inputs_of_one_name_keep_both_results(work):
    for folder, text in (("a", "the first input, " * 20), ("b", "and the second one. " * 20)):
        (work / folder).mkdir()
        (work / folder / "val.txt").write_text(text)
    code, _, err = cli(["run", "--text", "a/val.txt"], work)
    assert code == 0, err
    first = snapshot(work / "run")
    code, _, err = cli(["run", "--text", "b/val.txt"], work)
    assert code == 0, err
    found = results(work / "run")
    assert sorted(r["input"] for r in found.values()) == ["a/val.txt", "b/val.txt"], found
    assert all(name.startswith("eval_val.txt_9_") for name in found)
    after = snapshot(work / "run")
    assert {k: v for k, v in after.items() if k in first} == first  # the first result, byte for byte
    assert found[err.split("wrote run/")[1].strip()]["input"] == "b/val.txt"


def test_rerun_replaces_only_its_own_result(work):
    for _ in range(2):
        code, _, err = cli(DATA, work)
        assert code == 0, err
    code, _, err = cli([*DATA, "--context-length", 16], work)
    assert code == 0, err
    found = results(work / "run")
    assert sorted(r["context_length"] for r in found.values()) == [16, CONTEXT], found  # two files, not three


def test_out_may_replace_an_earlier_result(work):
    code, _, err = cli([*DATA, "--out", "r.json"], work)
    assert code == 0, err
    code, _, err = cli([*TEXT, "--out", "r.json", "--stride", 4], work)
    assert code == 0, err
    assert json.loads((work / "r.json").read_text())["stride"] == 4


def test_result_is_the_hand_computed_loss(work):
    """The numbers written are the model's: one F.cross_entropy per window of 32, summed by hand."""
    code, out, err = cli([*DATA, "--json", "--out", "r.json"], work)
    assert code == 0, err
    result = json.loads(out)
    ids = torch.as_tensor(np.load(work / "val.npy").astype(np.int64))
    model = TransformerLM.from_config(torch.load(work / "run" / "checkpoint_9.pt", weights_only=True)["config"])
    model.load_state_dict(torch.load(work / "run" / "checkpoint_9.pt", weights_only=True)["model_state_dict"])
    with torch.no_grad():
        total = sum(
            F.cross_entropy(model(ids[None, s : min(s + CONTEXT, len(ids) - 1)])[0], ids[s + 1 : s + CONTEXT + 1],
                            reduction="sum").item()
            for s in range(0, len(ids) - 1, CONTEXT)
        )  # fmt: skip
    assert result["loss"] == pytest.approx(total / (len(ids) - 1), rel=1e-5)


# --- real processes: the file-size limit, a pipe ---------------------------------------------------------------------


def command(
    argv: list, cwd: Path, file_limit: int | None = None, data_limit: int | None = None
) -> subprocess.CompletedProcess:
    """`python -m cs336_nb.evaluate argv` in a real process, with a timeout and optional file-size and memory limits."""

    def limit():
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
        if data_limit is not None:
            resource.setrlimit(resource.RLIMIT_DATA, (data_limit, data_limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cs336_nb.evaluate", *map(str, argv)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
        preexec_fn=limit,
    )


def test_file_size_limit_is_one_line(work):
    before = snapshot(work)
    proc = command(DATA, work, file_limit=100)  # a result is ~500 bytes: its write passes the limit
    assert proc.returncode == 2, proc.stderr
    one_line(proc.stderr, "file-size limit", "ulimit -f")
    assert snapshot(work) == before and not list(work.rglob(".*.tmp"))  # no result, no half file


def test_pipe_does_not_hang_a_real_process(work):
    os.mkfifo(work / "pipe.txt")
    proc = command(["run", "--text", "pipe.txt"], work)  # nobody ever writes to the pipe
    assert proc.returncode == 2, proc.stderr
    one_line(proc.stderr, "pipe.txt is not a regular file")
