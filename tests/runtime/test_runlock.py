"""One run per run folder (runtime/runlock.py): the lock, the holder it names, a stale lock taken over."""

import json
import os
import socket

import pytest

from gptoss_titan.runtime.runlock import LOCK_FILE, RunFolderBusy, RunLock, claim_run_folder


def test_a_held_folder_is_busy_until_released(tmp_path):
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    assert first.acquire() is None  # a fresh folder: nothing taken over
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    # flock is per open file: a second open of the lock file conflicts, in this process too
    with pytest.raises(
        RunFolderBusy, match=rf"is in use by pid {os.getpid()} on {socket.gethostname()} \(started "
    ):
        second.acquire()
    first.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a clean end leaves no holder to report
    assert second.acquire() is None
    second.release()
    second.release()  # releasing twice is harmless


def test_a_gone_holders_lock_is_taken_over_with_a_warning(tmp_path):
    """A holder that died keeps its record in the file but no flock: the next run takes over."""
    info = {"host": "node7", "pid": 4242, "started": "2026-01-02 03:04:05"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(info) + "\n")
    lock = RunLock(tmp_path)
    warning = lock.acquire()
    assert warning == (
        "took over the run folder's lock from pid 4242 on node7 (started 2026-01-02 03:04:05), "
        "which is gone (the run ended without releasing it)"
    )
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_an_unreadable_holder_record(tmp_path):
    (tmp_path / LOCK_FILE).write_text("not json")
    lock = RunLock(tmp_path)
    assert "from another process (holder unknown)" in lock.acquire()
    lock.release()


def test_claim_run_folder_on_one_process(tmp_path):
    run = tmp_path / "a" / "run"
    lock = claim_run_folder(run, rank=0, world_size=1)  # creates the folder
    assert run.is_dir() and (run / LOCK_FILE).is_file()
    with pytest.raises(RunFolderBusy, match="choose another --job.dump_folder"):
        claim_run_folder(run, rank=0, world_size=1)
    lock.release()
    claim_run_folder(run, rank=0, world_size=1).release()
    (tmp_path / "file").write_text("")
    with pytest.raises(RunFolderBusy, match=r"run folder '.*file/run' cannot be created or locked"):
        claim_run_folder(tmp_path / "file" / "run", rank=0, world_size=1)
