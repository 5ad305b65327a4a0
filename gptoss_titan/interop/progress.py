"""Progress of a long conversion on stderr: tensors and bytes done, bytes/s, time left.

A 120b export writes ~65 GB (MXFP4) or ~230 GB (bf16); without this a converter is silent for
many minutes. One line at most every `every` seconds (and a last one), so logs stay short.
"""

from __future__ import annotations

import sys
import time


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


class Progress:
    def __init__(self, label: str, tensors: int, nbytes: int, every: float = 2.0, stream=None):
        self.label, self.tensors, self.nbytes, self.every = label, tensors, nbytes, every
        self.stream = stream or sys.stderr
        self.done_tensors, self.done_bytes = 0, 0
        self.start = self.last = time.monotonic()

    def update(self, nbytes: int, tensors: int = 1) -> None:
        self.done_tensors += tensors
        self.done_bytes += nbytes
        now = time.monotonic()
        if now - self.last >= self.every or self.done_tensors >= self.tensors:
            self.last = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        rate = self.done_bytes / elapsed
        left = (self.nbytes - self.done_bytes) / rate if rate > 0 else float("inf")
        eta = f"{left:.0f} s left" if left != float("inf") else "? s left"
        return (
            f"{self.label}: {self.done_tensors}/{self.tensors} tensors, {_gb(self.done_bytes)} of "
            f"{_gb(self.nbytes)}, {rate / 1e6:.1f} MB/s, {eta if self.done_tensors < self.tensors else 'done'}"
        )
