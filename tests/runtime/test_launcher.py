"""The launcher's choice of exit code and line among torchrun's failures (runtime/launcher.py); the
launcher through run_train.sh is tested in tests/reliability/test_launcher.py."""

import signal
from dataclasses import dataclass

from gptoss_titan.runtime.launcher import _shown, exit_code


@dataclass
class Failure:  # what torchrun's ProcessFailure carries
    exitcode: int
    timestamp: int
    pid: int = 100
    local_rank: int = 0
    error_file_data: dict | None = None


def test_the_worst_failure_decides():
    term, kill = -signal.SIGTERM, -signal.SIGKILL
    # a worker's exit 2 (its one line already printed) wins over the agent's SIGTERM of the others
    assert exit_code({0: Failure(term, 5), 1: Failure(2, 5)}) == (2, None)
    assert exit_code({0: Failure(3, 9), 1: Failure(1, 1)}) == (3, None)
    code, line = exit_code({0: Failure(term, 1), 1: Failure(kill, 2, pid=7)})
    assert code == 137 and line.startswith("rank 1 (pid 7) died by SIGKILL (the out-of-memory killer")
    # a rank killed outright is the cause; the others then fail in their collectives (exit 1, marked)
    peer = {"message": "rank 0: a collective failed", "gptoss_titan": True, "consequence": True}
    assert exit_code({0: Failure(1, 1, error_file_data=peer), 1: Failure(kill, 2)})[0] == 137
    # a bug (exit 1, unmarked) is the cause of the SIGKILLs the agent sends after its grace
    assert exit_code({0: Failure(1, 5), 1: Failure(kill, 5)})[0] == 1
    code, line = exit_code({2: Failure(1, 4), 3: Failure(1, 3)})
    assert code == 1 and line.startswith("rank 3 ") and "its output is above" in line
    assert exit_code({1: Failure(term, 1)})[0] == 143
    # a worker's own line is repeated when its rank's output is filtered out (LOG_RANK)
    own = {"message": "shard 'x' holds token id 9 >= the model's vocab_size 8", "gptoss_titan": True}
    failures = {0: Failure(term, 1), 1: Failure(2, 1, local_rank=1, error_file_data=own)}
    assert exit_code(failures, shown={0}) == (
        2,
        "rank 1: shard 'x' holds token id 9 >= the model's vocab_size 8",
    )
    assert exit_code(failures, shown=None) == (2, None)  # shown already
    both = {0: Failure(2, 9, error_file_data=own), 1: Failure(2, 1, local_rank=1, error_file_data=own)}
    assert exit_code(both, shown={0}) == (2, None)  # the shown rank's line is enough, even if later
    # the shown rank met the same error and printed it, but the agent's SIGTERM ended it first
    raced = {0: Failure(term, 2, error_file_data=own), 1: Failure(2, 1, local_rank=1, error_file_data=own)}
    assert exit_code(raced, shown={0}) == (2, None)


def test_local_ranks_filter():
    assert _shown("") is None and _shown("0") == {0} and _shown("0,2") == {0, 2}
