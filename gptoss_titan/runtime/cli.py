"""The one place our exceptions become exit codes, for every command line (train, sample, the
config check, the launch check, the scripts):

  0  done
  2  bad input (UserError: config, data, checkpoint paths, flags, damaged files): one line
  3  the run stopped itself (TrainingStopped: too many skipped steps, a failed save): one line
  1  a collective failed because another rank died (CollectiveFailed: one line; the launcher,
     runtime/launcher.py, names the rank that died) - or a bug, with its traceback
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

from .errors import CollectiveFailed, TrainingStopped, UserError


def error_line(message: object) -> None:
    """What a command prints for a failure it names: `error: <message>` on stderr."""
    print(f"error: {message}", file=sys.stderr)


def report_to_launcher(message: str, consequence: bool = False) -> None:
    """Write the one line into torchrun's error file for this worker (when there is one), where the
    launcher (runtime/launcher.py) reads it for a rank whose own output is not shown."""
    from .distributed import launcher_error_file

    path = launcher_error_file()
    if path:
        try:
            with open(path, "w") as f:
                data = {"message": message, "timestamp": int(time.time()), "gptoss_titan": True}
                json.dump({**data, "consequence": consequence}, f)
        except OSError:
            pass  # the line was printed; the launcher falls back to naming the rank


def run_cli(
    body: Callable[[], int | None], on_error: Callable[[], None] | None = None, show: bool = True
) -> int:
    """Run a command's body: its exit code (None = 0), or 2 for a UserError and the error's own
    code for TrainingStopped and CollectiveFailed, printed as one line (only where `show`, e.g. on rank 0); `on_error`
    runs before returning a failure (e.g. leave the process group without waiting)."""
    try:
        return body() or 0
    except (UserError, TrainingStopped, CollectiveFailed) as e:
        # the error file first: a worker stopped by the agent right after printing its line is
        # then known to have said it (the launcher does not repeat it)
        report_to_launcher(str(e), consequence=isinstance(e, CollectiveFailed))
        if show:
            error_line(e)
        if on_error is not None:
            try:
                on_error()
            except Exception:  # the line is said; a cleanup that fails after it adds nothing
                # (measured: a CollectiveFailed on rank 0 as the agent stops its data-loader worker:
                # the loader's SIGCHLD handler raised from shutdown's gc.collect, a traceback after the line)
                pass
        return 2 if isinstance(e, UserError) else e.exit_code


def exit_now(code: int) -> None:
    """End a command line that has finished (its files closed, its process group gone) without the
    interpreter's teardown: after torch, dynamo and DCP are loaded that alone takes 0.4-0.9 s per
    process, and the C++ destructors it runs can abort a process whose work succeeded
    (`terminate called without an active exception`: runtime/distributed.py's shutdown). Falls
    back to a normal exit (sys.exit) where the teardown still has work: a non-daemon thread still
    running or a child process still alive (e.g. data-loader workers)."""
    import logging
    import multiprocessing
    import os
    import threading

    if "torch._inductor.async_compile" in sys.modules:  # compile worker processes: asked to stop
        sys.modules["torch._inductor.async_compile"].shutdown_compile_workers()
    busy = [
        t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()
    ]
    if busy or multiprocessing.active_children():
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
