"""Data parallelism under `torchrun` on CPU (Gloo): 2 processes × 1 micro-batch must train exactly like
1 process with `--grad-accum-steps 2` (same batches, losses equal to 1e-5); only rank 0 prints and
writes; a 2-process run resumes under torchrun, and at another world size (1 process). Two "nodes" (two
torchrun launchers, `--nnodes 2 --nproc_per_node 1`, meeting through a c10d rendezvous on 127.0.0.1, as
README's multi-node command does across machines) train exactly like one process too.

torchrun starts are slow on 2 cores, so there are two of them, shared by all checks.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, TINY_RUN, write_tiny_tokens

from cs336_nb.runtime import MALLOC_TUNABLES

SETTINGS = {
    **TINY_MODEL,
    **TINY_RUN,
    "grad_accum_steps": 2,
    "cosine_cycle_iters": 6,
    "eval_interval": 2,
    "eval_iters": 3,
    "checkpoint_interval": 2,
    "keep_last": 0,
    "seed": 5,
}


def _env(malloc_tuned: bool = True) -> dict:
    """GLIBC_TUNABLES set: the CLI need not re-exec itself. The first 2-process run leaves it unset, so each
    worker re-executes itself with the malloc tuning under torchrun, and its Device line must say so."""
    env = {
        "WANDB_MODE": "offline",
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONFAULTHANDLER": "1",
        "GLIBC_TUNABLES": MALLOC_TUNABLES,
    }
    if not malloc_tuned:
        del env["GLIBC_TUNABLES"]
        env.pop("CS336_MALLOC_TUNING", None)
    return env


def run(args: list[str], cwd: Path, nproc: int = 1, malloc_tuned: bool = True) -> subprocess.CompletedProcess:
    """The training CLI, alone or under `torchrun --standalone --nproc_per_node nproc`."""
    launcher = (
        [sys.executable, "-m", "cs336_nb.train"]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "cs336_nb.train",
        ]
    )
    # a session of its own: on a hang, SIGABRT reaches torchrun and every worker, and faulthandler prints
    # where each one stood; nothing is left running
    proc = subprocess.Popen(
        launcher + args,
        cwd=cwd,
        env=_env(malloc_tuned),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)
        out, err = proc.communicate()
        pytest.fail(f"timed out\n{out[-3000:]}\n{err[-6000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def free_port() -> int:
    """A TCP port no one listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_nodes(args: list[str], cwd: Path, nnodes: int = 2) -> list[subprocess.CompletedProcess]:
    """The same `torchrun --nnodes N --nproc_per_node 1 --rdzv-backend c10d ...` command started N times, as on
    N machines: the launchers meet at the rendezvous endpoint and agree on the node ranks themselves."""
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--rdzv-id=two-nodes",
        "-m",
        "cs336_nb.train",
    ]
    procs = [
        subprocess.Popen(
            launcher + args,
            cwd=cwd,
            env=_env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        for _ in range(nnodes)
    ]
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGABRT)
            out, err = proc.communicate()
            pytest.fail(f"timed out\n{out[-3000:]}\n{err[-6000:]}")
        assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def metrics(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


def losses(d: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(d) if r["type"] == "train"}


def val_losses(d: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in metrics(d) if r["type"] == "eval"}


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("ddp")
    write_tiny_tokens(d, seed=1)
    (d / "config.json").write_text(
        json.dumps({**SETTINGS, "train_data": str(d / "train.npy"), "val_data": str(d / "val.npy")})
    )
    base = ["--config", str(d / "config.json")]
    out = {"dir": d}
    out["single"] = run(base + ["--max-iters", "6", "--checkpoint-dir", str(d / "single")], d)
    out["ddp"] = run(base + ["--max-iters", "4", "--checkpoint-dir", str(d / "ddp")], d, nproc=2, malloc_tuned=False)
    out["ddp_files"] = sorted(p.name for p in (d / "ddp").iterdir() if p.name != ".lock")
    shutil.copytree(d / "ddp", d / "ddp_to_single")
    out["resumed"] = run(
        base + ["--max-iters", "6", "--checkpoint-dir", str(d / "ddp"), "--resume", "auto"], d, nproc=2
    )
    out["to_single"] = run(
        base + ["--max-iters", "6", "--checkpoint-dir", str(d / "ddp_to_single"), "--resume", "auto"], d
    )
    out["nodes"] = run_nodes(base + ["--max-iters", "4", "--checkpoint-dir", str(d / "nodes")], d)
    return out


def _close(a: dict[int, float], b: dict[int, float]):
    assert a.keys() == b.keys()
    for k in a:
        assert abs(a[k] - b[k]) <= 1e-5, (k, a[k], b[k])


def test_two_processes_equal_grad_accumulation(runs):
    d = runs["dir"]
    first = lambda run, last: {k: v for k, v in run.items() if k <= last}
    _close(first(losses(d / "ddp_to_single"), 3), first(losses(d / "single"), 3))  # the 2-process steps 0-3
    _close(first(val_losses(d / "ddp_to_single"), 4), first(val_losses(d / "single"), 4))
    assert "world size 2" in runs["ddp"].stdout and "tokens per step 128" in runs["ddp"].stdout
    assert "| malloc tuned" in runs["ddp"].stdout  # each torchrun worker re-executed itself with the tuning


def test_only_rank_zero_prints_and_writes(runs):
    out = runs["ddp"].stdout
    assert out.count("Training Configuration") == 1
    iters = [x for x in out.splitlines() if x.startswith("iter ")]
    assert [int(x.split("|")[0].split()[1]) for x in iters] == [0, 1, 2, 3]
    assert out.count("[CHECKPOINT] Saved") == 2 and out.count("[EVAL]") == 2
    assert runs["ddp_files"] == ["checkpoint_2.pt", "checkpoint_4.pt", "config.json", "metrics.jsonl"]
    steps = [(r["type"], r["step"]) for r in metrics(runs["dir"] / "ddp")]
    assert len(steps) == len(set(steps))  # no line written twice
    for proc in (runs["ddp"], runs["resumed"]):  # the process group was destroyed
        assert "destroy_process_group" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_resume_two_processes_and_at_another_world_size(runs):
    d = runs["dir"]
    single = losses(d / "single")
    _close(losses(d / "ddp"), single)  # 2 procs: 0-3, then resumed 4-5
    _close(losses(d / "ddp_to_single"), single)  # 2 procs, then 1 proc with K=2
    _close(val_losses(d / "ddp"), val_losses(d / "single"))
    assert "Resumed from" in runs["resumed"].stdout and "iter      4 " in runs["resumed"].stdout
    ref = weights(d / "single" / "checkpoint_6.pt")
    for other in (d / "ddp" / "checkpoint_6.pt", d / "ddp_to_single" / "checkpoint_6.pt"):
        for k, v in weights(other).items():
            torch.testing.assert_close(v, ref[k], atol=1e-5, rtol=1e-5)


def test_two_nodes_through_a_c10d_rendezvous_equal_one_process(runs):
    """Two launchers, one process each, meet at a c10d endpoint: the world size is 2, one node (the one that
    got rank 0) prints and writes, and losses and weights equal one process with the same 2 micro-batches."""
    d = runs["dir"]
    outs = [p.stdout for p in runs["nodes"]]
    assert sum(o.count("Training Configuration") for o in outs) == 1  # rank 0 alone reports, on whichever node
    assert "world size 2" in "".join(outs) and "tokens per step 128" in "".join(outs)
    first = lambda run, last: {k: v for k, v in run.items() if k <= last}
    _close(losses(d / "nodes"), first(losses(d / "single"), 3))
    _close(val_losses(d / "nodes"), first(val_losses(d / "single"), 4))
    ref = weights(d / "single" / "checkpoint_4.pt")
    for k, v in weights(d / "nodes" / "checkpoint_4.pt").items():
        torch.testing.assert_close(v, ref[k], atol=1e-5, rtol=1e-5)
