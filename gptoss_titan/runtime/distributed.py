"""Process-wide setup: the device, the process group, settings that hold for the whole process,
and clean shutdown. Entry points (train, sample) call these; constructors never do.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import signal
import warnings
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist

from .compat import TORCH_FLOOR, raise_recompile_limit, set_cuda_allocator_settings, torch_version
from .errors import CollectiveFailed, UserError


def device_type() -> str:
    """CUDA when present, else CPU (gloo). The one place the device type is chosen."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def local_device() -> torch.device:
    """This process's device: its GPU (set by init_distributed from LOCAL_RANK), else the CPU."""
    return (
        torch.device("cuda", torch.cuda.current_device()) if device_type() == "cuda" else torch.device("cpu")
    )


def launcher_error_file() -> str | None:
    """torchrun's error file for this worker (TORCHELASTIC_ERROR_FILE; None when not launched by
    it): a failed worker's one line goes there too, so the launcher can show it when this rank's
    output is filtered out (LOG_RANK)."""
    return os.environ.get("TORCHELASTIC_ERROR_FILE") or None


def world_size() -> int:
    """Processes in this job as the launcher (torchrun, SLURM script) announced them; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


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


def die_with_launcher() -> bool:
    """A worker started by torchrun ends when its launcher dies (Linux PR_SET_PDEATHSIG with
    SIGKILL), so a killed job leaves no orphan that keeps training and writing checkpoints into the
    run folder. Returns True when armed (under torchrun on Linux)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or platform.system() != "Linux":
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return False
    pr_set_pdeathsig = 1  # linux/prctl.h
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the launcher died before the call: nobody would deliver the signal
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def quiet_single_process_warnings() -> None:
    """DCP warns "torch.distributed is disabled ... assuming a single process" on every call
    without a process group; on one process that is expected."""
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def check_torch_version() -> None:
    """One line instead of an AttributeError deep inside a pass when torch is older than the floor."""
    if torch_version() < TORCH_FLOOR:
        floor = ".".join(map(str, TORCH_FLOOR))
        raise UserError(
            f"torch {torch.__version__} is older than {floor}, the oldest this package runs on; "
            f"pip install 'torch>={floor}'"
        )


class ProcessConfig(Protocol):
    """What apply_process_settings reads of a JobConfig (config/ sits above this layer)."""

    training: Any  # deterministic, allow_tf32, cuda_expandable_segments, cpu_keep_freed_memory
    compile: Any  # enable


def apply_process_settings(cfg: ProcessConfig) -> list[str]:
    """Settings that hold for the whole process, from the config, applied once by the entry point
    before any model or tensor exists. Returns one line per setting for the log. The one process-wide
    environment variable the package sets is here, for the entry points: CUBLAS_WORKSPACE_CONFIG
    (deterministic cuBLAS; read when CUDA initializes)."""
    t = cfg.training
    done = []
    check_torch_version()
    if die_with_launcher():
        done.append("ends with its launcher (PR_SET_PDEATHSIG)")
    quiet_single_process_warnings()
    if hasattr(signal, "SIGXFSZ"):  # a write beyond the file-size limit fails (EFBIG, one line), not kills
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if t.deterministic:
        # cuBLAS reads this when CUDA initializes: it must be set before the first CUDA call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        done.append(
            f"deterministic algorithms (CUBLAS_WORKSPACE_CONFIG={os.environ['CUBLAS_WORKSPACE_CONFIG']})"
        )
    torch.use_deterministic_algorithms(t.deterministic)
    torch.backends.cudnn.deterministic = t.deterministic
    torch.backends.cudnn.benchmark = False
    if cfg.compile.enable:
        # One code object (Attention.forward) serves sliding and full layers, training and
        # evaluation, and the samples' prefill and decode: about 8 graphs, dynamo's default limit.
        raise_recompile_limit(64)
        done.append("torch.compile: recompile limit 64 per code object")
    if device_type() == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.allow_tf32
        done.append(f"TF32 for fp32 matmuls: {'on' if t.allow_tf32 else 'off'}")
        if t.cuda_expandable_segments:
            set_cuda_allocator_settings("expandable_segments:True")
            done.append("CUDA allocator: expandable segments")
    elif t.cpu_keep_freed_memory:
        done.append(
            "glibc malloc keeps freed memory"
            if keep_freed_cpu_memory()
            else "training.cpu_keep_freed_memory: not glibc, left the allocator as it is"
        )
    return done


# What a collective reports when its peer went away or stopped answering (gloo's socket errors,
# NCCL's remote errors and watchdog timeouts, the store's lost connections).
PEER_SIGNS = ("connection reset by peer", "connection closed by peer", "closed by peer", "timed out",
              "timeout", "remote process exited", "remote peer", "broken pipe", "socket closed")  # fmt: skip


def lost_peer(error: BaseException) -> CollectiveFailed | None:
    """The one-line form of a collective that failed because another rank went away or hangs, else
    None (a misuse or a bug in a collective keeps its traceback): the store's and the network's
    errors always, a backend's (gloo, NCCL) when its message says the peer is gone or timed out."""
    text = str(error)
    low = text.lower()
    network = isinstance(error, (dist.DistNetworkError, dist.DistStoreError))
    backend = isinstance(error, dist.DistError) or "gloo" in low or "nccl" in low
    if not (network or backend and any(sign in low for sign in PEER_SIGNS)):
        return None
    rank = dist.get_rank() if dist.is_initialized() else 0
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return CollectiveFailed(
        f"rank {rank}: a collective failed ({first[-160:]}); another rank stopped, died or hangs - the "
        "launcher's line names it"
    )


def init_distributed(timeout_seconds: int = 300, one_process_group: bool = False) -> tuple[int, int]:
    """Start the process group when launched with several processes (or, one_process_group, a group
    of this one process); return (rank, world size)."""
    world = world_size()
    if world == 1 and one_process_group:
        backend = "nccl" if device_type() == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return 0, 1
    if world == 1:
        return 0, 1
    if device_type() == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device_type() == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds))
    return dist.get_rank(), world


def shutdown(barrier: bool = True) -> None:
    """gc before destroying the group: without it torchrun's exit sometimes aborts (measured: 40/40
    clean exits with it, occasional `terminate called without an active exception` without).
    barrier=False on error paths, where another rank may already be gone."""
    gc.collect()
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
