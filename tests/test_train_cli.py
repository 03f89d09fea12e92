"""End-to-end checks of `python -m cs336_nb.train` in subprocesses: the three command forms of the
original README (config file; flags only; config + --resume), the output format, checkpoint contents,
bit-exact resume, --resume auto, keep-last pruning, W&B offline metrics, SIGTERM, the NaN stop, and
every kind of bad input (one line on stderr, exit status 2, no traceback).

The data and the model are tiny and made here: random uint16 tokens, vocab 64, d_model 32, 2 layers.
A few CLI runs are shared by many tests (module-scoped fixtures) to keep the file fast.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, TINY_RUN, flags, run_module, write_tiny_tokens

from cs336_nb.model import TransformerLM
from cs336_nb.runtime import MALLOC_TUNABLES
from cs336_nb.train import main

MODEL = TINY_MODEL
RUN = {**TINY_RUN, "cosine_cycle_iters": 8, "seed": 3}


def train_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the training CLI in a subprocess from `cwd` (conftest's runner: offline, one thread); the malloc tuning
    is set here, so the CLI need not re-exec itself (tests/test_faults_train.py checks that it does)."""
    tunables = os.environ.get("GLIBC_TUNABLES", MALLOC_TUNABLES)
    return run_module(
        "train", *args, cwd=cwd, timeout=timeout, env={"GLIBC_TUNABLES": tunables, "PYTHONUNBUFFERED": "1"}
    )


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if r["type"] == "train"}


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_ok(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Token files and a JSON config for the tiny runs."""
    d = tmp_path_factory.mktemp("train_cli")
    write_tiny_tokens(d)
    config = {
        **MODEL,
        **RUN,
        "train_data": str(d / "train.npy"),
        "val_data": str(d / "val.npy"),
        "max_iters": 8,
        "keep_last": 0,
        "checkpoint_dir": str(d / "full"),
    }
    (d / "config.json").write_text(json.dumps(config, indent=1))
    return d


@pytest.fixture(scope="module")
def full(work) -> subprocess.CompletedProcess:
    """Form 1, a config file: 8 steps, checkpoints at 4 and 8, all kept."""
    proc = train_cli(["--config", str(work / "config.json")], cwd=work)
    assert_ok(proc)
    return proc


@pytest.fixture(scope="module")
def halves(work, full) -> dict:
    """Form 2, flags only, for 4 steps (with W&B); then form 3, config + --resume auto, to 8 steps.
    Same settings as `full`, so the two must agree bit for bit."""
    out = work / "halves"
    first = train_cli(
        flags(
            train_data=work / "train.npy",
            val_data=work / "val.npy",
            **MODEL,
            **RUN,
            max_iters=4,
            keep_last=1,
            checkpoint_dir=out,
            wandb=True,
            wandb_run_name="tiny",
            wandb_tags="a,b",
        ),
        cwd=work,
    )
    assert_ok(first)
    after_first = sorted(p.name for p in out.glob("checkpoint_*.pt"))
    first_metrics = metrics(out)
    second = train_cli(
        [
            "--config",
            str(work / "config.json"),
            "--checkpoint-dir",
            str(out),
            "--keep-last",
            "1",
            "--wandb",
            "--resume",
            "auto",
        ],
        cwd=work,
    )
    assert_ok(second)
    return dict(dir=out, first=first, second=second, after_first=after_first, first_metrics=first_metrics)


# --- output format --------------------------------------------------------------------------------


def test_output_format(full, work):
    lines = full.stdout.splitlines()
    rules = [i for i, line in enumerate(lines) if re.fullmatch(r"=+", line)]
    assert lines[rules[0] + 1] == "Training Configuration" and len(rules) >= 3
    table = lines[rules[1] + 1 : rules[2]]
    keys = [line.split(" : ")[0].strip() for line in table]
    assert keys == sorted(keys) and {"batch_size", "d_model", "max_lr", "wandb_project"} <= set(keys)
    assert dict((k, line.split(" : ", 1)[1]) for k, line in zip(keys, table))["d_model"] == "32"
    assert "Loading datasets..." in lines
    assert "Train size: 20,000 tokens | Val size: 4,000 tokens" in lines
    n_params = sum(v.numel() for v in load(work / "full" / "checkpoint_8.pt")["model_state_dict"].values())
    assert f"Model parameters: {n_params:,}" in lines
    iters = [line for line in lines if line.startswith("iter ")]
    assert len(iters) == 8
    pattern = r"iter +(\d+) \| loss \d+\.\d{4} \| lr \d\.\d{2}e[+-]\d{2} \| \d+\.\d{2}ms \| [\d,]+ tok/s"
    assert all(re.fullmatch(pattern, line) for line in iters), iters
    assert iters[0].startswith("iter      0 | loss ") and "| lr 0.00e+00 |" in iters[0]
    evals = [line for line in lines if line.startswith("[EVAL]")]
    assert [
        re.fullmatch(r"\[EVAL\] iter +(\d+) \| val_loss \d+\.\d{4} \| val_ppl \d+\.\d{2}", e).group(1) for e in evals
    ] == ["4", "8"]
    saved = [line for line in lines if line.startswith("[CHECKPOINT]")]
    assert saved == [f"[CHECKPOINT] Saved to {work / 'full' / f'checkpoint_{i}.pt'}" for i in (4, 8)]
    assert "Traceback" not in full.stderr


def test_metrics_file(full, work):
    rows = metrics(work / "full")
    train = [r for r in rows if r["type"] == "train"]
    evals = [r for r in rows if r["type"] == "eval"]
    assert [r["step"] for r in train] == list(range(8)) and [r["step"] for r in evals] == [4, 8]
    assert set(train[0]) == {
        "type",
        "step",
        "tokens",
        "time_s",
        "lr",
        "loss",
        "grad_norm",
        "tokens_per_s",
        "iter_time_ms",
    }
    assert set(evals[0]) == {"type", "step", "tokens", "time_s", "val_loss", "val_ppl"}
    per_step = RUN["batch_size"] * MODEL["context_length"]
    assert [r["tokens"] for r in train] == [s * per_step for s in range(8)]
    assert all(math.isclose(r["val_ppl"], math.exp(r["val_loss"]), rel_tol=1e-9) for r in evals)
    times = [r["time_s"] for r in rows]
    assert times == sorted(times)

    # the schedule, recomputed independently: linear warm-up from 0, cosine from max_lr to min_lr over 8 steps
    def lr(t):
        if t < 2:
            return 3e-3 * t / 2
        return 3e-4 + 0.5 * (1 + math.cos(math.pi * (t - 2) / 6)) * (3e-3 - 3e-4)

    assert all(math.isclose(r["lr"], lr(r["step"]), rel_tol=1e-12, abs_tol=1e-15) for r in train)
    # the printed loss is the recorded one
    printed = [float(re.search(r"loss (\S+)", x).group(1)) for x in full.stdout.splitlines() if x.startswith("iter ")]
    assert printed == [round(r["loss"], 4) for r in train]


def test_checkpoint_contents(full, work):
    files = sorted(p.name for p in (work / "full").iterdir())
    assert files == [".lock", "checkpoint_4.pt", "checkpoint_8.pt", "config.json", "metrics.jsonl"]  # keep_last 0
    assert (work / "full" / ".lock").read_text() == ""  # released
    ckpt = load(work / "full" / "checkpoint_8.pt")
    assert {"model_state_dict", "optimizer_state_dict", "iteration", "config", "rng_state", "run_id"} <= set(ckpt)
    assert ckpt["iteration"] == 8
    assert ckpt["run_id"] == ckpt["config"]["run_id"] == load(work / "full" / "checkpoint_4.pt")["run_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", ckpt["run_id"])
    reference = TransformerLM(**MODEL).state_dict()
    assert {k: tuple(v.shape) for k, v in ckpt["model_state_dict"].items()} == {
        k: tuple(v.shape) for k, v in reference.items()
    }
    assert ckpt["config"]["d_model"] == 32 and ckpt["config"]["max_iters"] == 8
    assert json.loads((work / "full" / "config.json").read_text()) == ckpt["config"]
    # the weights load into a fresh model and reproduce the last validation loss on the same batch
    model = TransformerLM(**MODEL)
    model.load_state_dict(ckpt["model_state_dict"])
    assert all(torch.isfinite(v).all() for v in ckpt["model_state_dict"].values())
    assert len(ckpt["optimizer_state_dict"]["state"]) == len(reference)


# --- resume ---------------------------------------------------------------------------------------


def test_resume_is_bit_exact(full, halves, work):
    assert train_losses(halves["dir"]) == train_losses(work / "full")  # every loss, exactly
    a = load(work / "full" / "checkpoint_8.pt")
    b = load(halves["dir"] / "checkpoint_8.pt")
    for k, v in a["model_state_dict"].items():
        assert torch.equal(v, b["model_state_dict"][k]), k
    for i, state in a["optimizer_state_dict"]["state"].items():
        for key, value in state.items():
            other = b["optimizer_state_dict"]["state"][i][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (i, key)
    evals = lambda d: [(r["step"], r["val_loss"]) for r in metrics(d) if r["type"] == "eval"]
    assert evals(halves["dir"]) == evals(work / "full")


def test_resume_auto_and_pruning(halves):
    out = halves["dir"]
    assert halves["after_first"] == ["checkpoint_4.pt"]
    assert sorted(p.name for p in out.glob("checkpoint_*")) == ["checkpoint_8.pt"]  # keep_last 1 pruned 4
    assert f"Resumed from {out / 'checkpoint_4.pt'} at iteration 4" in halves["second"].stdout
    iters = [x for x in halves["second"].stdout.splitlines() if x.startswith("iter ")]
    assert iters[0].startswith("iter      4 ")
    rows = metrics(out)  # appended: the first half's lines, then the resumed ones
    assert [(r["type"], r["step"]) for r in rows] == [("train", s) for s in range(4)] + [("eval", 4)] + [
        ("train", s) for s in range(4, 8)
    ] + [("eval", 8)]
    assert rows[:5] == halves["first_metrics"]
    assert rows[5]["time_s"] > rows[4]["time_s"]  # wall clock continues
    assert json.loads((out / "config.json").read_text())["max_iters"] == 8  # the resolved config of the resumed run


def _wandb_history(run_dir: Path) -> tuple[dict, list[dict], dict]:
    """The run record, history rows and config of one offline W&B run, read back by W&B's own reader."""
    # W&B's command through this interpreter, not `wandb` on PATH (absent when python is called by its full path)
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    run = next(r["run"] for r in records if r["type"] == "run")
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    config = {}
    for r in records:
        if r["type"] == "config":
            config.update(r["config"].get("update", {}))
    return run, history, config


def test_wandb_offline_metrics(halves):
    runs = sorted((halves["dir"] / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # the first half and the resumed one
    (run1, hist1, config1), (run2, hist2, config2) = _wandb_history(runs[0]), _wandb_history(runs[1])
    assert run1["run_id"] == run2["run_id"]  # the resumed run continues the same run
    assert run1["project"] == "cs336-transformer" and run1.get("display_name", "tiny") == "tiny"
    assert run1["tags"] == ["a", "b"]
    assert config1["d_model"] == 32 and config1["batch_size"] == 4 and config1["max_iters"] == 4
    assert config2["max_iters"] == 8
    local = metrics(halves["dir"])
    train = {r["step"]: r for r in local if r["type"] == "train"}
    evals = {r["step"]: r for r in local if r["type"] == "eval"}
    seen_train, seen_eval = {}, {}
    for row in hist1 + hist2:
        step = row["_step"]
        if "train/loss" in row:
            assert {"train/loss", "train/lr", "train/iter_time_ms"} <= set(row)
            seen_train[step] = row
        if "val/loss" in row:
            assert "val/perplexity" in row
            seen_eval[step] = row
    assert sorted(seen_train) == list(range(8)) and sorted(seen_eval) == [4, 8]
    for s, row in seen_train.items():
        assert row["train/loss"] == pytest.approx(train[s]["loss"], rel=1e-9)
        assert row["train/lr"] == pytest.approx(train[s]["lr"], rel=1e-9, abs=1e-15)
        assert row["train/iter_time_ms"] == pytest.approx(train[s]["iter_time_ms"], rel=1e-9)
    for s, row in seen_eval.items():
        assert row["val/loss"] == pytest.approx(evals[s]["val_loss"], rel=1e-9)
        assert row["val/perplexity"] == pytest.approx(evals[s]["val_ppl"], rel=1e-9)


# --- faults ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_sigterm_saves_and_exits(work, sig):
    """SIGTERM (a scheduler) and SIGHUP (the terminal went away) finish the step, save and exit 128 + signal."""
    out = work / sig.name.lower()
    args = flags(
        train_data=work / "train.npy",
        val_data=work / "val.npy",
        **MODEL,
        **{**RUN, "cosine_cycle_iters": 100_000, "checkpoint_interval": 100_000, "eval_interval": 100_000},
        max_iters=100_000,
        checkpoint_dir=out,
    )
    env = {"GLIBC_TUNABLES": MALLOC_TUNABLES, **os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cs336_nb.train", *args],
        cwd=work,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    seen, deadline = [], time.time() + 240
    try:
        for line in proc.stdout:  # wait until training is under way
            seen.append(line)
            if line.startswith("iter      3 ") or time.time() > deadline:
                break
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout = "".join(seen) + rest
    assert proc.returncode == 128 + sig, (proc.returncode, stdout[-2000:], err[-2000:])
    assert "Traceback" not in err
    saved = sorted(out.glob("checkpoint_*.pt"))
    assert len(saved) == 1
    step = load(saved[0])["iteration"]
    assert step >= 4 and saved[0].name == f"checkpoint_{step}.pt"
    assert f"[CHECKPOINT] Saved to {saved[0]}" in stdout
    assert f"Stopped by {sig.name} at iteration {step}: continue with --resume auto" in stdout
    assert max(train_losses(out)) == step - 1  # the last step was logged too


def test_nan_loss_stops_without_saving(work):
    """A learning rate of 1e30 blows the weights up at the first step with lr > 0, so the weights, their
    validation loss or the loss of the next step are not finite. Checkpoints come every step: the run stops
    with one line (exit 2: a setting to fix), and every checkpoint it left, the named one above all, holds
    finite weights whose loss on validation tokens (computed here with torch's own cross-entropy) is finite."""
    out = work / "nan"
    proc = train_cli(
        flags(
            train_data=work / "train.npy",
            val_data=work / "val.npy",
            **MODEL,
            **{**RUN, "max_lr": 1e30, "min_lr": 1e30, "checkpoint_interval": 1, "eval_interval": 100},
            max_iters=20,
            keep_last=0,
            checkpoint_dir=out,
        ),
        cwd=work,
    )
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    found = re.search(
        r"(loss is (nan|inf|-inf) at iter|weights are not finite after iter|the weights after iter) (\d+)"
        r".*: stopping without saving; the last good checkpoint is (\S+) \(",
        err[0],
    )
    assert found and err[0].startswith("train: error: "), err[0]
    bad, named = int(found.group(3)), Path(found.group(4))
    losses = train_losses(out)
    assert all(math.isfinite(v) for v in losses.values()) and max(losses) < bad  # only good steps recorded
    saved = {int(p.stem.split("_")[1]): p for p in out.glob("checkpoint_*.pt")}
    assert named == saved[max(saved)] and max(saved) <= bad
    x = torch.from_numpy(np.load(work / "val.npy")[:33].astype(np.int64))
    for p in saved.values():
        state = load(p)["model_state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), p
        model = TransformerLM(**MODEL)
        model.load_state_dict(state)
        with torch.no_grad():
            logits = model(x[None, :16])
        assert torch.isfinite(torch.nn.functional.cross_entropy(logits[0], x[1:17])), p


# --- bad input ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(work) -> Path:
    d = work / "bad"
    d.mkdir()
    np.save(d / "floats.npy", np.random.default_rng(0).random(1000).astype(np.float32))
    np.save(d / "big_ids.npy", np.arange(1000, dtype=np.uint16))  # ids up to 999 >= vocab 64
    np.save(d / "short.npy", np.arange(10, dtype=np.uint16))  # 10 tokens < context 16 + 1
    (d / "bad.json").write_text('{"batch_size": 4,, }')
    (d / "typo.json").write_text(json.dumps({"batch_sise": 4}))
    (d / "corrupt.pt").write_bytes(b"this is not a checkpoint")
    (d / "adir.npy").mkdir()
    return d


def _base(work, **over) -> list[str]:
    kw = dict(
        train_data=work / "train.npy",
        val_data=work / "val.npy",
        **MODEL,
        **RUN,
        max_iters=8,
        checkpoint_dir=work / "bad_out",
    )
    kw.update(over)
    return flags(**{k: v for k, v in kw.items() if v is not None})


BAD = {  # name: (settings over the base, words the one error line must contain)
    "missing data": (dict(train_data="nowhere/train.npy"), "nowhere/train.npy"),
    "unreadable data": (dict(train_data="{bad}/adir.npy"), "adir.npy"),
    "wrong dtype": (dict(val_data="{bad}/floats.npy"), "float32"),
    "ids >= vocab": (dict(train_data="{bad}/big_ids.npy"), "vocab_size=64"),
    "data shorter than context": (dict(val_data="{bad}/short.npy"), "context"),
    "d_model % num_heads": (dict(d_model=30, num_heads=4), "not divisible by num_heads"),
    "odd head dim": (dict(d_model=36, num_heads=4), "odd"),
    "batch size 0": (dict(batch_size=0), "batch_size must be positive"),
    "negative lr": (dict(max_lr=-1e-3), "max_lr must be positive"),
    "warm-up > run": (dict(warmup_iters=20), "longer than the run"),
    "missing resume": (dict(resume="{bad}/nope.pt"), "nope.pt"),
    "corrupt resume": (dict(resume="{bad}/corrupt.pt"), "corrupt.pt"),
    "shape change on resume": (dict(resume="{work}/full/checkpoint_8.pt", d_model=64, num_heads=4), "d_model 32 -> 64"),
    "fresh run over another run": (dict(checkpoint_dir="{work}/full"), "--resume auto"),
    "no vocab size": (dict(vocab_size=None), "vocab_size is required"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2(case, work, bad_files, full, capsys):
    over, words = BAD[case]
    over = {k: v.format(bad=bad_files, work=work) if isinstance(v, str) else v for k, v in over.items()}
    argv = _base(work, **over)
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train: error: "), err
    assert words in err[0], err[0]


@pytest.mark.parametrize(
    "content, words", [('{"batch_size": 4,, }', "not valid JSON"), ('{"batch_sise": 4}', "did you mean 'batch_size'")]
)
def test_bad_config_file(content, words, tmp_path, capsys):
    (tmp_path / "c.json").write_text(content)
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(tmp_path / "c.json")])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_bad_input_from_the_real_command_line(tmp_path):
    (tmp_path / "c.json").write_text('{"batch_sise": 4}')
    proc = train_cli(["--config", str(tmp_path / "c.json")], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        proc.stderr == f"train: error: unknown key 'batch_sise' in {tmp_path / 'c.json'} (did you mean 'batch_size'?)\n"
    )


@pytest.mark.parametrize(
    "env, words",
    [
        (dict(RANK="0", WORLD_SIZE="2"), "MASTER_ADDR, MASTER_PORT not set"),
        (
            dict(RANK="0", WORLD_SIZE="3", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999"),
            "grad_accum_steps 2 is not divisible by the world size 3",
        ),
        (  # another rank: its line says which
            dict(RANK="1", WORLD_SIZE="3", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999"),
            "[rank 1] train: error: grad_accum_steps 2 is not divisible",
        ),
    ],
)
def test_bad_distributed_setup(env, words, work, monkeypatch, capsys):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # a rank other than 0 points stdout at /dev/null: undo it after
    with pytest.raises(SystemExit) as exit:
        main(_base(work, grad_accum_steps=2, checkpoint_dir=work / "dist_bad"))
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert err[0].startswith("[rank 1] train: error: " if env["RANK"] == "1" else "train: error: "), err


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json")), ids=lambda p: p.stem
)
def test_shipped_configs_are_valid(path):
    from cs336_nb.config import config_from_dict, load_config_file, validate_config

    cfg = config_from_dict(load_config_file(path), source=str(path))
    validate_config(cfg)
    assert cfg.train_data.startswith("data/tokenized/") and cfg.val_data.startswith("data/tokenized/")
    if path.stem == "gpt2_124M":
        assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.d_ff, cfg.context_length, cfg.vocab_size) == (
            12,
            768,
            12,
            3072,
            1024,
            50257,
        )
        for world_size in (1, 2, 4, 8):
            validate_config(cfg, world_size)  # torchrun on up to 8 GPUs
