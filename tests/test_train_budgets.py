"""`python -m cs336_nb.train` with a budget (`--tokens`, `--max-time`), with the underscore spelling of its flags
(as W&B sweep agents pass them), and against two process-level faults: a torchrun rank whose peers never come,
the file-size limit (SIGHUP is tested beside SIGTERM in test_train_cli.py). The budgets are checked against the run's own records (metrics.jsonl, checkpoints,
config.json) and the schedule against the optimiser chapter's `lr_cosine_schedule`.
"""

import json
import math
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, TINY_RUN, assert_one_line_error, flags, run_module, write_tiny_tokens

from cs336_nb.optim import lr_cosine_schedule

RUN = {**TINY_RUN, "threads": 1, "keep_last": 0}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("budgets")
    write_tiny_tokens(d)
    return d


def args(work: Path, run_dir: Path, **over) -> list[str]:
    settings = dict(train_data=work / "train.npy", val_data=work / "val.npy", **TINY_MODEL, **RUN)
    return flags(**{**settings, "checkpoint_dir": run_dir, **over})


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in run_dir.glob("checkpoint_*.pt"))


def test_tokens_sets_the_steps_and_the_schedule(work, tmp_path):
    # 4 sequences x 16 tokens x 2 micro-batches = 128 tokens a step: 1,000 tokens take ceil(7.8) = 8 steps
    run = tmp_path / "tokens"
    done = run_module("train", *args(work, run, tokens=1000, grad_accum_steps=2, warmup_iters=2), cwd=work)
    assert done.returncode == 0, done.stderr[-2000:]
    train = [r for r in records(run) if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(8)) and checkpoints(run) == [4, 8]
    assert [r["step"] for r in records(run) if r["type"] == "eval"] == [4, 8]
    config = json.loads((run / "config.json").read_text())
    assert (config["tokens"], config["max_iters"]) == (1000, 8)
    for r in train:  # the cosine ends at the budget's last step
        assert r["lr"] == pytest.approx(lr_cosine_schedule(r["step"], 3e-3, 3e-4, 2, 8), rel=1e-12, abs=1e-15)


def test_underscore_flags_train_the_same_run(work, tmp_path):
    dashed = args(work, tmp_path / "dashed", max_iters=4)
    underscored = [
        a.replace("-", "_") if a.startswith("--") else a for a in args(work, tmp_path / "under", max_iters=4)
    ]
    underscored = ["--" + a[2:] if a.startswith("__") else a for a in underscored]
    assert "--max_lr" in underscored and "--checkpoint_dir" in underscored
    for argv in (dashed, underscored):
        done = run_module("train", *argv, cwd=work)
        assert done.returncode == 0, done.stderr[-2000:]
    a, b = (json.loads((tmp_path / n / "config.json").read_text()) for n in ("dashed", "under"))
    differ = {k for k in a if a[k] != b[k]}
    assert differ == {"checkpoint_dir", "run_id"}, differ
    losses = [[r["loss"] for r in records(tmp_path / n) if r["type"] == "train"] for n in ("dashed", "under")]
    assert losses[0] == losses[1]  # the same run, bit for bit


def test_max_time_fits_the_cosine_and_ends_with_eval_and_checkpoint(work, tmp_path):
    run = tmp_path / "timed"
    over = dict(max_time="6s", max_iters=100_000, warmup_iters=2, eval_interval=50, checkpoint_interval=100_000)
    done = run_module("train", *args(work, run, **over, log_interval=5), cwd=work, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    fitted = [line for line in done.stdout.splitlines() if line.startswith("Time budget: 6 s at ")]
    assert len(fitted) == 1, done.stdout[-2000:]
    end = int(fitted[0].rsplit("iteration ", 1)[1].replace(",", ""))
    rows = records(run)
    last = max(r["step"] for r in rows if r["type"] == "train") + 1
    assert last <= end and checkpoints(run) == [last]  # ended at the fitted step, or earlier on time
    assert [r for r in rows if r["type"] == "eval"][-1]["step"] == last  # a final evaluation
    assert rows[-1]["time_s"] < 6 + 5  # the budget, give or take one evaluation on a busy machine
    if last < end:  # stopped by the clock: the budget was spent
        assert rows[-1]["time_s"] >= 6 and f"Time budget of 6 s spent at iteration {last}" in done.stdout
    ckpt = torch.load(run / f"checkpoint_{last}.pt", weights_only=True)
    assert ckpt["config"]["max_iters"] == ckpt["config"]["cosine_cycle_iters"] == end  # a resume keeps the fit
    for r in rows:
        if r["type"] == "train" and r["step"] > 11:  # after the fit: the cosine that ends at `end`
            assert r["lr"] == pytest.approx(lr_cosine_schedule(r["step"], 3e-3, 3e-4, 2, end), rel=1e-12)


def test_max_time_stops_on_the_clock(work, tmp_path):
    # a schedule of its own (--cosine-cycle-iters): only the clock stops it, long before max_iters
    run = tmp_path / "clock"
    over = dict(max_time="2", max_iters=1_000_000, cosine_cycle_iters=1_000_000, eval_interval=10**6)
    done = run_module("train", *args(work, run, **over, checkpoint_interval=10**6, log_interval=50), cwd=work)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = records(run)
    last = max(r["step"] for r in rows if r["type"] == "train") + 1
    assert f"Time budget of 2 s spent at iteration {last}" in done.stdout
    assert checkpoints(run) == [last] and rows[-1] == {**rows[-1], "type": "eval", "step": last}
    assert 2 <= rows[-1]["time_s"] < 2 + 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_whose_peers_never_come_ends_in_one_line(work, tmp_path):
    env = dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    started = time.monotonic()
    done = run_module(
        "train",
        *args(work, tmp_path / "alone", grad_accum_steps=2, max_iters=4),
        cwd=work,
        env={**env, "CS336_RENDEZVOUS_TIMEOUT": "3"},
        timeout=120,
    )
    assert_one_line_error(done, "rank 0 waited 3 s at 127.0.0.1:", prog="train")
    assert "CS336_RENDEZVOUS_TIMEOUT" in done.stderr and time.monotonic() - started < 90


def test_the_file_size_limit_is_one_line_and_leaves_no_torn_checkpoint(work, tmp_path):
    run = tmp_path / "limited"

    def limit():  # 64 KB: config.json and metrics.jsonl fit, a checkpoint (about 400 KB) does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    command = [sys.executable, "-m", "cs336_nb.train", *args(work, run, max_iters=8)]
    env = {**os.environ, "CS336_MALLOC_TUNING": "0"}
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert_one_line_error(done, "file-size limit", prog="train")
    assert "checkpoint_4.pt" in done.stderr
    assert checkpoints(run) == [] and not list(run.glob(".checkpoint_*"))  # nothing torn left behind
    again = run_module("train", *args(work, run, max_iters=8), cwd=work)  # without the limit the run trains
    assert again.returncode == 0 and checkpoints(run) == [4, 8], again.stderr[-2000:]
    assert not math.isnan(records(run)[-1]["val_loss"])
