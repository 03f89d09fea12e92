"""A hostile user against `python -m cs336_nb.train`: a table of attacks (odd files, bad devices, another
run's directory, two runs at once, a read-only or full disk, torn files, Ctrl-C, kill -9, divergence),
each checked for its exit status, exactly one stderr line naming the problem, and that nothing of the
run was lost; most are followed by a resume that must work.

Most attacks call `main` in this process (no interpreter start, no torch import: fast); the ones that need
a real process (kill -9, a second live run, W&B) start the command line with a timeout. The data are
random token arrays made with numpy; no tokenizer is needed.
"""

import hashlib
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, TINY_RUN, flags, write_tiny_tokens

import cs336_nb.train as train
from cs336_nb.checkpoint import save_checkpoint
from cs336_nb.model import TransformerLM
from cs336_nb.runtime import MALLOC_TUNABLES

MODEL = TINY_MODEL
RUN = {**TINY_RUN, "keep_last": 0, "seed": 7, "threads": 1}
TIMEOUT = 120  # seconds for any one subprocess


def base_args(work: Path, run_dir: Path, **over) -> list[str]:
    kw = dict(train_data=work / "train.npy", val_data=work / "val.npy", **MODEL, **RUN, max_iters=8)
    kw["checkpoint_dir"] = run_dir
    kw.update(over)
    return flags(**{k: v for k, v in kw.items() if v is not None})


def cli(argv: list[str]) -> tuple[int, str, str]:
    """`python -m cs336_nb.train argv`, run in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            train.main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def env(**extra) -> dict:
    return {
        **os.environ,
        "GLIBC_TUNABLES": MALLOC_TUNABLES,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        **extra,
    }


def spawn(argv: list[str], cwd: Path, **extra_env) -> subprocess.Popen:
    e = {k: v for k, v in env(**extra_env).items() if k != "WANDB_API_KEY"}
    return subprocess.Popen(
        [sys.executable, "-m", "cs336_nb.train", *argv],
        cwd=cwd,
        env=e,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def wait_for(proc: subprocess.Popen, prefix: str, timeout: float = TIMEOUT) -> list[str]:
    """Read the process's stdout until a line starts with `prefix`; the lines read."""
    seen, deadline = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return seen
        if time.time() > deadline:
            break
    proc.kill()
    raise AssertionError(f"no line {prefix!r} in time:\n{''.join(seen)[-2000:]}\n{proc.stderr.read()[-2000:]}")


def snapshot(d: Path) -> dict[str, str]:
    """Every file under `d` (the lock file aside) and a hash of its bytes."""
    if not d.exists():
        return {}
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def metrics(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


def train_losses(d: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(d) if r["type"] == "train"}


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]


def one_error_line(err: str, *words: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Token arrays, odd files, and one finished 8-step run (`base`) that attacks copy and resume."""
    d = tmp_path_factory.mktemp("faults")
    write_tiny_tokens(d)
    (d / "empty.npy").write_bytes(b"")
    np.save(d / "matrix.npy", np.zeros((40, 40), dtype=np.uint16))
    np.save(d / "floats.npy", np.random.default_rng(1).random(1000).astype(np.float32))
    np.arange(200, dtype=np.uint16).tofile(d / "no_sidecar.bin")
    np.arange(200, dtype=np.uint16).tofile(d / "bad_sidecar.bin")
    (d / "bad_sidecar.bin.json").write_text('{"dtype": "banana"}')
    np.arange(200, dtype=np.uint16).tofile(d / "torn_sidecar.bin")
    (d / "torn_sidecar.bin.json").write_text('{"dtype": "uint')
    (d / "a_file").write_text("not a directory")
    code, out, err = cli(base_args(d, d / "base"))
    assert code == 0, (out[-2000:], err[-2000:])
    return d


def copy_base(work: Path, tmp_path: Path, name: str = "run") -> Path:
    run = tmp_path / name
    shutil.copytree(work / "base", run)
    return run


# --- the table: attack -> (arguments, exit status, words of the one stderr line) ---------------------------------
# Each `prepare(work, run)` may set files up and returns the arguments; `run` is a copy of the base run (8 steps,
# checkpoints 4 and 8) unless the attack starts fresh. After the attack the run's files must be as they were.

BAD_DATA = {
    "missing dataset names prepare": (dict(train_data="data/tokenized/tiny_train.uint16.npy"), "cs336_nb.prepare"),
    "empty .npy": (dict(train_data="{work}/empty.npy"), "empty.npy"),
    "2-D array": (dict(val_data="{work}/matrix.npy"), "1-D"),
    "float tokens": (dict(train_data="{work}/floats.npy"), "integers"),
    "raw file, no sidecar": (dict(train_data="{work}/no_sidecar.bin"), "dtype"),
    "sidecar naming no dtype": (dict(train_data="{work}/bad_sidecar.bin"), "bad_sidecar.bin"),
    "torn sidecar": (dict(train_data="{work}/torn_sidecar.bin"), "torn_sidecar.bin"),
    "data is a directory": (dict(train_data="{work}"), "dataset not found"),
    "unknown device": (dict(device="tpu"), "tpu"),
    "absent CUDA": (dict(device="cuda:3"), "cuda"),
    "file as checkpoint dir": (dict(checkpoint_dir="{work}/a_file"), "a_file"),
    "file as parent of checkpoint dir": (dict(checkpoint_dir="{work}/a_file/run"), "a_file"),
    "zero threads": (dict(threads=0), "threads"),
    "empty checkpoint dir": (dict(checkpoint_dir=""), "checkpoint_dir is empty"),
    "a billion sequences a batch": (dict(batch_size=1_000_000_000), "--batch-size"),
    "a model 4 million wide": (dict(d_model=4194304), "GiB"),
    "a vocabulary of 10**12": (dict(vocab_size=10**12), "parameters"),
    "infinite eps": (dict(eps="inf"), "eps must be a finite number"),
    "Infinity rope_theta": (dict(rope_theta="Infinity"), "rope_theta must be a finite number"),
    "a duration that is not one": (dict(max_time="soon"), "not a duration"),
    "no time at all": (dict(max_time="0"), "max_time must be positive"),
    "tokens and max_iters both": (dict(tokens=1000), "not both"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_input(case, work, tmp_path):
    over, words = BAD_DATA[case]
    if case == "absent CUDA" and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    over = {k: v.format(work=work) if isinstance(v, str) else v for k, v in over.items()}
    before = snapshot(work)
    code, out, err = cli(base_args(work, tmp_path / "run", **over))
    assert code == 2, (out[-1500:], err)
    one_error_line(err, "error:", words)
    if case == "missing dataset names prepare":
        assert out == ""  # said before the configuration table
    assert snapshot(work) == before and not (tmp_path / "run").exists()  # nothing written anywhere


def _no_optimizer(work, run):
    model = TransformerLM(**MODEL)
    save_checkpoint(model, None, 4, run.parent / "weights_only.pt", config={**MODEL})
    return dict(resume=run.parent / "weights_only.pt", checkpoint_dir=run.parent / "fresh")


def _truncated(work, run):
    data = (run / "checkpoint_8.pt").read_bytes()
    (run.parent / "cut.pt").write_bytes(data[: len(data) // 2])
    return dict(resume=run.parent / "cut.pt", checkpoint_dir=run.parent / "fresh")


def _another_run(work, run):
    code, _, err = cli(base_args(work, run.parent / "other", max_iters=4))
    assert code == 0, err
    return dict(resume=run.parent / "other" / "checkpoint_4.pt", checkpoint_dir=run, max_iters=12)


def _fresh_over_run(work, run):
    return dict(checkpoint_dir=run)


def _metrics_is_a_dir(work, run):
    (run / "metrics.jsonl").rename(run / "metrics.jsonl.kept")
    (run / "metrics.jsonl").mkdir()
    return dict(resume="auto", max_iters=12)


def _interrupt_at_start(work, run, monkeypatch=None):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "load_dataset", ctrl_c)
    return dict(resume="auto", max_iters=12)


def _shape_change(work, run):
    return dict(resume="auto", d_model=64, max_iters=12)


RUN_ATTACKS = {  # attack: (prepare, exit status, words of the one line)
    "no optimizer state": (_no_optimizer, 2, "optimizer state"),
    "truncated checkpoint": (_truncated, 2, "cut.pt"),
    "resume into another run": (_another_run, 2, "holds another run"),
    "fresh run over a run": (_fresh_over_run, 2, "--resume auto"),
    "metrics.jsonl is a directory": (_metrics_is_a_dir, 2, "metrics.jsonl"),
    "Ctrl-C during start-up": (_interrupt_at_start, 130, "interrupted"),
    "shape change on resume": (_shape_change, 2, "d_model 32 -> 64"),
}


@pytest.mark.parametrize("case", list(RUN_ATTACKS))
def test_attack(case, work, tmp_path, monkeypatch):
    prepare, status, words = RUN_ATTACKS[case]
    run = copy_base(work, tmp_path)
    kwargs = {"monkeypatch": monkeypatch} if case == "Ctrl-C during start-up" else {}
    over = prepare(work, run, **kwargs)
    before = snapshot(run)
    code, out, err = cli(base_args(work, run, **over))
    assert code == status, (out[-1500:], err)
    one_error_line(err, words)
    assert snapshot(run) == before  # the run's files, byte for byte
    monkeypatch.undo()
    if case == "metrics.jsonl is a directory":
        (run / "metrics.jsonl").rmdir()
        (run / "metrics.jsonl.kept").rename(run / "metrics.jsonl")
    # and the run still resumes
    code, out, err = cli(base_args(work, run, resume="auto", max_iters=12))
    assert code == 0 and err == "", (out[-1500:], err)
    assert sorted(train_losses(run)) == list(range(12))


# --- attacks that leave the run going: exit 0, what was set aside said in one line --------------------------------


def test_rewind_sets_aside_and_deletes_nothing(work, tmp_path):
    run = copy_base(work, tmp_path)
    before = snapshot(run)
    code, out, err = cli(base_args(work, run, resume=run / "checkpoint_4.pt", max_iters=6))
    assert code == 0 and err == "", err
    said = [line for line in out.splitlines() if line.startswith("Rewound")]
    assert said == ["Rewound to iteration 4: set aside checkpoint_8.pt.superseded and 5 metrics line(s) "
                    "(in metrics.jsonl.superseded)"], out  # fmt: skip
    assert snapshot(run)["checkpoint_8.pt.superseded"] == before["checkpoint_8.pt"]
    assert snapshot(run)["checkpoint_4.pt"] == before["checkpoint_4.pt"]
    dropped = [json.loads(line) for line in (run / "metrics.jsonl.superseded").read_text().splitlines()]
    assert [(r["type"], r["step"]) for r in dropped] == [("train", s) for s in range(4, 8)] + [("eval", 8)]
    base = train_losses(work / "base")
    assert {s: v for s, v in train_losses(run).items()} == {s: base[s] for s in range(6)}  # steps 4, 5 again


def test_nothing_to_train_changes_nothing(work, tmp_path):
    run = copy_base(work, tmp_path)
    before, mtimes = snapshot(run), {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    code, out, err = cli(base_args(work, run, resume=run / "checkpoint_4.pt", max_iters=4))
    assert code == 0 and err == "" and "Nothing to train" in out, (out[-800:], err)
    assert snapshot(run) == before and {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == mtimes


def test_torn_metrics_line_and_orphans(work, tmp_path):
    """A kill during a metrics write and during a save: the next resume warns once, cleans up, goes on."""
    run = copy_base(work, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "step": 8, "lo')
    (run / ".checkpoint_12.pt.abcd.tmp").write_bytes(b"half a checkpoint")
    (run / "config.json").write_text('{"run_id": ')  # torn too: the owner is read from the checkpoint
    code, out, err = cli(base_args(work, run, resume="auto", max_iters=12))
    assert code == 0, (out[-1500:], err)
    one_error_line(err, "warning", "torn last line")
    assert any(line.startswith("Removed 1 unfinished checkpoint file") for line in out.splitlines()), out
    assert not list(run.glob(".checkpoint_*.tmp"))
    base = train_losses(work / "base")
    assert {s: v for s, v in train_losses(run).items() if s < 8} == base  # nothing of the first 8 steps lost


def test_stale_lock_is_taken_over(work, tmp_path):
    run = copy_base(work, tmp_path)
    record = {"owner": "train", "pid": 999999, "host": "gone", "started": "then", "command": "train"}
    (run / ".lock").write_text(json.dumps(record) + "\n")  # written, never released, nobody holds the flock
    code, out, err = cli(base_args(work, run, resume="auto", max_iters=10))
    assert code == 0 and err == "", err
    assert any("took over the lock" in line and "999999" in line for line in out.splitlines()), out


def test_schedule_kept_when_max_iters_grows(work, tmp_path):
    run = copy_base(work, tmp_path)
    code, out, err = cli(base_args(work, run, resume="auto", max_iters=12))
    assert code == 0 and err == "", err
    assert "Schedule: max_iters 8 -> 12; the cosine keeps the run's cycle of 8 steps" in out
    lrs = {r["step"]: r["lr"] for r in metrics(run) if r["type"] == "train"}
    assert all(lrs[s] == pytest.approx(RUN["min_lr"], rel=1e-12) for s in range(8, 12))  # the floor, as planned
    assert json.loads((run / "config.json").read_text())["cosine_cycle_iters"] == 8


# --- the file system fails under the run ---------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs mounted at tmp_path/fs (root only), unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _remount(mnt: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mnt)], check=True, capture_output=True, timeout=30)


def test_disk_full_mid_save(work, tmpfs):
    """600 KB hold the first checkpoint (~330 KB) but not the second: the save fails half way."""
    run = tmpfs / "run"
    code, out, err = cli(base_args(work, run))
    assert code == 2, (out[-1500:], err)
    one_error_line(err, "error:", "checkpoint_8.pt: no space left on device", "free some space")
    assert sorted(p.name for p in run.glob("*checkpoint*")) == ["checkpoint_4.pt"]  # no half file left
    assert torch.equal(
        weights(run / "checkpoint_4.pt")["lm_head.weight"], weights(work / "base" / "checkpoint_4.pt")["lm_head.weight"]
    )
    _remount(tmpfs, "size=4m")  # space again: the run resumes and ends exactly as the uninterrupted one
    code, out, err = cli(base_args(work, run, resume="auto"))
    assert code == 0 and err == "", err
    assert train_losses(run) == train_losses(work / "base")


def test_read_only_directory(work, tmpfs):
    _remount(tmpfs, "size=4m")
    run = tmpfs / "run"
    shutil.copytree(work / "base", run)
    before = snapshot(run)
    _remount(tmpfs, "ro")
    code, out, err = cli(base_args(work, run, resume="auto", max_iters=12))
    assert code == 2, (out[-1500:], err)
    one_error_line(err, "error:", "read-only")
    assert snapshot(run) == before
    _remount(tmpfs, "rw")
    code, out, err = cli(base_args(work, run, resume="auto", max_iters=12))
    assert code == 0 and err == "", err


# --- real processes -------------------------------------------------------------------------------------------------


def test_two_runs_on_one_directory(work, tmp_path):
    """A second run on a directory a live run is writing is refused; the first goes on, stops cleanly, resumes."""
    run = tmp_path / "run"
    long = dict(max_iters=100_000, checkpoint_interval=100_000, eval_interval=100_000, warmup_iters=2)
    first = spawn(base_args(work, run, **long), work)
    try:
        wait_for(first, "iter      2 ")
        config = (run / "config.json").read_text()
        code, out, err = cli(base_args(work, run, **long, resume="auto"))
        assert code == 2, (out[-1500:], err)
        one_error_line(err, "is in use by", f"pid {first.pid}")
        assert (run / "config.json").read_text() == config and not list(run.glob("*.superseded"))
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=TIMEOUT)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 128 + signal.SIGTERM
    code, out, err = cli(base_args(work, run, **{**long, "max_iters": max(train_losses(run)) + 4}, resume="auto"))
    assert code == 0 and err == "", err


def test_kill_9_repeatedly_then_resume_equals_uninterrupted(work, tmp_path):
    """Kill -9 at random moments (some mid-save: a checkpoint every 2 steps), `--resume auto` after each;
    every checkpoint left is loadable, and the finished run equals the uninterrupted one bit for bit."""
    kw = dict(max_iters=40, checkpoint_interval=2, eval_interval=10, batch_size=16, keep_last=2)
    reference = tmp_path / "reference"
    code, _, err = cli(base_args(work, reference, **kw))
    assert code == 0, err
    run, rng, kills = tmp_path / "run", random.Random(1), 0
    args = base_args(work, run, **kw, resume="auto")
    for _ in range(3):
        proc = spawn(args, work)
        try:
            lines = wait_for(proc, "iter ")
            target = rng.randrange(2, 30)
            for line in proc.stdout:  # wait until around step `target`, then a random moment more
                lines.append(line)
                if line.startswith("iter ") and int(line.split()[1]) >= target:
                    break
            time.sleep(rng.uniform(0, 0.05))
            proc.kill()
            kills += proc.wait(timeout=TIMEOUT) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
        for p in run.glob("checkpoint_*.pt"):
            assert weights(p), p  # loadable: no torn checkpoint, ever
    assert kills >= 2
    proc = spawn(args, work)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, (out[-1500:], err)
    assert train_losses(run) == train_losses(reference)
    for k, v in weights(reference / "checkpoint_40.pt").items():
        assert torch.equal(v, weights(run / "checkpoint_40.pt")[k]), k
    assert not list(run.glob(".checkpoint_*.tmp"))


def test_divergence_names_a_checkpoint_that_trains(work, tmp_path):
    run = tmp_path / "run"
    kw = dict(max_lr=1e4, min_lr=1e4, grad_clip=0, checkpoint_interval=1, eval_interval=1000, max_iters=30)
    code, out, err = cli(base_args(work, run, **kw))
    assert code == 2, (out[-1500:], err)
    line = one_error_line(err, "error:", "stopping without saving; the last good checkpoint is")
    named = Path(line.split("the last good checkpoint is ")[1].split(" (")[0])
    assert named.is_file() and named == max(run.glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    state = weights(named)
    assert all(torch.isfinite(v).all() for v in state.values())
    # resumed with a sane learning rate, it trains: finite losses to the end
    start = int(named.stem.split("_")[1])
    sane = dict(max_lr=1e-3, min_lr=1e-4, grad_clip=1.0, max_iters=start + 6)
    code, out, err = cli(base_args(work, run, **{**kw, **sane}, resume=named))
    assert code == 0 and err == "", (out[-1500:], err)
    after = {s: v for s, v in train_losses(run).items() if s >= start}
    assert sorted(after) == list(range(start, start + 6)) and all(math.isfinite(v) for v in after.values())


def test_wandb_cannot_start(work, tmp_path):
    """W&B online without a login: one line, the fix said once, no empty wandb/ folder, the run untouched."""
    home = tmp_path / "home"
    home.mkdir()
    run = tmp_path / "run"
    proc = spawn(
        [*base_args(work, run), "--wandb"], work, WANDB_MODE="online", HOME=str(home), WANDB_CONFIG_DIR=str(home)
    )
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 2, (out[-1500:], err)
    line = one_error_line(err, "W&B could not start")
    assert line.count("wandb login") <= 1 and "WANDB_MODE=offline" in line
    assert [p.name for p in run.iterdir()] == [".lock"]  # no empty wandb/, no config or metrics of a run that never ran


def test_malloc_tuning_relaunch(work, tmp_path):
    """Run from a shell, the CLI re-executes itself with the malloc tuning; CS336_MALLOC_TUNING=0 opts out."""
    outs = {}
    for opt in ("1", "0"):
        e = {k: v for k, v in env(CS336_MALLOC_TUNING=opt).items() if k != "GLIBC_TUNABLES"}
        done = subprocess.run(
            [sys.executable, "-m", "cs336_nb.train", *base_args(work, tmp_path / opt, max_iters=2)],
            cwd=work, env=e, capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        outs[opt] = [line for line in done.stdout.splitlines() if line.startswith("Device:")][0]
    assert outs["1"].endswith("| malloc tuned") and outs["0"].endswith("| malloc default"), outs


def test_bfloat16_on_a_cpu_without_it_warns_once(work, tmp_path):
    """`--dtype bfloat16` trains on the CPU; where it is slower than float32 the run says so in one line."""
    from cs336_nb.runtime import bf16_autocast_is_slower

    code, out, err = cli(base_args(work, tmp_path / "run", dtype="bfloat16", max_iters=3, warmup_iters=1))
    assert code == 0, (out[-1500:], err)
    if bf16_autocast_is_slower("cpu"):
        one_error_line(err, "warning", "bfloat16", "--dtype float32")
    else:
        assert err == ""
    assert all(math.isfinite(v) for v in train_losses(tmp_path / "run").values())


def test_checkpoints_from_before_run_ids(work, tmp_path):
    """A run whose checkpoints and config.json carry no run id (older versions): resumes, and rewinds, in place."""
    run = copy_base(work, tmp_path)
    for p in run.glob("checkpoint_*.pt"):
        ckpt = torch.load(p, weights_only=True)
        del ckpt["run_id"], ckpt["config"]["run_id"]
        torch.save(ckpt, p)
    config = json.loads((run / "config.json").read_text())
    del config["run_id"]
    (run / "config.json").write_text(json.dumps(config))
    code, out, err = cli(base_args(work, run, resume="auto", max_iters=10))
    assert code == 0 and err == "", err
    adopted = json.loads((run / "config.json").read_text())["run_id"]
    code, out, err = cli(base_args(work, run, resume=run / "checkpoint_4.pt", max_iters=6))  # a legacy checkpoint
    assert code == 0 and err == "" and "Rewound to iteration 4" in out, (out[-1500:], err)
    assert json.loads((run / "config.json").read_text())["run_id"] == adopted
    assert torch.load(run / "checkpoint_6.pt", weights_only=True)["run_id"] == adopted


def test_torchrun_run_refused_by_rank_0_ends_every_rank_in_one_line(work, tmp_path):
    """Under torchrun, when rank 0 cannot claim the directory (here: in use), rank 1 must not wait for it in a
    collective until the connection breaks: each rank says one line, and nothing is written."""
    from cs336_nb.runtime import DirectoryLock

    run = tmp_path / "run"
    with DirectoryLock(run, owner="another train"):
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cs336_nb.train",
             *base_args(work, run, grad_accum_steps=2)],
            cwd=work, env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    ours = [line for line in err.splitlines() if "train: " in line]
    assert sorted(ours) == sorted(
        ["[rank 1] train: error: rank 0 stopped the run (its own error line says why)"]
        + [line for line in ours if line.startswith("train: error: ") and "is in use by another train" in line]
    ), err[-3000:]
    assert len(ours) == 2 and "Connection reset" not in err and "RuntimeError" not in err, err[-3000:]
    assert [p.name for p in run.iterdir()] == [".lock"]
