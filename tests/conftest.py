"""Shared pytest setup: every test runs from the repository root with the package importable."""

import contextlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
DATA = NBS / "data"  # test data shipped with the repository (see nbs/data/README.md)

# Every subprocess a test starts, module fixtures' included, imports this checkout's cs336_nb, whatever
# editable install pip last made (set here, at collection, because module fixtures run before function ones).
os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    # tests never reach the network: W&B runs offline unless a test says otherwise
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "offline"))
    monkeypatch.setenv("WANDB_SILENT", "true")


# the training tests' model: tiny, so a run of a few steps takes a second
TINY_MODEL = dict(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=64, rope_theta=10000.0)
# and the settings their runs share: warm-up, schedule, a log line every step, evaluation and a checkpoint every 4
TINY_RUN = dict(
    batch_size=4,
    warmup_iters=2,
    max_lr=3e-3,
    min_lr=3e-4,
    log_interval=1,
    eval_interval=4,
    eval_iters=2,
    checkpoint_interval=4,
    device="cpu",
)


def write_tiny_tokens(folder: Path, seed: int = 0) -> None:
    """`train.npy` (20,000) and `val.npy` (4,000): random token ids of the tiny model's vocabulary, as uint16."""
    rng = np.random.default_rng(seed)
    for name, size in (("train", 20_000), ("val", 4_000)):
        np.save(folder / f"{name}.npy", rng.integers(0, TINY_MODEL["vocab_size"], size).astype(np.uint16))


def flags(**settings) -> list[str]:
    """Command-line flags for keyword settings: `--name value`, `--name` for True, `--no-name` for False."""
    out = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    return out


def run_module(
    module: str,
    *args,
    timeout: float = 120,
    code: str | None = None,
    cwd: Path = ROOT,
    env: dict[str, str | None] | None = None,
) -> subprocess.CompletedProcess:
    """Run `python -m cs336_nb.<module> args` (or `python -c code args`), from the repository root unless `cwd`
    says otherwise: this checkout first on the path (above), offline (W&B, Hugging Face), one thread, UTF-8
    output; `env` adds variables, and a variable set to None is removed."""
    environ = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    command = ["-c", code] if code is not None else ["-m", f"cs336_nb.{module}"]
    return subprocess.run(
        [sys.executable, *command, *map(str, args)],
        cwd=cwd,
        env={k: v for k, v in environ.items() if v is not None},
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, text: str, prog: str | None = None) -> None:
    """Exit status 2 and a stderr of exactly one line holding `text` (after `prog: error:`, if given), no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert text in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert prog is None or proc.stderr.startswith(f"{prog}: error:"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


class Hang(BaseException):
    """Raised by the alarm: the command did not return in time (a BaseException, so run_cli cannot map it)."""


def _alarm(signum, frame):
    raise Hang


def call_main(main, argv: list, cwd: Path | None = None, timeout: int = 60) -> tuple[int, str, str]:
    """A command's `main(argv)` in this process, from `cwd`, under an alarm: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    previous, here = signal.signal(signal.SIGALRM, _alarm), os.getcwd()
    signal.alarm(timeout)
    try:
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in argv])
                code = 0
            except SystemExit as exit:
                code = exit.code
    except Hang:
        pytest.fail(f"{main.__module__}.main({argv}) did not end within {timeout} s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(here)
    return code, out.getvalue(), err.getvalue()
