"""One wording for a failed write everywhere (checkpoint saves, converters, metrics.jsonl)."""

import errno

from gptoss_titan.runtime.errors import root_cause, write_reason


class Wrapped(Exception):  # DCP's CheckpointException: rank -> (error, traceback)
    def __init__(self, error: BaseException):
        super().__init__("wrapped")
        self.failures = {0: (error, "traceback text")}


def test_a_full_disk_is_named_however_it_is_wrapped(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device", "f.distcp")
    assert write_reason(full, tmp_path) == "no space left on device (f.distcp)"
    chained = RuntimeError("save failed")
    chained.__cause__ = full
    assert write_reason(Wrapped(chained), tmp_path) == "no space left on device (f.distcp)"
    assert root_cause(Wrapped(chained)) is full
    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    reason = write_reason(Wrapped(short), tmp_path)
    assert reason.startswith("a short write: no space left on device? ") and f"free in {tmp_path}" in reason


def test_other_write_errors_keep_their_reason_and_bugs_are_not_write_errors(tmp_path):
    assert write_reason(PermissionError(errno.EACCES, "Permission denied", "x"), tmp_path).startswith(
        "Permission denied (x)"
    )
    assert write_reason(ValueError("a bug"), tmp_path) is None
    assert write_reason(RuntimeError("another bug"), tmp_path) is None


def test_the_file_size_limit_is_named_when_set(tmp_path):
    import subprocess
    import sys

    code = (
        "import resource, errno; from gptoss_titan.runtime.errors import write_reason;"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096));"
        "print(write_reason(OSError(errno.EFBIG, 'File too large', 'x'), '.'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "File too large (x); files are limited to 4096 bytes (ulimit -f)"
