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
