"""Process-group start and clean shutdown, and the one place the device type is chosen."""

from __future__ import annotations

import ctypes
import gc
import os
import platform
from datetime import timedelta

import torch
import torch.distributed as dist


def device_type() -> str:
    """CUDA when present, else CPU (gloo)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def keep_freed_cpu_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse, as a caching allocator does (CPU training).

    By default glibc returns every block above its mmap threshold (at most 32 MiB) to the kernel
    when it is freed, so each step's fresh gradients and activations page-fault in again (the
    kernel zeroes every page): measured 150-200 ms of system time per step of the 64-expert bench
    model. Raising the mmap and trim thresholds keeps them in the heap; the resident size then
    stays at its peak, like CUDA's caching allocator. Returns False where libc is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1))


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
