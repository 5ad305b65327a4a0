"""What the converters share (interop/files.py): temporary output folders named after their process,
the stale ones of killed conversions removed by the next run (and only those), write failures as
one line naming a full disk."""

import errno
import os
import subprocess
import sys

import pytest

from gptoss_titan.interop.files import (
    ConvertError,
    _host,
    publish,
    remove_stale_temps,
    temp_output,
    write_failure,
)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_rerun_removes_only_stale_temps_of_its_own_output(tmp_path, capsys):
    out, host = tmp_path / "hf", _host()
    stale = tmp_path / f".hf.{host}-{dead_pid()}-0123abcd.tmp"
    live = tmp_path / f".hf.{host}-{os.getpid()}-0123abcd.tmp"  # a conversion still running
    other = tmp_path / f".hf2.{host}-{dead_pid()}-0123abcd.tmp"  # another output's
    remote = tmp_path / f".hf.{host}x-{dead_pid()}-0123abcd.tmp"  # another machine's (shared storage)
    for p in (stale, live, other, remote):
        (p / "shard").mkdir(parents=True)
    tmp = temp_output(out, overwrite=False)
    assert not stale.exists() and live.exists() and other.exists() and remote.exists()
    assert f"removed {stale}, left by a conversion that was killed" in capsys.readouterr().err
    assert tmp.name.startswith(f".hf.{host}-{os.getpid()}-") and tmp.is_dir()
    (tmp / "model.safetensors").write_text("x")
    publish(tmp, out)
    assert (out / "model.safetensors").is_file() and not tmp.exists()
    assert remove_stale_temps(out) == []
    with pytest.raises(ConvertError, match="already exists; remove it or pass --overwrite"):
        temp_output(out, overwrite=False)


def test_write_failures_are_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(
        ConvertError, match=r"cannot write beside .* \(Not a directory .*\); choose another --output"
    ):
        temp_output(blocker / "out", overwrite=False)
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.safetensors"))
    e = write_failure(full, tmp_path / "out")
    assert "(no space left on device (" in str(e) and "nothing was kept" in str(e)

    class Wrapped(Exception):  # DCP's CheckpointException: rank -> (error, traceback)
        failures = {
            0: (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"), "tb")
        }

    assert "a short write: no space left on device?" in str(write_failure(Wrapped(), tmp_path / "out"))
    assert write_failure(ValueError("a bug"), tmp_path / "out") is None  # keeps its traceback
