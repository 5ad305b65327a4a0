"""Collective consistency of whole runs: every collective of every process group, on every rank,
in the same order with the same op, shapes and dtypes. PyTorch checks exactly that under
TORCH_DISTRIBUTED_DEBUG=DETAIL (each group wrapped: before each collective the ranks compare its
fingerprint and fail, naming both sides, on a mismatch), so runs of each layout go through the
launcher users call with it set. A mismatch that gloo would absorb on CPU (sizes that happen to
work, an all-reduce of another shape) is an error here, so it cannot wait for NCCL to hang.
Not covered by the check: point-to-point sends (the pipeline's), whose sizes the pipeline tests
compare against one process's results."""

import os
import subprocess
from pathlib import Path

import pytest

from ..conftest import python_cmd, run_train_sh

pytestmark = pytest.mark.slow
DETAIL = {"TORCH_DISTRIBUTED_DEBUG": "DETAIL", "NGPU": "2"}
SHORT = ("--model.flavor=debug", "--training.steps=2", "--checkpoint.enable=false", "--metrics.sample_freq=0",
         "--validation.enable=true", "--validation.freq=2", "--validation.steps=1")  # fmt: skip


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


@pytest.mark.parametrize(
    "layout",
    [
        ("--parallelism.tensor_parallel_degree=2",),
        ("--parallelism.expert_parallel_degree=2",),
        ("--parallelism.context_parallel_degree=2",),
        (
            "--parallelism.pipeline_parallel_degree=2",
            "--training.document_mask=false",
            "--training.global_batch_size=16",
        ),
    ],
    ids=["tp2", "fsdp2_ep2", "cp2", "pp2"],
)
def test_every_layout_agrees_on_its_collectives(tmp_path, layout):
    r = run_train_sh(DETAIL, f"--job.dump_folder={tmp_path / 'run'}", *SHORT, *layout)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "mismatch" not in r.stderr.lower()


def test_rl_with_tensor_parallelism_agrees_on_its_collectives(tmp_path):
    """Rollouts (the done flags, gathered logits), rewards' all_gather_object, the update."""
    r = run_train_sh(
        {**DETAIL, "CONFIG_FILE": "train_configs/grpo_debug.toml"}, f"--job.dump_folder={tmp_path / 'rl'}",
        "--checkpoint.initial_load_path=", "--checkpoint.enable=false", "--training.steps=2",
        "--rl.prompts_per_step=2", "--rl.group_size=4", "--rl.max_new_tokens=6", "--training.local_batch_size=4",
        "--parallelism.tensor_parallel_degree=2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
