"""A process SIGKILLed while saving a checkpoint leaves the previous one intact and loadable.

The child saves a ~32 MB checkpoint over and over, printing "saving <i>" before each save. The parent
kills it mid-save: the moment the save's temporary file appears (atomic), or a random moment after the
save has started (plain). With `save_checkpoint` (temp file + fsync +
os.replace) the target always loads and holds one complete earlier version; the control, a plain
`torch.save` to the target path, is killed the same way and leaves a file `read_checkpoint` rejects:
proof that the kill really lands mid-write, so the first test can fail.
"""

import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from cs336_nb.checkpoint import CheckpointError, read_checkpoint

CHILD = r"""
import sys, torch
from torch import nn
from cs336_nb.checkpoint import save_checkpoint
path, mode = sys.argv[1], sys.argv[2]
model = nn.Linear(4096, 2048, bias=False)                  # 32 MB of float32
for i in range(1, 10_000):
    with torch.no_grad(): model.weight.fill_(float(i))     # every version is recognisable by its value
    print(f"saving {i}", flush=True)
    if mode == "atomic": save_checkpoint(model, None, i, path)
    else: torch.save({"model_state_dict": model.state_dict(), "iteration": i}, path)
    print(f"saved {i}", flush=True)
"""


def _wait_for_temporary_file(folder, timeout=10.0):
    """Return as soon as a `.tmp` file appears in `folder` (a random sleep missed it on fast machines)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(p.name.endswith(".tmp") for p in folder.iterdir()):
        time.sleep(0.0002)


def _kill_mid_save(path, mode, rounds_wanted=1):
    """Run the child until it has completed one save, then SIGKILL it shortly after a new save starts."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), mode], stdout=subprocess.PIPE, text=True)
    try:
        saved = 0
        for line in proc.stdout:
            if line.startswith("saved"):
                saved += 1
            if line.startswith("saving") and saved >= rounds_wanted:
                if mode == "atomic":  # the moment its temporary file exists, the save is mid-write
                    _wait_for_temporary_file(path.parent)
                else:
                    time.sleep(random.uniform(0.0, 0.05))  # somewhere inside the 32 MB write
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return saved


def test_killed_atomic_save_leaves_previous_checkpoint(tmp_path):
    random.seed(0)
    path = tmp_path / "ckpt.pt"
    mid_write = 0
    for _ in range(2):
        saved = _kill_mid_save(path, "atomic")
        mid_write += any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the kill hit a write
        ckpt = read_checkpoint(path)  # never raises: the file is always complete
        it = ckpt["iteration"]
        assert it >= saved >= 1
        w = ckpt["model_state_dict"]["weight"]
        assert w.shape == (2048, 4096) and torch.equal(w, torch.full_like(w, float(it)))
    assert mid_write, "no kill landed inside a save"


def test_killed_plain_save_corrupts_the_checkpoint(tmp_path):
    """The control: without the atomic write, a kill mid-save destroys the checkpoint."""
    random.seed(0)
    path = tmp_path / "ckpt.pt"
    for _ in range(5):  # a kill can land between saves: retry
        _kill_mid_save(path, "plain")
        try:
            read_checkpoint(path)
        except CheckpointError:
            return
    pytest.fail("a plain torch.save was never caught mid-write: the kill test cannot tell atomic from not")
