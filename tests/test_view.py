"""End-to-end checks of the notebook view (`cs336_nb.view`): `watch` following training CLI runs in
subprocesses as they write, `train` in a real Jupyter kernel (nbclient + ipykernel), and `train` in a
terminal, whose output must be the training CLI's own.

What the view shows is checked against the run's own records: the lines of its stdout and of its
metrics.jsonl, read here independently of the view's code.
"""

import html
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest
from conftest import ROOT, TINY_MODEL, TINY_RUN, flags, write_tiny_tokens
from nbclient import NotebookClient

from cs336_nb.runtime import MALLOC_TUNABLES, DirectoryLock
from cs336_nb.view import LiveView, watch

EVAL_LINE = re.compile(r"\[EVAL\] iter +(\d+) \| val_loss (\S+) \| val_ppl (\S+)")


def settings(tmp: Path, run: str, **more) -> dict:
    """The tiny model's settings, with its data in `tmp` and its run directory `tmp/run`."""
    return {
        **TINY_MODEL,
        **TINY_RUN,
        "train_data": tmp / "train.npy",
        "val_data": tmp / "val.npy",
        "checkpoint_dir": tmp / run,
        "threads": 1,
        **more,
    }


def start_cli(tmp: Path, run: str, **more) -> subprocess.Popen:
    """`python -m cs336_nb.train` on the tiny model in a subprocess, its stdout captured."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "cs336_nb.train", *flags(**settings(tmp, run, **more))]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def log_lines(stdout: str) -> list[str]:
    """The per-step and evaluation lines of a training log."""
    return [line for line in stdout.splitlines() if line.startswith(("iter ", "[EVAL]"))]


def watch_until(deadline: float, *args, **kwargs) -> dict:
    """`watch(*args, **kwargs)` in a thread; fails, instead of hanging, if it has not returned within `deadline` s."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(ended=watch(*args, **kwargs)), daemon=True)
    thread.start()
    thread.join(deadline)
    assert not thread.is_alive(), f"watch did not return within {deadline} s"
    return result["ended"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("view")
    write_tiny_tokens(folder)
    return folder


@pytest.fixture(scope="module")
def finished(data) -> tuple[Path, str]:
    """A finished CLI run of 12 steps: (its run directory, its stdout)."""
    proc = start_cli(data, "finished", max_iters=12)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return data / "finished", out


def test_watch_follows_a_cli_run_as_it_writes_and_returns_when_it_ends(data, capsys, monkeypatch):
    seen = []  # per record the view receives: (when, the run's exit status then: None while it runs)

    def record(self, record):
        seen.append((time.monotonic(), proc.poll()))
        real_record(self, record)

    real_record = LiveView.record
    monkeypatch.setattr(LiveView, "record", record)
    proc = start_cli(data, "followed", max_iters=300, log_interval=5, eval_interval=100, checkpoint_interval=150)
    ended = watch_until(120, data / "followed", poll=0.1, notebook=False)  # before the run claims its directory
    released = (data / "followed" / ".lock").read_text()  # read at once: the run had ended when watch returned
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert ended == {"followed": "finished"} and released == ""
    # the view got the records while the run was still training, not all at the end
    assert seen and seen[0][1] is None, "the first record arrived after the run had exited"
    # in a terminal, watch prints the run's own log lines, exactly and in order, then how it ended
    printed = capsys.readouterr().out.splitlines()
    assert printed[:-1] == log_lines(out)
    assert printed[-1] == "followed: finished at step 300/300"
    written = [json.loads(line) for line in (data / "followed" / "metrics.jsonl").read_text().splitlines()]
    assert len(seen) == len(written)


def test_watch_says_a_killed_run_stopped(data, capsys):
    proc = start_cli(data, "killed", max_iters=100_000, log_interval=10, eval_interval=100_000)
    try:
        metrics = data / "killed" / "metrics.jsonl"
        deadline = time.monotonic() + 60
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 3) and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)  # no clean release: the lock file still names the dead process
        ended = watch_until(60, data / "killed", poll=0.1, notebook=False)
    finally:
        proc.kill()
        proc.wait()
    assert ended == {"killed": "stopped"}
    assert json.loads((data / "killed" / ".lock").read_text())["pid"] == proc.pid
    assert capsys.readouterr().out.splitlines()[-1].startswith("killed: stopped at step ")


def test_watch_reads_a_torn_line_once_whole(tmp_path, capsys):
    # a writer in this process: it holds the lock, writes config.json, then records, one of them in two halves
    # with pauses that let watch read the first half alone
    run = tmp_path / "torn"
    records = [
        {"type": "train", "step": 0, "time_s": 0.1, "loss": 4.5},
        {"type": "eval", "step": 2, "time_s": 0.3, "val_loss": 4.25, "val_ppl": 70.1},
        {"type": "train", "step": 2, "time_s": 0.4, "loss": 4.0},
    ]
    holding = threading.Event()

    def write():
        with DirectoryLock(run, owner="train"):
            (run / "config.json").write_text(json.dumps({"max_iters": 3}))
            holding.set()
            with open(run / "metrics.jsonl", "w") as f:
                for record in records:
                    line = json.dumps(record) + "\n"
                    f.write(line[:17])
                    f.flush()
                    time.sleep(0.3)
                    f.write(line[17:])
                    f.flush()
                    time.sleep(0.3)

    writer = threading.Thread(target=write)
    writer.start()
    holding.wait(10)
    ended = watch_until(60, run, poll=0.05, notebook=False)
    writer.join()
    assert ended == {"torn": "finished"}
    assert capsys.readouterr().out.splitlines() == [
        "iter      0 | loss 4.5000",
        "[EVAL] iter      2 | val_loss 4.2500 | val_ppl 70.10",
        "iter      2 | loss 4.0000",
        "torn: finished at step 3/3",
    ]


def test_watch_waits_for_a_run_then_gives_up(tmp_path, capsys):
    began = time.monotonic()
    assert watch(tmp_path / "never", poll=0.05, wait=0.5, notebook=False) == {"never": "not running"}
    assert 0.5 <= time.monotonic() - began < 10


def test_an_interrupted_watch_leaves_the_run_alone(tmp_path, capsys):
    # a run that goes on (its lock held by this process) and a cell interrupted after a second
    run = tmp_path / "going_on"
    with DirectoryLock(run, owner="train"):
        (run / "config.json").write_text(json.dumps({"max_iters": 100}))
        (run / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 4, "time_s": 1.0, "loss": 3.0}) + "\n")
        timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))  # what Jupyter's interrupt sends
        timer.start()
        ended = watch(run, poll=0.05, notebook=False)
        timer.join()
        assert (run / ".lock").read_text() != ""  # still held: watching never touches the run
    assert ended == {"going_on": "watched"}
    assert capsys.readouterr().out.splitlines() == [
        "iter      4 | loss 3.0000",
        "stopped watching; the runs go on: going_on: running at step 5/100",
    ]


def test_view_of_a_finished_run_matches_its_records(finished):
    run_dir, out = finished
    view = LiveView(notebook=False)
    view.start(json.loads((run_dir / "config.json").read_text()), 0, 12)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        view.record(json.loads(line))
    view.close()
    text = repr(view.panel()).splitlines()
    assert text[0].startswith("finished: 12/12 steps | ")
    iteration, val_loss, val_ppl = EVAL_LINE.fullmatch(log_lines(out)[-1]).groups()
    rows = [line.split(" | ") for line in text if re.fullmatch(r"\d+ \| .*", line)]
    assert [row[0] for row in rows] == [m[1] for m in map(EVAL_LINE.fullmatch, log_lines(out)) if m]
    assert [rows[-1][0], rows[-1][2], rows[-1][3]] == [iteration, val_loss, val_ppl]


# ---- in a real Jupyter kernel


def run_in_kernel(cells: list[str], cwd: Path) -> nbformat.NotebookNode:
    """Execute `cells` in a fresh python3 kernel (errors kept in the outputs); returns the executed notebook."""
    book = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = NotebookClient(book, timeout=300, kernel_name="python3", allow_errors=True)
    client.resources = {"metadata": {"path": str(cwd)}}
    client.execute()
    return book


def outputs(cell) -> tuple[list[str], list[str]]:
    """The cell's final HTML outputs and whether it has a PNG, after the display updates were applied."""
    assert not [o for o in cell.outputs if o.output_type == "error"], [o.get("evalue") for o in cell.outputs]
    htmls = [o.data["text/html"] for o in cell.outputs if "text/html" in o.get("data", {})]
    pngs = [o.data["image/png"] for o in cell.outputs if "image/png" in o.get("data", {})]
    return htmls, pngs


@pytest.fixture(scope="module")
def kernel(data, finished):
    """One kernel session: a run trained in-process with `train`, then `watch` of a finished CLI run and of both."""
    run_dir, _ = finished
    tiny = {k: str(v) for k, v in settings(data, "in_kernel", max_iters=8).items()}
    # a learning rate that makes the loss overflow in a few steps: the run stops with an error
    exploding = {k: str(v) for k, v in settings(data, "exploding", max_iters=8, max_lr=1e12, grad_clip=0).items()}
    cells = [
        "from cs336_nb.view import train, watch",
        f"summary = train({tiny!r})",
        f"watch({str(run_dir)!r}, poll=0.1)",
        f"watch([{str(run_dir)!r}, {str(data / 'in_kernel')!r}], poll=0.1)",
        f"train({exploding!r})",
    ]
    return run_in_kernel(cells, data)


def test_training_in_a_kernel_cell_draws_the_live_view(kernel, data):
    htmls, pngs = outputs(kernel.cells[1])
    assert len(htmls) == 1 and htmls[0].startswith('<div class="cs336-view">'), htmls
    assert "8/8 steps | " in htmls[0] and "<table>" in htmls[0], htmls[0]
    assert len(pngs) == 1 and pngs[0].startswith("iVBORw0KGgo")  # base64 of the PNG signature
    records = [json.loads(line) for line in (data / "in_kernel" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["type"] == "eval"][-1]
    row = f"<tr><td>8</td><td>{{}}</td><td>{last['val_loss']:.4f}</td><td>{last['val_ppl']:.2f}</td></tr>"
    train_loss = [r for r in records if r["type"] == "train" and r["step"] < 8][-1]["loss"]
    assert row.format(f"{train_loss:.4f}") + "</tbody>" in htmls[0], htmls[0]


def test_watch_in_a_kernel_keeps_the_final_state(kernel, finished):
    _, out = finished
    htmls, pngs = outputs(kernel.cells[2])
    assert len(htmls) == 1 and len(pngs) == 1
    assert "12/12 steps | " in htmls[0]
    iteration, val_loss, val_ppl = EVAL_LINE.fullmatch(log_lines(out)[-1]).groups()
    assert re.search(
        rf"<tr><td>{iteration}</td><td>[^<]+</td><td>{val_loss}</td><td>{val_ppl}</td></tr></tbody>", htmls[0]
    )
    assert "finished: finished at step 12/12" in htmls[0]
    # two runs: one comparison, a row each and one figure
    htmls, pngs = outputs(kernel.cells[3])
    assert len(htmls) == 1 and len(pngs) == 1
    assert htmls[0].count("<tr>") == 3 and htmls[0].count("<td>finished</td></tr>") == 2, htmls[0]


def test_a_failed_run_in_a_kernel_shows_its_error(kernel):
    cell = kernel.cells[4]
    htmls = [o.data["text/html"] for o in cell.outputs if "text/html" in o.get("data", {})]
    stderr = "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stderr")
    errors = [o for o in cell.outputs if o.output_type == "error"]
    assert stderr.startswith("train: error: ") and len(stderr.strip().splitlines()) == 1, stderr  # the CLI's line
    assert errors, "the cell must fail, so that Run All stops there"
    message = stderr.removeprefix("train: error: ").strip()
    assert len(htmls) == 1 and "background:#c9302c" in htmls[0], htmls  # the bar turned red
    assert f"<b>error:</b> {html.escape(message)}</div>" in htmls[0], (message, htmls[0][-600:])


# ---- in a terminal


def test_train_in_a_terminal_prints_what_the_cli_prints(data, tmp_path):
    # the same run twice, each from its own folder with a relative run directory, so that the paths printed agree
    argv = flags(**{**settings(data, "run", max_iters=6), "checkpoint_dir": "run"})
    # both under the malloc settings the CLI relaunches itself with, so that it runs as it is, without a relaunch
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "GLIBC_TUNABLES": MALLOC_TUNABLES}
    procs = []
    for folder, command in (("cli", ["-m", "cs336_nb.train"]), ("view", ["-c", VIEW_MAIN])):
        (tmp_path / folder).mkdir()
        procs.append(
            subprocess.run(
                [sys.executable, *command, *argv],
                cwd=tmp_path / folder,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
        )
    cli, view = procs
    assert cli.returncode == view.returncode == 0, (cli.stderr, view.stderr)
    timing = re.compile(r"[\d,.]+(ms| tok/s)")  # the only numbers that differ from run to run
    assert timing.sub("#", view.stdout) == timing.sub("#", cli.stdout)
    assert view.stderr == cli.stderr
    assert len(log_lines(view.stdout)) == 6 + 2  # every step, and the evaluations at 4 and 6


VIEW_MAIN = "import sys; from cs336_nb.view import train; train(sys.argv[1:])"
