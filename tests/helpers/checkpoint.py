"""Checkpointing runs: the bench-flavor trainer arguments with checkpoints, and the full weights of a
DCP step folder."""

from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from ..conftest import synthetic_data


def base_args(tmp: Path, run: str, *extra: str) -> list[str]:
    """6 steps of 4 x 32 tokens of the bench flavor (fp32, deterministic), a checkpoint every 3 steps,
    in tmp/run on synthetic data in tmp/data (made on first use)."""
    data = tmp / "data"
    if not data.exists():
        synthetic_data(data)
    return [
        "--model.flavor=bench",
        f"--data.dataset_path={data}",
        f"--job.dump_folder={tmp / run}",
        "--training.seq_len=32",
        "--training.local_batch_size=4",
        "--training.steps=6",
        "--metrics.log_freq=1",
        "--validation.enable=false",
        "--lr_scheduler.warmup_steps=2",
        "--lr_scheduler.decay_steps=4",  # the schedule must not depend on where a run stops
        "--optimizer.lr=1e-3",
        "--training.deterministic=true",
        "--checkpoint.enable=true",
        "--checkpoint.interval=3",
        *extra,
    ]


def weights(step_dir: Path) -> dict:
    """The model's full state dict saved in a DCP step folder (converted to step-<N>.pt beside it)."""
    out = step_dir.parent / f"{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, out)
    return torch.load(out)["model"]
