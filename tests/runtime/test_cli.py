"""run_cli (runtime/cli.py): the one mapping of our exceptions to exit codes and one line, and the
copy of that line in torchrun's error file for the launcher."""

import json
import signal

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
