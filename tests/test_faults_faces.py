"""A hostile user against the faces that read a finished run: `generate`, `plot` and `quickstart`.

Each attack is one row of a table: the command line, the exit status it must end with, and a piece of
the one stderr line that must name the problem (for the successes: nothing on stderr, or the one
warning). Most rows run the CLI's `main` in-process (the same code path as the command, without an
interpreter start-up each); the attacks that need a real process (a closed stdout, a reader that
stops early, Ctrl-C) run it in a subprocess, each with a timeout.

The run attacked is made by hand, not by training: a small random model saved with
`save_checkpoint` the way training saves it (config inside), a byte-level tokenizer with no special
tokens (so generation never stops early) in the run's `tokenizer/`, and a synthetic `metrics.jsonl`.
"""

import builtins
import contextlib
import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from cs336_nb.checkpoint import save_checkpoint
from cs336_nb.generate import main as generate_main
from cs336_nb.model import TransformerLM
from cs336_nb.plot import main as plot_main
from cs336_nb.quickstart import main as quickstart_main
from cs336_nb.tokenizer import Tokenizer

MAINS = {"generate": generate_main, "plot": plot_main, "quickstart": quickstart_main}
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run directory: checkpoints 2 and 4 of a tiny model, its tokenizer/, a metrics.jsonl."""
    run = tmp_path_factory.mktemp("faults") / "run"
    run.mkdir()
    torch.manual_seed(0)
    model = TransformerLM(
        vocab_size=256, context_length=16, d_model=16, num_layers=1, num_heads=2, d_ff=32, rope_theta=10000.0
    )
    save_checkpoint(model, None, 2, run / "checkpoint_2.pt", config=model.config)
    save_checkpoint(model, None, 4, run / "checkpoint_4.pt", config=model.config)
    Tokenizer({i: bytes([i]) for i in range(256)}, [], []).save(run / "tokenizer")
    records = [{"type": "train", "step": s, "time_s": s / 10, "loss": 5.0 - s / 100} for s in range(0, 50, 5)]
    records.append({"type": "eval", "step": 45, "time_s": 4.6, "val_loss": 4.7})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def in_process(prog: str, argv: list) -> tuple[int, str, str]:
    """Run `cs336_nb.<prog>.main(argv)`; return (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            MAINS[prog]([str(a) for a in argv])
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def subprocess_env() -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
    }


def one_line(err: str, prog: str, kind: str, text: str) -> None:
    """stderr is exactly one line, `<prog>: <kind>: ...`, containing `text`, and no traceback."""
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"{prog}: {kind}: ") and text in err, err


# --- the table -----------------------------------------------------------------------------------
# (name, prog, argv with {run}/{tmp} placeholders, expected exit status, text of the stderr line)
# exit 0 with text None: nothing on stderr but the generate speed/load lines; exit 0 with text: one warning
GEN = ["--checkpoint", "{run}", "--prompt", "hi", "--max-new-tokens", "3", "--device", "cpu", "--threads", "1"]
ATTACKS = [
    ("temperature nan", "generate", [*GEN, "--temperature", "nan"], 2, "temperature must be a finite number"),
    ("temperature inf", "generate", [*GEN, "--temperature", "inf"], 2, "temperature must be a finite number"),
    ("temperature negative", "generate", [*GEN, "--temperature", "-0.5"], 2, "temperature must be"),
    ("top-p nan", "generate", [*GEN, "--top-p", "nan"], 2, "top_p must be in (0, 1]"),
    ("top-p zero", "generate", [*GEN, "--top-p", "0"], 2, "top_p must be in (0, 1]"),
    ("top-k negative", "generate", [*GEN, "--top-k", "-1"], 2, "top_k must be a positive integer"),
    ("max-new-tokens negative", "generate", [*GEN, "--max-new-tokens", "-5"], 2, "--max-new-tokens"),
    ("seed out of range", "generate", [*GEN, "--seed", str(2**70)], 2, "--seed must be"),
    ("threads zero", "generate", [*GEN, "--threads", "0"], 2, "threads"),
    ("unknown device", "generate", [*GEN, "--device", "tpu"], 2, "tpu"),
    ("device not present", "generate", [*GEN, "--device", "cuda:7"], 2, "cuda"),
    ("run dir missing", "generate", ["--checkpoint", "{tmp}/nowhere", "--prompt", "hi"], 2, "nowhere"),
    ("run dir without checkpoints", "generate", ["--checkpoint", "{tmp}/empty", "--prompt", "hi"], 2, "empty"),
    ("truncated checkpoint", "generate", ["--checkpoint", "{tmp}/torn", "--prompt", "hi"], 2, "checkpoint_9.pt"),
    ("checkpoint that is a folder", "generate", ["--checkpoint", "{tmp}/folder.pt", "--prompt", "hi"], 2, "folder.pt"),
    ("checkpoint without config", "generate", ["--checkpoint", "{tmp}/noconfig", "--prompt", "hi"], 2, "config"),
    ("no optimizer state", "generate", [*GEN[2:], "--checkpoint", "{tmp}/noopt/checkpoint_1.pt"], 0, None),
    ("tokenizer dir empty", "generate", [*GEN, "--tokenizer", "{tmp}/empty"], 2, "empty"),
    ("tokenizer vocab corrupt", "generate", [*GEN, "--tokenizer", "{tmp}/badtok"], 2, "badtok"),
    ("tokenizer of another run", "generate", [*GEN, "--tokenizer", "{tmp}/bigtok"], 2, "--tokenizer"),
    ("metrics torn lines", "plot", ["{tmp}/torn_metrics", "--out", "{tmp}/a.png"], 0, "skipped 2 unreadable line(s)"),
    ("metrics all garbage", "plot", ["{tmp}/garbage", "--out", "{tmp}/b.png"], 2, "none of its 2 lines"),
    ("metrics empty", "plot", ["{tmp}/empty_metrics", "--out", "{tmp}/c.png"], 2, "no train or eval loss records"),
    ("plot run dir missing", "plot", ["{tmp}/nowhere"], 2, "run directory not found"),
    ("plot run without metrics", "plot", ["{tmp}/empty"], 2, "no metrics.jsonl"),
    ("plot a binary file", "plot", ["{run}/checkpoint_2.pt", "--out", "{tmp}/d.png"], 2, "checkpoint_2.pt"),
    ("plot out folder missing", "plot", ["{run}", "--out", "{tmp}/no/such/e.png"], 2, "does not exist"),
    ("plot out is a folder", "plot", ["{run}", "--out", "{tmp}/empty"], 2, "it is a directory"),
    ("plot out format unknown", "plot", ["{run}", "--out", "{tmp}/f.xyz"], 2, "unknown image format"),
    ("plot smooth out of range", "plot", ["{run}", "--smooth", "1"], 2, "smoothing must be in [0, 1)"),
    ("plot smooth nan", "plot", ["{run}", "--smooth", "nan"], 2, "smoothing must be in [0, 1)"),
    ("quickstart config missing", "quickstart", ["--config", "{tmp}/none.json"], 2, "no config at"),
    ("quickstart config not JSON", "quickstart", ["--config", "{tmp}/cfg_torn.json"], 2, "not valid JSON"),
    ("quickstart config a list", "quickstart", ["--config", "{tmp}/cfg_list.json"], 2, "JSON object"),
    ("quickstart config incomplete", "quickstart", ["--config", "{tmp}/cfg_empty.json"], 2, "names no train_data"),
    ("quickstart config key typo", "quickstart", ["--config", "{tmp}/cfg_typo.json"], 2, "unknown key 'trian_data'"),
    ("quickstart config wrong type", "quickstart", ["--config", "{tmp}/cfg_type.json"], 2, "vocab_size"),
    ("quickstart bad dataset name", "quickstart", ["--config", "{tmp}/cfg_name.json"], 2, "prepare's naming"),
    ("quickstart threads zero", "quickstart", ["--config", "{tmp}/cfg_name.json", "--threads", "0"], 2, "threads"),
]


@pytest.fixture(scope="module")
def props(run, tmp_path_factory) -> Path:
    """The damaged files and folders the table refers to as {tmp}/..."""
    tmp = tmp_path_factory.mktemp("props")
    (tmp / "empty").mkdir()
    (tmp / "folder.pt").mkdir()
    (tmp / "torn").mkdir()
    (tmp / "torn" / "checkpoint_9.pt").write_bytes((run / "checkpoint_4.pt").read_bytes()[:2000])
    state = torch.load(run / "checkpoint_4.pt", weights_only=True)
    (tmp / "noconfig").mkdir()
    torch.save({k: v for k, v in state.items() if k != "config"}, tmp / "noconfig" / "checkpoint_1.pt")
    (tmp / "noopt").mkdir()  # written by hand: only what generation needs, no optimizer state at all
    torch.save({k: state[k] for k in ("model_state_dict", "iteration", "config")}, tmp / "noopt" / "checkpoint_1.pt")
    (tmp / "noopt" / "tokenizer").symlink_to(run / "tokenizer")
    (tmp / "badtok").mkdir()
    for name in ("vocab.json", "merges.txt", "special_tokens.json"):
        (tmp / "badtok" / name).write_text("{ not json")
    Tokenizer({i: bytes([i]) for i in range(256)} | {256: b"hi"}, [(b"h", b"i")], []).save(tmp / "bigtok")  # "hi": 256
    good = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    for name, text in [
        ("torn_metrics", good[0] + '{"type": "tra\n' + "".join(good[1:]) + '{"type": "eval", "st'),
        ("garbage", "\x00\x01\n<html>\n"),
        ("empty_metrics", ""),
    ]:
        (tmp / name).mkdir()
        (tmp / name / "metrics.jsonl").write_text(text)
    (tmp / "cfg_torn.json").write_text('{"train_data": ')
    (tmp / "cfg_list.json").write_text("[1, 2]")
    (tmp / "cfg_empty.json").write_text("{}")
    (tmp / "cfg_typo.json").write_text('{"trian_data": "data/x_train.uint16.npy"}')
    (tmp / "cfg_type.json").write_text('{"train_data": "data/x_train.uint16.npy", "vocab_size": "many"}')
    bad_name = {"train_data": "data/x.bin", "checkpoint_dir": str(tmp / "qs"), "vocab_size": 256}
    (tmp / "cfg_name.json").write_text(json.dumps(bad_name))
    return tmp


def test_the_campaign_is_big_enough():
    assert len({name for name, *_ in ATTACKS}) == len(ATTACKS) >= 30
    assert {prog for _, prog, *_ in ATTACKS} == set(MAINS)


@pytest.fixture
def one_thread():
    """Tiny models run on one thread; the count generate sets is put back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name, prog, argv, status, text", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack(name, prog, argv, status, text, run, props, one_thread):
    code, out, err = in_process(prog, [a.format(run=run, tmp=props) for a in argv])
    assert code == status, (code, err)
    if status == 2:
        one_line(err, prog, "error", text)
        assert out == "", out  # nothing half-written to stdout before the error
    elif text is not None:
        one_line(err, prog, "warning", text)
    else:  # a success of generate: the load line and the speed line
        assert "Traceback" not in err and len(err.splitlines()) == 2 and "generated 3 tokens" in err, err
        assert out.startswith("hi") and len(out) > 2, out


def test_unreadable_metrics_and_checkpoint(run, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    for name in ("metrics.jsonl", "checkpoint_1.pt"):
        (locked / name).write_bytes((run / name.replace("_1", "_2")).read_bytes())
        (locked / name).chmod(0)
    if IS_ROOT:  # root reads whatever the permissions say: refuse the files as the OS refuses anyone else
        real_open = builtins.open

        def refusing_open(file, *args, **kwargs):
            if str(file).startswith(str(locked)):
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)
        monkeypatch.setattr(io, "open", refusing_open)
    code, _, err = in_process("plot", [locked, "--out", tmp_path / "x.png"])
    assert code == 2
    one_line(err, "plot", "error", "metrics.jsonl: permission denied")
    code, _, err = in_process("generate", ["--checkpoint", locked, "--prompt", "hi"])
    assert code == 2
    one_line(err, "generate", "error", "checkpoint_1.pt")


# --- attacks that need a real process -------------------------------------------------------------
def generate_cmd(run: Path) -> list[str]:
    return [sys.executable, "-m", "cs336_nb.generate", "--checkpoint", str(run), "--prompt", "hi", "--device", "cpu"]


def test_closed_stdout_is_one_line(run):
    cmd = [*generate_cmd(run), "--threads", "1"]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=subprocess_env(),
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.close(1),
    )
    assert proc.returncode == 2, proc.stderr
    one_line(proc.stderr, "generate", "error", "stdout is closed")


def test_reader_that_stops_early_ends_quietly(run):
    # a pipe whose reader goes away after the first bytes (`generate ... | head -c 8`): no traceback
    cmd = [*generate_cmd(run), "--max-new-tokens", "100000", "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.read(8).startswith(b"hi")
        proc.stdout.close()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode in (0, 141), (proc.returncode, err)  # ends, as `head` expects; 141 = killed by SIGPIPE
    assert "Traceback" not in err and "Error" not in err, err


def test_ctrl_c_while_sampling_is_one_line_and_130(run):
    cmd = [*generate_cmd(run), "--max-new-tokens", "100000", "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.read(8).startswith(b"hi")  # sampling has started
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err and err.splitlines()[-1] == "generate: interrupted", err
    assert sum("interrupted" in line for line in err.splitlines()) == 1, err


def test_help_shows_every_flag_with_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit:
        generate_main(["--help"])
    help_text, err = capsys.readouterr()
    assert exit.value.code == 0 and err == "", err
    blocks = re.split(r"\n  (?=--)", help_text.split("options:")[1])[1:]  # one block per flag, help wrapped
    flags = [block.split()[0] for block in blocks]
    assert flags == [
        "--checkpoint", "--prompt", "--max-new-tokens", "--temperature", "--top-p", "--top-k",
        "--seed", "--num-samples", "--tokenizer", "--device", "--threads",
    ], flags  # fmt: skip
    for flag, block in zip(flags, blocks):
        words = " ".join(block.split()[2:])  # the help text, after the flag and its metavar
        assert len(words) > 15, block  # says what the flag does
        if flag not in ("--checkpoint", "--prompt"):  # required: nothing to default to
            assert "(default: " in words and "(default: None)" not in words, block
