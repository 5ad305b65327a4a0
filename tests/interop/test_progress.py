"""Progress lines of a long conversion (progress.py): rate-limited, with bytes/s and time left."""

import io

from gptoss_titan.interop import progress
from gptoss_titan.interop.progress import Progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_lines_at_most_every_interval_and_a_last_one(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    p = Progress("export x", tensors=4, nbytes=8_000_000_000, every=2.0, stream=out)
    clock.now += 1.0
    p.update(1_000_000_000)  # 1 s after the start: too soon for a line
    assert out.getvalue() == ""
    clock.now += 1.0
    p.update(1_000_000_000)
    assert out.getvalue() == (
        "export x: 2/4 tensors, 2.00 GB of 8.00 GB, 1000.0 MB/s, 6 s left\n"  # 2 GB in 2 s, 6 GB to go
    )
    clock.now += 0.5
    p.update(1_000_000_000)  # 0.5 s after the last line: quiet
    clock.now += 0.5
    p.update(5_000_000_000)  # the last tensor: always a line, "done"
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[1] == "export x: 4/4 tensors, 8.00 GB of 8.00 GB, 2666.7 MB/s, done"


def test_no_rate_yet_means_unknown_time_left(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    p = Progress("import y", tensors=2, nbytes=10, stream=io.StringIO())
    assert p.line() == "import y: 0/2 tensors, 0.00 GB of 0.00 GB, 0.0 MB/s, ? s left"
