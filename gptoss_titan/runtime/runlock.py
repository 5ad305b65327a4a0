"""One run per run folder: an advisory lock that rank 0 holds for the whole run.

`<dump_folder>/.run.lock` is locked with `fcntl.flock` (the kernel releases it when the holder
process dies, however it dies) and records who holds it: host, pid, start time. A second run on
the same folder gets one line naming the holder and exits 2; a lock whose holder is gone is taken
over with a warning naming it. On network filesystems flock follows the filesystem's own lock
semantics (NFSv4: held across nodes; a crashed node's lock ends with its lease).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import UserError

LOCK_FILE = ".run.lock"


class RunFolderBusy(UserError):
    """Another run holds the run folder."""


class RunLock:
    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock (the folder must exist). Returns a warning when a gone holder's lock was
        taken over; raises RunFolderBusy naming the holder when a live run holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderBusy(
                f"run folder {str(self.path.parent)!r} is in use by {self._holder()}; wait for "
                "that run to end (or stop it), or choose another --job.dump_folder"
            ) from None
        previous = self._holder() if os.fstat(fd).st_size else None
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        if previous is not None:
            return f"took over the run folder's lock from {previous}, which is gone (the run ended without releasing it)"
        return None

    def _holder(self) -> str:
        try:
            h = json.loads(self.path.read_text())
            return f"pid {h['pid']} on {h['host']} (started {h['started']})"
        except (OSError, ValueError, KeyError):
            return "another process (holder unknown)"

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # a clean end leaves no holder to report
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def claim_run_folder(folder: Path, rank: int, world_size: int) -> RunLock:
    """Create the run folder and take its lock on rank 0; every rank learns the outcome (a busy
    folder raises RunFolderBusy on all of them). Returns the lock (held on rank 0 only)."""
    import torch.distributed as dist

    from .log import logger

    lock, error, warning = RunLock(folder), None, None
    if rank == 0:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            warning = lock.acquire()
        except RunFolderBusy as e:
            error = str(e)
        except OSError as e:
            error = f"run folder {str(folder)!r} cannot be created or locked ({e}); choose another --job.dump_folder"
    if world_size > 1:
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0)
        error = outcome[0]
    if error is not None:
        raise RunFolderBusy(error)
    if warning:
        logger.info(f"warning: {warning}")
    return lock
