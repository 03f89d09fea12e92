"""The sweep command end to end: grid and names, a kill -9 and its rerun, a failing point, the summary's numbers."""

import csv
import fcntl
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_MODEL, TINY_RUN, assert_one_line_error, run_module, write_tiny_tokens

STEPS = 240  # long enough to kill a run between its checkpoints, short enough for a test


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Random tokens of the tiny model's vocabulary and a base config naming them."""
    folder = tmp_path_factory.mktemp("sweep")
    write_tiny_tokens(folder)
    base = dict(train_data=str(folder / "train.npy"), val_data=str(folder / "val.npy"), **TINY_MODEL, **TINY_RUN)
    base.update(max_iters=STEPS, eval_interval=40, checkpoint_interval=40, keep_last=0, threads=1)
    (folder / "base.json").write_text(json.dumps(base))
    return folder


def sweep_args(world: Path, out: Path, *grid: str) -> list:
    return ["--config", world / "base.json", "--grid", *(grid or ("max_lr=1e-3,3e-3",)), "--out", out]


@pytest.fixture(scope="module")
def uninterrupted(world) -> Path:
    """A two-point sweep that ran start to end without a stop."""
    out = world / "uninterrupted"
    proc = run_module("sweep", *sweep_args(world, out), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def tree_bytes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[tuple]:
    """(type, step, loss or val_loss) of every record: what must not depend on a stop and a resume."""
    return [(r["type"], r["step"], r.get("loss", r.get("val_loss"))) for r in metrics(run_dir)]


def wait_unlocked(run_dir: Path, timeout: float = 30) -> None:
    """Wait until no process holds the run directory's lock (a run killed with its sweep has exited)."""
    deadline = time.monotonic() + timeout
    with open(run_dir / ".lock", "a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, f"{run_dir} is still locked"
                time.sleep(0.05)


def test_grid_expansion_and_names(world):
    out = world / "dry"
    proc = run_module(
        "sweep",
        *sweep_args(world, out, "max_lr=1e-4,3e-4,1e-3", "batch-size=32,64", "remove_rope=true"),
        "--set",
        "min_lr=0",
        "--dry-run",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    names = [line.split(": ", 1)[0].split("] ", 1)[1] for line in proc.stdout.splitlines()]
    expected = [
        f"max_lr={lr},batch_size={b},remove_rope=true" for lr in ("0.0001", "0.0003", "0.001") for b in (32, 64)
    ]
    assert names == expected
    assert "--max-lr 0.0003 --batch-size 64 --remove-rope --checkpoint-dir" in proc.stdout.splitlines()[3]
    assert not out.exists()  # a dry run writes nothing
    # an unknown key and a bad value: one line, exit 2, nothing written
    bad = run_module("sweep", *sweep_args(world, out, "max_lrr=1e-3"), timeout=120)
    assert_one_line_error(bad, "unknown key 'max_lrr' in the grid (did you mean 'max_lr'?)", prog="sweep")
    bad = run_module("sweep", *sweep_args(world, out, "remove_rope=maybe"), timeout=120)
    assert_one_line_error(
        bad, "remove_rope='maybe' is not a valid value: remove_rope takes true or false", prog="sweep"
    )
    bad = run_module("sweep", *sweep_args(world, out, "max_lr=1e-5"), timeout=120)  # below min_lr: the train check
    assert_one_line_error(bad, "point max_lr=1e-05: min_lr must be in [0, max_lr=1e-05]", prog="sweep")
    assert not out.exists()


def test_kill_9_then_rerun_equals_uninterrupted(world, uninterrupted):
    out = world / "killed"
    first, second = out / "max_lr=0.001", out / "max_lr=0.003"
    sweep = subprocess.Popen(
        [sys.executable, "-m", "cs336_nb.sweep", *map(str, sweep_args(world, out))],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not (second / "checkpoint_40.pt").exists():  # the second point is under way
            assert sweep.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "the second point never saved a checkpoint"
            time.sleep(0.01)
        sweep.send_signal(signal.SIGKILL)
        sweep.wait(timeout=30)
    finally:
        sweep.kill()
    wait_unlocked(second)  # its run died with it
    newest = max(int(p.stem.split("_")[1]) for p in second.glob("checkpoint_*.pt"))
    assert newest < STEPS and not (second / "result.json").exists(), "the kill did not land mid-point"
    finished = tree_bytes(first)

    rerun = run_module("sweep", *sweep_args(world, out), timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "took over the lock" in rerun.stdout and "2 points, 1 ended, 1 to run" in rerun.stdout, rerun.stdout
    assert tree_bytes(first) == finished  # the finished point: untouched, byte for byte
    assert "Resumed from" in (second / "train.log").read_text()
    for name in ("max_lr=0.001", "max_lr=0.003"):  # every point as if never stopped
        assert losses(out / name) == losses(uninterrupted / name), name
        ours = torch.load(out / name / f"checkpoint_{STEPS}.pt", weights_only=False)["model_state_dict"]
        theirs = torch.load(uninterrupted / name / f"checkpoint_{STEPS}.pt", weights_only=False)["model_state_dict"]
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
        assert json.loads((out / name / "result.json").read_text())["status"] == "done"


def test_ctrl_c_saves_and_the_rerun_resumes(world, uninterrupted):
    out = world / "ctrl_c"
    first = out / "max_lr=0.001"
    sweep = subprocess.Popen(
        [sys.executable, "-m", "cs336_nb.sweep", *map(str, sweep_args(world, out))],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (first / "checkpoint_40.pt").exists():
            assert sweep.poll() is None and time.monotonic() < deadline, "the first point never saved a checkpoint"
            time.sleep(0.01)
        sweep.send_signal(signal.SIGINT)  # what Ctrl-C sends the sweep (its runs are in their own session)
        stdout, stderr = sweep.communicate(timeout=120)
    finally:
        sweep.kill()
    assert sweep.returncode == 130 and stderr == "sweep: interrupted\n", (sweep.returncode, stderr)
    assert "[1/2] stopped max_lr=0.001: saved; rerun the sweep to resume it" in stdout, stdout
    assert "Stopped by SIGINT" in (first / "train.log").read_text()
    assert not (first / "result.json").exists() and not (out / "max_lr=0.003").exists()
    rerun = run_module("sweep", *sweep_args(world, out), timeout=300)
    assert rerun.returncode == 0 and "2 points, 0 ended, 2 to run" in rerun.stdout, rerun.stdout + rerun.stderr
    for name in ("max_lr=0.001", "max_lr=0.003"):
        assert losses(out / name) == losses(uninterrupted / name), name


def test_failing_point_is_recorded_and_the_rest_run(world):
    # a token file that exists (the up-front check passes) but is not a .npy: its run fails when it loads it
    (world / "broken.npy").write_bytes(b"not an array")
    recipe = world / "failing.json"  # a recipe: the base, settings, and a list of two grids
    grid = [{"train_data": ["broken.npy", "train.npy"]}, {"max_lr": [1e6]}]
    recipe.write_text(json.dumps({"base": "base.json", "settings": {"max_iters": 8, "grad_clip": 0}, "grid": grid}))
    out = world / "failing"
    proc = run_module("sweep", "--recipe", recipe, "--out", out, cwd=world, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a point failed
    results = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/result.json")}
    statuses = {name: r["status"] for name, r in results.items()}
    assert statuses == {
        "train_data=broken.npy": "failed",
        "train_data=train.npy": "done",
        "max_lr=1000000.0": "diverged",
    }
    assert "broken.npy" in results["train_data=broken.npy"]["reason"]
    assert "loss is nan" in results["max_lr=1000000.0"]["reason"]
    assert "[1/3] failed train_data=broken.npy" in proc.stdout  # said when it ends, not at the end
    assert proc.stdout.index("[1/3] failed") < proc.stdout.index("[2/3] start")
    assert "1 of 3 points did not end: train_data=broken.npy" in proc.stdout
    rows = {row["point"]: row for row in csv.DictReader((out / "summary.csv").open())}
    assert (
        rows["train_data=broken.npy"]["status"] == "failed" and "broken.npy" in rows["train_data=broken.npy"]["reason"]
    )
    assert rows["max_lr=1000000.0"]["diverged"] == "True"
    assert rows["train_data=train.npy"]["steps"] == "8" and rows["train_data=train.npy"]["diverged"] == "False"
    # a rerun retries the failed point only
    again = run_module("sweep", "--recipe", recipe, "--out", out, cwd=world, timeout=300)
    assert "3 points, 2 ended, 1 to run" in again.stdout, again.stdout


def test_jobs_run_points_at_once(world):
    out = world / "jobs"
    proc = run_module("sweep", *sweep_args(world, out), "--set", "max_iters=8", "--jobs", "2", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].endswith("2 points, 0 ended, 2 to run, 2 at a time"), lines
    assert [line.split("] ")[1].split()[0] for line in lines[1:3]] == ["start", "start"]  # both before either ends
    for name in ("max_lr=0.001", "max_lr=0.003"):
        assert json.loads((out / name / "result.json").read_text())["status"] == "done"
        assert losses(out / name)[-1][:2] == ("eval", 8)
        assert "Nothing to train" not in (out / name / "train.log").read_text()


def test_summary_equals_each_runs_metrics(uninterrupted):
    rows = list(csv.DictReader((uninterrupted / "summary.csv").open()))
    assert [row["point"] for row in rows] == ["max_lr=0.001", "max_lr=0.003"]
    for row in rows:
        records = metrics(uninterrupted / row["point"])
        evals = [r["val_loss"] for r in records if r["type"] == "eval"]
        last = records[-1]  # the final evaluation, after the last step
        assert last["type"] == "eval" and last["step"] == STEPS
        assert float(row["final_val_loss"]) == evals[-1]
        assert float(row["best_val_loss"]) == min(evals)
        assert (
            int(row["steps"]) == STEPS
            and int(row["tokens"]) == STEPS * TINY_RUN["batch_size"] * TINY_MODEL["context_length"]
        )
        assert float(row["wall_time_s"]) == max(r["time_s"] for r in records)
        assert math.isclose(float(row["tokens_per_s"]), int(row["tokens"]) / float(row["wall_time_s"]), rel_tol=1e-12)
        assert row["diverged"] == "False" and row["status"] == "done"
    table = (uninterrupted / "summary.md").read_text()
    assert f"| max_lr=0.001 | done | {float(rows[0]['final_val_loss']):.4f} |" in table
    assert (uninterrupted / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # on demand: the same numbers again
    before = (uninterrupted / "summary.csv").read_text()
    (uninterrupted / "summary.csv").unlink()
    again = run_module("sweep", "--out", uninterrupted, "--summary-only", timeout=120)
    assert again.returncode == 0, again.stderr
    assert (uninterrupted / "summary.csv").read_text() == before


RECIPES = {  # recipe: (points, the grid's keys)
    "lr_sweep": (7, {"max_lr"}),
    "batch_size": (6 + 15, {"batch_size", "max_lr"}),
    "ablation_no_rmsnorm": (3, {"remove_rmsnorm", "max_lr"}),
    "ablation_post_norm": (2, {"use_post_norm"}),
    "ablation_nope": (2, {"remove_rope"}),
    "ablation_silu": (2, {"ffn_type", "d_ff"}),
    "owt_main": (1, set()),
    "leaderboard": (1, set()),
    "cpu_lr_sweep": (3, {"max_lr"}),
}


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_are_valid_sweeps(name):
    from cs336_nb.sweep import Sweep, point_name, read_recipe

    recipe = read_recipe(ROOT / "configs" / "cs336" / f"{name}.json")
    sweep = Sweep(Path("runs") / name, **recipe)
    points, keys = RECIPES[name]
    assert len(sweep.points) == points and {k for p in sweep.points for k in p} == keys
    assert recipe["description"]
    for point in sweep.points:
        cfg = sweep.run_config(point, check_files=False)  # the data is the user's to prepare
        if name != "leaderboard":  # the handout's 17M model
            shape = (cfg.context_length, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.rope_theta)
            assert shape == (256, 512, 4, 16, 10000.0) and cfg.d_ff == (2048 if cfg.ffn_type == "silu" else 1344)
            assert cfg.tokens == (40_000_000 if name == "cpu_lr_sweep" else 327_680_000)
            assert cfg.max_iters == -(-cfg.tokens // (cfg.batch_size * cfg.context_length))  # --tokens sets the steps
            assert cfg.vocab_size == (32_000 if name == "owt_main" else 10_000)
        else:
            assert (cfg.context_length, cfg.max_time, cfg.device) == (512, 5400.0, "cuda")
        assert cfg.checkpoint_dir == str(Path("runs") / name / point_name(point))
    if name == "ablation_no_rmsnorm":  # the baseline, then no RMSNorm at its rate and a lower one
        assert [p.get("max_lr") for p in sweep.points] == [None, 0.002, 0.0005]
