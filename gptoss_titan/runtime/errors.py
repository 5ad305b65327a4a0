"""The base of every error a user can cause (a bad config value, path, file or flag).

Entry points run through `runtime/cli.run_cli`, which prints a `UserError` as one line
(`error: ...`) and exits with code 2, a `TrainingStopped` with its own code; each subclass lives
beside the code that raises it (ConfigError in config/, DataError here for data/, CheckpointError in
checkpoint/files.py, ConvertError in interop/, ...). Anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A problem the user can fix; the message names the bad value and the fix."""


class DataError(UserError):
    """A data problem: missing or malformed files, token ids outside the vocabulary, a bad tokenizer."""


class TrainingStopped(Exception):
    """The run stopped itself on purpose (too many skipped steps, a failed checkpoint save): one
    line, naming the last intact checkpoint; exit code 3."""

    exit_code = 3


class StoppedBySignal(TrainingStopped):
    """The run stopped on a signal at a step boundary (after saving it, when checkpoints are on):
    one line; exit code 128 + the signal's number, as the shell reports a signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class CollectiveFailed(Exception):
    """A collective failed because another rank stopped or died (the launcher names that rank):
    one line, exit code 1."""

    exit_code = 1


def root_cause(error: BaseException) -> BaseException:
    """The exception behind wrappers: DCP's CheckpointException (rank -> (exception, traceback))
    and `raise ... from` chains."""
    failures = getattr(error, "failures", None)
    if failures:
        error = next(iter(failures.values()))
        error = error[0] if isinstance(error, tuple) else error
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def write_reason(error: BaseException, folder) -> str | None:
    """Why a write into `folder` failed, in words, with a full disk named as such ("no space left
    on device"), also when a writer hides it (torch's zip writer reports a short write as
    'unexpected pos'), and the file-size limit when one is set; None when the error is not a write
    failure (a bug keeps its traceback)."""
    import errno

    error = root_cause(error)
    if isinstance(error, OSError):
        where = f" ({error.filename})" if error.filename else ""
        if error.errno == errno.ENOSPC:
            return "no space left on device" + where
        return (error.strerror or str(error)) + where + _file_size_limit()
    if isinstance(error, RuntimeError) and "unexpected pos" in str(error):
        import shutil

        try:
            free = f"{shutil.disk_usage(folder).free / 1e9:.1f} GB free in {folder}"
        except OSError:
            free = f"{folder} is not readable"
        return f"a short write: no space left on device? {free}{_file_size_limit()}"
    return None


def _file_size_limit() -> str:
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return "" if limit == resource.RLIM_INFINITY else f"; files are limited to {limit} bytes (ulimit -f)"
