"""A graceful stop (and the trainer's own stop when metrics.jsonl cannot be written): SIGTERM (scancel, preemption, the launcher stopping its workers), SIGINT
(Ctrl-C) and job.stop_signal (SIGUSR1 by default, for `sbatch --signal=USR1@120`) ask the run to
stop; every rank stops at the same step boundary, the trainer saves that step and exits with
128 + the signal's number. A second Ctrl-C (a second later or more: a terminal and the launcher
may deliver the first one twice) aborts at once, saving nothing.

The handler only records the request; `agreed()` turns it into one decision for all ranks, once
per step, over a gloo group of its own (a CPU scalar: no device sync, nothing mixed into the
training collectives).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

ABORT_AFTER_SECONDS = 1.0  # a SIGINT this long after the first one is a second Ctrl-C
METRICS_FAILED = 1000  # not a signal: metrics.jsonl could not be written (above every signal number)


class StopRequest:
    def __init__(self, extra_signal: str, distributed: bool, timeout_seconds: int = 300):
        """timeout_seconds: the group's collective timeout (the trainer lowers it with the others'
        after the first step: comm.train_timeout_seconds)."""
        self.signals = {signal.SIGTERM, signal.SIGINT, signal.Signals[extra_signal]}
        self.requested: int = 0  # the first signal's number, 0 = none
        self.first_at = 0.0
        self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        timeout = timedelta(seconds=timeout_seconds)
        self.group = dist.new_group(backend="gloo", timeout=timeout) if distributed else None

    def _handle(self, signum: int, frame) -> None:
        if not self.requested:
            self.requested, self.first_at = signum, time.monotonic()
            return
        if signum == signal.SIGINT and time.monotonic() - self.first_at > ABORT_AFTER_SECONDS:
            print("error: aborted by a second Ctrl-C; nothing was saved", file=sys.stderr, flush=True)
            os._exit(128 + signal.SIGINT)

    def request(self, code: int) -> None:
        """Ask for a stop without a signal (METRICS_FAILED): decided with the others by agreed()."""
        if not self.requested:
            self.first_at = time.monotonic()  # a first Ctrl-C during this stop's save still saves
        self.requested = max(self.requested, code)

    def agreed(self) -> int:
        """The signal every rank stops for (the largest number any rank received), 0 = go on. A
        collective: every rank calls it at the same step."""
        if self.group is None:
            return self.requested
        t = torch.tensor(self.requested, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t)

    def close(self) -> None:
        """Give the signals back to what handled them before (the default: the process ends)."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
