"""A hostile user against `python -m cs336_nb.prepare`: every attack ends in exit 2 and one stderr line naming
the problem (or works), nothing an earlier run wrote is lost, and nothing hangs (every subprocess has a timeout).

- `test_attack`: a table of bad inputs, flags and files, aimed at a folder that already holds a dataset, run
  from an empty working directory that must stay empty;
- `test_vocab_larger_than_the_text`, `test_copy_as_validation_text`: what prepare made is what it records and
  says (the vocabulary, the dtype), and a validation text that is a copy of the training text gets a warning;
- `test_read_only_folder`, `test_full_disk`: a read-only and a full file system (small tmpfs mounts when the
  tests run as root, else a chmod 555 folder and a skip);
- `test_ctrl_c`: SIGINT to the process group during BPE training;
- `test_two_at_once_then_kill_9`: a second prepare of the same dataset is refused while the first runs; then
  repeated random `kill -9`s of the whole process group, and a last run that completes and equals a clean run.
"""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, ROOT

from cs336_nb.prepare import prepare

STORY = DATA / "tinystories_sample.txt"
OUTPUTS = ["d_tokenizer/vocab.json", "d_tokenizer/merges.txt", "d_train.uint16.npy", "d_val.uint16.npy"]


def command(*args) -> list[str]:
    return [sys.executable, "-m", "cs336_nb.prepare", *map(str, args)]


def run(*args, timeout=60):
    return subprocess.run(command(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def start(*args) -> subprocess.Popen:
    """Start prepare in its own process group (so its BPE workers can be signalled with it)."""
    return subprocess.Popen(
        command(*args),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_line(proc: subprocess.Popen, needle: str | tuple[str, ...], timeout: float = 60) -> str:
    """Read the process's stdout until a line holds `needle` (or one of them); fails if it exits or takes too long."""
    needles = (needle,) if isinstance(needle, str) else needle
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if any(n in line for n in needles):
            return line
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"no {needle!r} line from prepare (exit {proc.poll()}): {proc.stderr.read()}")


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` except lock files (their content is a live pid)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def one_error_line(r, message: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("prepare: error: "), r.stderr[-2000:]
    assert message in r.stderr, r.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Input files of every kind, and a folder holding a finished dataset `good` that attacks must not harm."""
    root = tmp_path_factory.mktemp("faults")
    good = root / "good"
    prepare(STORY, out_dir=good, name="good", vocab_size=270, val_fraction=0.2, progress=False, num_processes=1)
    (root / "empty.txt").write_text("")
    (root / "binary.bin").write_bytes(random.Random(0).randbytes(4096))
    (root / "blank_tail.txt").write_text("text\n" + " " * 1000)
    (root / "a_folder").mkdir()
    (root / "a_file").write_text("I am not a folder")
    (good / "bad_meta.json").write_text('{"version": 1, "settings": {')
    (root / "broken_tok").mkdir()
    for f in ("vocab.json", "merges.txt", "special_tokens.json"):
        (root / "broken_tok" / f).write_text("][")
    en = (DATA / "corpus.en").read_text(encoding="utf-8")
    (root / "big.txt").write_text(en * 38, encoding="utf-8")  # 5 MB, no special token: BPE counts in parallel
    (root / "story_link.txt").symlink_to(STORY)  # the training text under another name
    (root / "story_copy.txt").write_bytes(STORY.read_bytes())
    os.link(root / "story_copy.txt", root / "story_hard_link.txt")  # one file, two names
    (root / "cwd").mkdir()  # the table runs here: nothing may be written into the working directory
    return root


# (id, arguments after --train-text STORY --out-dir GOOD unless the row gives its own, expected stderr text)
ATTACKS = [
    ("name_escapes_upwards", ["--name", "../../escaped"], "must be a plain file name"),
    ("name_absolute", ["--name", "{root}/abs_escaped"], "must be a plain file name"),
    ("empty_special_token", ["--special-tokens", "", "--name", "e"], "empty special token"),
    ("missing_tokenizer_dir", ["--tokenizer-dir", "{root}/no_such_tok", "--name", "m"], "is not a folder"),
    ("damaged_tokenizer", ["--tokenizer-dir", "{root}/broken_tok", "--name", "t"], "can not read the tokenizer"),
    ("malformed_meta", ["--name", "bad"], "is damaged"),
    ("same_name_other_settings", ["--name", "good", "--vocab-size", 280, "--val-fraction", 0.2], "different dataset"),
    ("val_fraction_out_of_range", ["--val-fraction", 1.5, "--name", "v"], "between 0 and 1"),
    ("vocab_too_small", ["--vocab-size", 100, "--name", "s"], "too small"),
    ("zero_threads", ["--threads", 0], "argument --threads: not a positive integer"),
    ("negative_max_bytes", ["--max-bytes=-1MB"], "not a positive byte count"),
    ("missing_val_text", ["--val-text", "{root}/nope.txt", "--name", "n"], "validation text not found"),
    ("empty_text", ["--train-text", "{root}/empty.txt", "--out-dir", "{good}"], "is empty"),
    ("binary_text", ["--train-text", "{root}/binary.bin", "--out-dir", "{good}"], "is not UTF-8 text"),
    ("folder_as_text", ["--train-text", "{root}/a_folder", "--out-dir", "{good}"], "is a folder, not a text file"),
    ("device_as_text", ["--train-text", "/dev/zero", "--out-dir", "{good}"], "is not a regular file"),
    ("blank_tail", ["--train-text", "{root}/blank_tail.txt", "--out-dir", "{good}"], "its last part is blank"),
    ("file_as_out_dir", ["--train-text", STORY, "--out-dir", "{root}/a_file"], "is a file, not a folder"),
    ("no_source", ["--out-dir", "{good}"], "one of the arguments --train-text --corpus is required"),
    # absurd vocabulary sizes are refused before anything is read (ids are stored as uint32 at most)
    ("vocab_2_to_the_40", ["--vocab-size", 2**40, "--name", "huge"], "--vocab-size 1,099,511,627,776 is too large"),
    (
        "vocab_just_over_uint32",
        ["--vocab-size", 2**32 + 1, "--name", "huge"],
        "--vocab-size 4,294,967,297 is too large",
    ),
    ("vocab_zero", ["--vocab-size", 0], "argument --vocab-size: not a positive integer"),
    ("vocab_not_an_integer", ["--vocab-size", "1e5"], "argument --vocab-size: not a positive integer"),
    # the training text as validation text, under its own name, a symbolic link or a hard link
    ("val_text_is_train_text", ["--val-text", STORY, "--name", "same"], "is the training text"),
    ("val_text_symlink_to_train", ["--val-text", "{root}/story_link.txt", "--name", "same"], "is the training text"),
    (
        "val_text_hard_link_to_train",
        ["--train-text", "{root}/story_copy.txt", "--val-text", "{root}/story_hard_link.txt", "--out-dir", "{good}"],
        "is the training text",
    ),
    # empty names must not mean the working directory
    ("empty_out_dir", ["--train-text", STORY, "--out-dir", ""], '--out-dir "" names no folder'),
    ("empty_name", ["--name", ""], "--name '' must be a plain file name"),
    ("empty_train_text", ["--train-text", "", "--out-dir", "{good}"], 'training text "" names no file'),
    ("empty_val_text", ["--val-text", "", "--name", "ev"], 'validation text "" names no file'),
    ("empty_tokenizer_dir", ["--tokenizer-dir", "", "--name", "et"], "--tokenizer-dir '' is not a folder"),
]


def test_attack_table_is_big_enough():
    assert len({a[0] for a in ATTACKS}) == len(ATTACKS) >= 30


# Runs each row as `python -m cs336_nb.prepare` does (runpy, `__name__ == "__main__"`), all rows in one fresh
# interpreter, so the table pays the start-up once; the tests below use real separate processes.
TABLE_DRIVER = """
import contextlib, io, json, runpy, sys
results = []
for argv in json.load(sys.stdin):
    sys.argv, out, err, code = ["prepare", *argv], io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module("cs336_nb.prepare", run_name="__main__")
        except SystemExit as e:
            code = e.code
    results.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def run_table(rows: list[list[str]], cwd: Path = ROOT) -> list[subprocess.CompletedProcess]:
    r = subprocess.run(
        [sys.executable, "-c", TABLE_DRIVER],
        input=json.dumps(rows),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return [subprocess.CompletedProcess(argv, **res) for argv, res in zip(rows, json.loads(r.stdout))]


def test_attack(world):
    good = world / "good"
    before = snapshot(good)
    rows = []
    for _, args, _ in ATTACKS:
        args = [str(a).format(root=world, good=good) for a in args]
        if "--out-dir" not in args:
            args = ["--train-text", str(STORY), "--out-dir", str(good), *args]
        rows.append(args + ["--no-progress"] * ("--out-dir" in args and "--train-text" in args))
    for (name, _, message), r in zip(ATTACKS, run_table(rows, cwd=world / "cwd")):
        try:
            one_error_line(r, message)
        except AssertionError as e:
            raise AssertionError(f"attack {name} ({' '.join(r.args)}): {e}") from None
    assert snapshot(good) == before  # nothing the earlier run wrote changed, and nothing new but lock files
    assert list((world / "cwd").iterdir()) == []  # nothing was written into the working directory
    assert not list(world.rglob("*escaped*")) and not Path(f"{world}/abs_escaped_meta.json").exists()
    # the dataset under attack is still whole: the same command, a real process, verifies it and does nothing
    r = run("--train-text", STORY, "--out-dir", good, "--name", "good", "--vocab-size", 270, "--val-fraction", 0.2)
    assert r.returncode == 0 and "nothing to do" in r.stdout and r.stderr == "", r.stdout + r.stderr


def test_vocab_larger_than_the_text(world):
    # asked 65,537 of a few kB of stories: BPE runs out of pairs, and prepare records and says what it made
    out = world / "wide_ask"
    r = run("--train-text", STORY, "--out-dir", out, "--name", "w", "--vocab-size", 65537, "--no-progress", timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]
    made = len(json.loads((out / "w_tokenizer" / "vocab.json").read_text(encoding="utf-8")))  # the saved tokenizer
    meta = json.loads((out / "w_meta.json").read_text())
    assert made < 65536 and (meta["vocab_size"], meta["dtype"]) == (made, "uint16"), (made, meta["vocab_size"])
    assert meta["settings"]["vocab_size"] == 65537  # what was asked identifies the dataset
    assert np.load(out / "w_train.uint16.npy").max() < made and not list(out.glob("*.uint32.npy"))
    assert f"(uint16, vocab {made:,} of the 65,537 asked)" in r.stdout.splitlines()[-1], r.stdout
    assert f"vocab {made:,} of the 65,537 asked: the text has no pair left to merge" in r.stdout, r.stdout


def test_copy_as_validation_text(world):
    # a byte-for-byte copy is another file: allowed, with one warning on stderr
    out = world / "copy_val"
    r = run("--train-text", STORY, "--val-text", world / "story_copy.txt", "--out-dir", out, "--vocab-size", 270)
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("prepare: warning:")]
    assert len(warnings) == 1 and "is a copy of the training text" in warnings[0], r.stderr
    train, val = (np.load(out / f"tinystories_sample_{s}.uint16.npy") for s in ("train", "val"))
    assert train.tolist() == val.tolist()


def mount_tmpfs(folder: Path, options: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"can not mount a tmpfs here: {r.stderr.decode().strip()}")


def unmount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], capture_output=True, timeout=30)


def test_read_only_folder(world):
    folder = world / "read_only"
    if os.geteuid() == 0:  # root writes through permission bits: a read-only mount is the honest test
        mount_tmpfs(folder, "size=64k,ro")
    else:
        folder.mkdir()
        folder.chmod(0o555)
    try:
        r = run("--train-text", STORY, "--out-dir", folder, "--vocab-size", 270)
        one_error_line(r, "read-only file system" if os.geteuid() == 0 else "ermission denied")
    finally:
        unmount(folder) if os.geteuid() == 0 else folder.chmod(0o755)


@pytest.mark.skipif(os.geteuid() != 0, reason="a full disk is a small tmpfs, which needs root to mount")
def test_full_disk(world):
    disk = world / "full_disk"
    mount_tmpfs(disk, "size=300k")
    try:
        r = run("--train-text", STORY, "--out-dir", disk, "--name", "small", "--vocab-size", 270, "--no-progress")
        assert r.returncode == 0, r.stderr  # a small dataset fits
        before = snapshot(disk)
        r = run(
            "--train-text", world / "big.txt", "--out-dir", disk, "--name", "big", "--vocab-size", 270, "--no-progress"
        )
        one_error_line(r, f"{disk / 'big_train.uint16.npy'}: no space left on device")
        assert snapshot(disk).items() >= before.items()  # the small dataset is intact
        assert not list(disk.glob("*.partial")) and not list(disk.glob(".*.tmp"))  # no half-written array left
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True, timeout=30)
        r = run(
            "--train-text", world / "big.txt", "--out-dir", disk, "--name", "big", "--vocab-size", 270, "--no-progress"
        )
        assert r.returncode == 0 and "reusing the tokenizer" in r.stdout, r.stdout + r.stderr  # resumes
    finally:
        unmount(disk)


def test_ctrl_c(world):
    # --no-progress: on a fast machine BPE is done within the wait and encoding's progress bar is on stderr too
    args = ["--train-text", world / "big.txt", "--out-dir", world / "ctrl_c", "--vocab-size", 2000, "--threads", 2]
    proc = start(*args, "--no-progress")
    wait_for_line(proc, "training BPE")
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "prepare: interrupted\n", (proc.returncode, err[-2000:])


def test_two_at_once_then_kill_9(world):
    args = ["--train-text", world / "big.txt", "--name", "d", "--vocab-size", 300, "--threads", 2, "--no-progress"]
    clean = world / "clean"
    prepare(world / "big.txt", out_dir=clean, name="d", vocab_size=300, progress=False, num_processes=1)
    out = world / "killed"
    first = start(*args, "--out-dir", out)
    try:
        wait_for_line(first, "training BPE")  # it holds the lock now
        os.killpg(first.pid, signal.SIGSTOP)  # and keeps it, however slow the second one is to start
        r = run(*args, "--out-dir", out)
        one_error_line(r, f"another prepare (pid {first.pid}) is writing d in {out}")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # kill -9 number 1: mid-training, lock held
        first.wait(timeout=30)
    rng = random.Random(0)
    # kills during BPE, during encoding (the tokenizer just trained, or reused if the last kill came after it; on a
    # fast machine the last kill may even have come after the end), then anywhere
    encoding = ("trained", "reusing the tokenizer", "up to date")
    for wait_for, delay in [("training BPE", 0.5), (encoding, 0.3), (None, 4.0)]:
        proc = start(*args, "--out-dir", out)
        if wait_for:
            wait_for_line(proc, wait_for)
        time.sleep(rng.uniform(0, delay))
        os.killpg(proc.pid, signal.SIGKILL)  # the process and its BPE workers, as a crash or the OOM killer would
        proc.wait(timeout=30)
    r = run(*args, "--out-dir", out, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in OUTPUTS:
        assert (out / f).read_bytes() == (clean / f).read_bytes(), f
    assert not list(out.glob("*.partial")) and np.load(out / "d_val.uint16.npy").size > 0
