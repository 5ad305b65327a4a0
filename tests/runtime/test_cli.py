"""run_cli (runtime/cli.py): the one mapping of our exceptions to exit codes and one line, and the
copy of that line in torchrun's error file for the launcher."""

import json
import signal
import subprocess
import sys

import pytest

from gptoss_titan.runtime.cli import run_cli
from gptoss_titan.runtime.errors import CollectiveFailed, StoppedBySignal, TrainingStopped, UserError


def raises(e: BaseException):
    def body():
        raise e

    return body


@pytest.mark.parametrize(
    "error, code",
    [
        (UserError("bad value 'x'; use 'y'"), 2),
        (TrainingStopped("3 steps in a row were skipped"), 3),
        (StoppedBySignal("stopped by SIGTERM at step 4", signal.SIGTERM), 143),
        (CollectiveFailed("rank 0: a collective failed"), 1),
    ],
)
def test_codes_and_one_line(error, code, capsys, tmp_path, monkeypatch):
    err_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(err_file))
    cleaned = []
    assert run_cli(raises(error), on_error=lambda: cleaned.append(1)) == code
    assert capsys.readouterr().err == f"error: {error}\n" and cleaned == [1]
    data = json.loads(err_file.read_text())
    assert data["message"] == str(error) and data["gptoss_titan"] is True


def test_success_silence_and_bugs(capsys, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    assert run_cli(lambda: None) == 0 and run_cli(lambda: 5) == 5
    assert run_cli(raises(UserError("not shown")), show=False) == 2
    assert capsys.readouterr().err == ""
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_cli(lambda: 1 / 0)


def test_a_failing_cleanup_adds_nothing_to_the_line(capsys, monkeypatch):
    """on_error runs after the line is said; if it raises too (a data-loader worker already stopped
    by the launcher: torch's SIGCHLD handler raises in shutdown's gc.collect), the exit code and
    the one line stay."""
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)

    def cleanup():
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")

    assert run_cli(raises(CollectiveFailed("rank 0: a collective failed")), on_error=cleanup) == 1
    assert capsys.readouterr().err == "error: rank 0: a collective failed\n"


def exit_now_in(tmp_path, body: str) -> subprocess.CompletedProcess:
    """`body` then exit_now(3) in a fresh interpreter, its output through pipes (block-buffered)."""
    code = f"import sys, threading, time, multiprocessing\nfrom gptoss_titan.runtime.cli import exit_now\n{body}\nexit_now(3)\n"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )


def test_exit_now_flushes_and_skips_the_teardown(tmp_path):
    """The fast path: the exit code, the buffered output flushed, and no atexit handler (the
    interpreter's teardown) run."""
    r = exit_now_in(
        tmp_path,
        "import atexit; atexit.register(print, 'teardown')\nprint('out'); print('err', file=sys.stderr)",
    )
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")


@pytest.mark.parametrize("work", ["thread", "child"])
def test_exit_now_waits_for_work_still_running(tmp_path, work):
    """A non-daemon thread (e.g. the background deletion of an old checkpoint) or a child process
    still running: the normal exit, which waits for them (their file is written), same code."""
    # the child lets go of the pipes first: subprocess.run then returns when the parent ends
    body = (
        "import os\n"
        "def work(child):\n"
        "    if child:\n"
        "        os.close(1), os.close(2)\n"
        "    time.sleep(0.5)\n"
        "    open('done', 'w').write('x')\n"
    )
    start = {
        "thread": "threading.Thread(target=work, args=(False,)).start()",
        "child": "multiprocessing.get_context('fork').Process(target=work, args=(True,)).start()",
    }[work]
    r = exit_now_in(tmp_path, body + start)
    assert r.returncode == 3 and (tmp_path / "done").read_text() == "x", r.stderr
