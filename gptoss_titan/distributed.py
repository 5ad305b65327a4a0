"""Process-group start and clean shutdown, and the one place the device type is chosen."""

from __future__ import annotations

import gc
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def device_type() -> str:
    """CUDA when present, else CPU (gloo)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(timeout_seconds: int = 300) -> tuple[int, int]:
    """Start the process group when launched with several processes; return (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if device_type() == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device_type() == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds))
    return dist.get_rank(), world


def shutdown() -> None:
    """gc before destroying the group: without it torchrun's exit sometimes aborts (CPU_NOTES.md)."""
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
