"""Per-step metrics: one console line, TensorBoard scalars and `<dump_folder>/metrics.jsonl`."""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger("gptoss_titan")


def init_logging(rank: int = 0) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[rank{rank}] %(asctime)s %(message)s", datefmt="%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory in GiB: CUDA max allocated / reserved, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return {
            "mem_max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "mem_max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    return {"mem_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


class MetricsLogger:
    """Writes what the trainer measured; rank 0 writes files unless told every rank should."""

    def __init__(self, dump_folder: Path, tb_folder: str, enable_tb: bool, rank: int, write_files: bool):
        self.rank = rank
        self.jsonl = None
        self.tb = None
        if write_files:
            self.jsonl = open(dump_folder / "metrics.jsonl", "a", buffering=1)
            if enable_tb:
                from torch.utils.tensorboard import SummaryWriter

                sub = dump_folder / tb_folder / (f"rank_{rank}" if rank else "")
                self.tb = SummaryWriter(log_dir=str(sub))

    def log(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()}
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tb:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(f"{prefix}{k}", v, step)
        parts = [f"step {step:>6}"] + [_fmt(k, v) for k, v in clean.items()]
        logger.info("  ".join(parts))

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def _fmt(k: str, v) -> str:
    if not isinstance(v, float):
        return f"{k} {v}"
    if k == "lr":
        return f"{k} {v:.3e}"
    if abs(v) >= 1000:
        return f"{k} {v:,.0f}"
    return f"{k} {v:.4f}"


class Timer:
    def __init__(self) -> None:
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt
