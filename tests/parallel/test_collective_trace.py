"""Collective consistency of whole runs: every collective of every process group, on every rank,
in the same order with the same op, shapes and dtypes. PyTorch checks exactly that under
TORCH_DISTRIBUTED_DEBUG=DETAIL (each group wrapped: before each collective the ranks compare its
fingerprint and fail, naming both sides, on a mismatch). A mismatch that gloo would absorb on CPU
(sizes that happen to work, an all-reduce of another shape) is an error there, so it cannot wait
for NCCL to hang.

Here: that the check catches a mismatch. The runs that pass it are equivalence runs of each layout
family, with DETAIL set (their results record the level, and the tests assert it):
- FSDP 2 x EP 2: tests/parallel/test_equivalence.py, case fsdp2_ep2
- TP 2 (validation, checkpoints, balancing biases): tests/parallel/test_tensor_parallel.py, case tp2
- CP 2 with document masks (ring, validation, a sample): tests/parallel/test_context_parallel.py,
  case cp2 with documents
- PP 2 (1F1B, validation through the pipeline, checkpoints): tests/parallel/test_pipeline.py, case
  pp2_1f1b
- GRPO with TP 2 (rollouts' done flags, gathered logits, the rewards' all_gather_object, the
  update), through scripts/run_train.sh: tests/rl/test_grpo_run.py,
  test_tensor_parallel_equals_one_process
Not covered by the check: point-to-point sends (the pipeline's), whose order, sizes and dtypes the
pipeline tests match across the ranks (tests/parallel/p2p_trace.py)."""

import os
import subprocess
from pathlib import Path

import pytest

from ..conftest import python_cmd

pytestmark = pytest.mark.slow


def test_a_mismatched_collective_is_caught():
    r = subprocess.run(
        python_cmd(2, str(Path(__file__).parent / "mismatch_job.py")),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TORCH_DISTRIBUTED_DEBUG": "DETAIL"},
    )
    assert r.returncode != 0 and "went through" not in r.stdout
    assert "mismatch" in (r.stdout + r.stderr).lower()
