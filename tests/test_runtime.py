"""`cs336_nb.runtime` with real processes: the lock between two processes, `kill -9` of its holder, and
what `run_cli` makes of each kind of error: the exit code and the stderr of a process.

Each case runs `run_cli("tiny", scenario, case)`. Most run in a forked child (this process's imports,
so no 2 s torch import each); the two that only a real interpreter can show (a bug's traceback, and
Python's own flush of a closed stdout at exit) run as `python -c`, started together. Every wait has a
timeout.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from cs336_nb.runtime import DirectoryLock, atomic_write_text, run_cli


def scenario(case, arg):
    """The body of the tiny command: one fault per case."""
    if case == "value":
        raise ValueError("--lr must be positive, got -1\n(use a positive number)")
    if case == "permission":
        os.chmod(arg, 0)
        open(arg).read()  # root reads it anyway: then the error a user without root meets
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), arg)
    if case == "enospc":

        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        os.fsync = full  # the disk fills up while the file is written
        atomic_write_text(arg, "x" * 1000)
    if case == "interrupt":
        print("ready", flush=True)
        time.sleep(30)
    if case == "hold":
        DirectoryLock(arg, owner="tiny").acquire()
        print(f"held {os.getpid()}", flush=True)
        time.sleep(30)
    if case == "bug":
        return {}["missing"]
    if case == "pipe":
        for i in range(1_000_000):
            print(f"line {i}", flush=True)


class Forked:
    """`run_cli("tiny", scenario, case, arg)` in a forked child (this process's imports, so no 2 s torch import)."""

    def __init__(self, tmp, case, arg=None):
        self.out, self.err = tmp / f"{case}.out", tmp / f"{case}.err"
        self.pid = os.fork()
        if self.pid == 0:  # the child: stdout and stderr to files, exit with run_cli's code
            code = 1
            try:
                sys.stdout = open(self.out, "w", buffering=1)
                sys.stderr = open(self.err, "w", buffering=1)
                run_cli("tiny", scenario, case, arg)
                code = 0
            except SystemExit as e:
                code = e.code
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

    def wait(self, timeout=30):
        """The exit code (negative: killed by that signal) and stderr."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status), self.err.read_text()
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise TimeoutError(f"child {self.pid} did not finish in {timeout} s")
            time.sleep(0.01)

    def wait_for_line(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.out.exists() and self.out.read_text().endswith("\n"):
                return self.out.read_text()
            time.sleep(0.01)
        raise TimeoutError("no output from the child")


# a real interpreter for what only one can show: the traceback of a bug, and Python's own flush at exit
TINY = """
import sys
from cs336_nb.runtime import run_cli
from test_runtime import scenario
run_cli("tiny", scenario, sys.argv[1], None)
"""


@pytest.fixture(scope="module")
def real():
    """Start the real-interpreter cases at once (a torch import takes ~2 s each); kill what is left at the end."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "CS336_MALLOC_TUNING": "0"}
    procs = {
        case: subprocess.Popen(
            [sys.executable, "-c", TINY, case], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for case in ("bug", "pipe")
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_value_error_is_one_line_exit_2(tmp_path):
    code, err = Forked(tmp_path, "value").wait()
    assert (code, err) == (2, "tiny: error: --lr must be positive, got -1 (use a positive number)\n")


def test_permission_error_names_the_file(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("x")
    code, err = Forked(tmp_path, "permission", path).wait()
    fix = "check its permissions, or choose a location you can write to"
    assert (code, err) == (2, f"tiny: error: {path}: permission denied ({fix})\n")


def test_full_disk_names_the_target_and_keeps_nothing(tmp_path):
    path = tmp_path / "out" / "config.json"
    code, err = Forked(tmp_path, "enospc", path).wait()
    fix = "the disk is full: free some space or choose another location"
    assert (code, err) == (2, f"tiny: error: {path}: no space left on device ({fix})\n")
    assert sorted(path.parent.iterdir()) == []  # no target, no temporary file


def test_ctrl_c_exits_130_in_one_line(tmp_path):
    child = Forked(tmp_path, "interrupt")
    assert child.wait_for_line() == "ready\n"
    os.kill(child.pid, signal.SIGINT)
    assert child.wait() == (130, "tiny: interrupted\n")


def test_a_bug_keeps_its_traceback_and_exits_1(real):
    proc = real["bug"]
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert err.startswith("Traceback (most recent call last):") and err.rstrip().endswith("KeyError: 'missing'"), err
    assert "tiny: error" not in err


def test_a_closed_pipe_ends_quietly(real):
    proc = real["pipe"]
    assert proc.stdout.readline() == "line 0\n", proc.stderr.read() if proc.poll() is not None else ""
    proc.stdout.close()  # the reader goes away, as `head` does
    code = proc.wait(60)
    err = proc.stderr.read()
    assert (code, err) == (141, ""), err


def test_second_process_refused_then_takes_over_after_kill_9(tmp_path):
    run_dir = tmp_path / "run"
    holder = Forked(tmp_path, "hold", run_dir)
    assert holder.wait_for_line() == f"held {holder.pid}\n"
    record = json.loads((run_dir / ".lock").read_text())
    assert (record["pid"], record["owner"]) == (holder.pid, "tiny")
    with pytest.raises(ValueError, match=rf"in use by tiny \(pid {holder.pid} on .* \(wait for it to finish"):
        DirectoryLock(run_dir).acquire()
    os.kill(holder.pid, signal.SIGKILL)
    assert holder.wait()[0] == -signal.SIGKILL  # reaped: the kernel has dropped its lock
    lock = DirectoryLock(run_dir, owner="test").acquire()
    try:
        assert lock.took_over is not None and f"from tiny (pid {holder.pid} on " in lock.took_over, lock.took_over
        assert "\n" not in lock.took_over
        assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert (run_dir / ".lock").read_text() == ""
    with DirectoryLock(run_dir) as clean:
        assert clean.took_over is None


def test_errno_table_covers_the_faults_users_meet():
    from cs336_nb.runtime import describe_os_error

    for number in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EISDIR, errno.ENOTDIR):
        message = describe_os_error(OSError(number, os.strerror(number), "/some/file"))
        assert message is not None and message.startswith("/some/file: ") and message.endswith(")"), message
    assert describe_os_error(OSError(errno.ECONNRESET, "reset")) is None  # not a user's fault: a traceback
