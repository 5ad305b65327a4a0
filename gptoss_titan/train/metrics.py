"""Per-step metrics: one console line, TensorBoard scalars and `<dump_folder>/metrics.jsonl`."""

from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Metrics as MetricsConfig
from ..runtime.dtypes import dtype_of
from ..runtime.errors import write_reason
from ..runtime.log import logger

# Dense peak TFLOP/s per GPU (vendor datasheets, no sparsity). "float32" is the TF32 tensor-core
# rate, used when TF32 matmuls are allowed; otherwise the plain FP32 rate "float32_no_tf32".
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "B200": {"bfloat16": 2250.0, "float32": 1100.0, "float32_no_tf32": 75.0},
    "H200": {"bfloat16": 989.4, "float32": 494.7, "float32_no_tf32": 66.9},
    "H100 NVL": {"bfloat16": 835.0, "float32": 417.5, "float32_no_tf32": 60.0},
    "H100 PCIe": {"bfloat16": 756.5, "float32": 378.0, "float32_no_tf32": 51.2},
    "H100": {"bfloat16": 989.4, "float32": 494.7, "float32_no_tf32": 66.9},  # SXM
    "A100": {"bfloat16": 312.0, "float32": 156.0, "float32_no_tf32": 19.5},
}


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory in GiB since the last `reset_peak_memory`: CUDA max allocated / reserved, or the
    process's peak resident size on CPU (VmHWM on Linux, else the whole run's ru_maxrss)."""
    if device.type == "cuda":
        return {
            "mem_max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "mem_max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return {"mem_peak_rss_gib": int(line.split()[1]) / 2**20}  # kB
    return {"mem_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    """Start a new window for the peak-memory metrics (called after each log line)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        pass


def gpu_peak_tflops(name: str, dtype: str, tf32: bool) -> float | None:
    """Datasheet peak for a CUDA device name (longest matching key first), None if unknown."""
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            row = GPU_PEAK_TFLOPS[key]
            return row["bfloat16"] if dtype == "bfloat16" else row["float32" if tf32 else "float32_no_tf32"]
    return None


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    """Best achieved TFLOP/s of an n x n x n matmul on this device (the CPU's practical peak)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(reps + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def peak_tflops(device: torch.device, dtype: str, configured: float = 0.0) -> tuple[float, str]:
    """(peak TFLOP/s per device, where it came from): config, GPU table, or a measured matmul."""
    if configured > 0:
        return configured, "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_tflops(name, dtype, torch.backends.cuda.matmul.allow_tf32)
        if peak is not None:
            return peak, f"{name} datasheet"
    tdtype = dtype_of(dtype) if device.type == "cuda" else torch.float32
    return measure_matmul_tflops(device, tdtype), f"measured {tdtype} matmul on {device.type}"


def throughput_stats(
    tokens: int,
    seconds: float,
    flops_per_token: float,
    world: int,
    peak_tflops: float,
    data_time: float,
    steps: int,
) -> dict[str, float]:
    """Tokens/s (global and per device), achieved TFLOP/s and MFU per device, and the share of the
    time spent waiting for data, over a log window of `steps` steps and `seconds`."""
    tps = tokens / seconds
    tflops = flops_per_token * tps / world / 1e12
    return {
        "tokens_per_s": tps,
        "tokens_per_s_per_device": tps / world,
        "tflops_per_device": tflops,
        "mfu_pct": 100 * tflops / peak_tflops,
        "data_time_s": data_time / steps,
        "data_time_pct": 100 * data_time / seconds,
    }


def warn_slow_cpu_bf16(device: torch.device) -> bool:
    """Warn (and return True) when bf16 matmuls are much slower than fp32 here: CPUs without native
    bf16 (AVX2 only) fall back to ~1 GFLOP/s. Small matrices keep the check cheap even then."""
    fp32 = measure_matmul_tflops(device, torch.float32, n=256, reps=2)
    bf16 = measure_matmul_tflops(device, torch.bfloat16, n=256, reps=2)
    if fp32 <= 2 * bf16:
        return False
    logger.info(
        f"warning: bf16 matmuls run at {bf16 * 1e3:.1f} GFLOP/s on this CPU, fp32 at {fp32 * 1e3:.1f} "
        "(no native bf16): --training.mixed_precision_param=float32 is faster"
    )
    return True


def expert_load_stats(counts: torch.Tensor) -> dict[str, list[float] | float]:
    """Per-layer tokens per expert: mean, min, max and coefficient of variation (std / mean), from [L, E]."""
    c = counts.detach().double().cpu()
    mean = c.mean(-1).clamp(min=1e-9)
    cv = c.std(-1, unbiased=False) / mean
    return {
        "expert_load_mean": c.mean(-1).tolist(),
        "expert_load_min": c.min(-1).values.tolist(),
        "expert_load_max": c.max(-1).values.tolist(),
        "expert_load_cv": cv.tolist(),
        "expert_load_cv_mean": float(cv.mean()),
        "expert_load_max_over_mean": float((c.max(-1).values / mean).max()),
    }


@dataclass
class StepResult:
    """What one optimizer step measured, as device tensors (read only on log steps)."""

    loss: torch.Tensor  # mean cross-entropy over the global batch's target tokens
    lr: float  # the learning rate the step used
    grad_norm: torch.Tensor  # global L2 norm before clipping
    expert_counts: torch.Tensor  # [L, E] assignments over the global batch
    aux_loss: torch.Tensor | None
    data_time: float  # seconds spent waiting for batches
    skipped: torch.Tensor  # 1.0 if the update was skipped (loss or grad norm not finite, a spike)
    target_tokens: torch.Tensor | None = (
        None  # tokens the loss was computed on (global; masks and padding excluded)
    )
    balanced_layers: torch.Tensor | None = None  # model.balanced_routing: layers that used the fallback

    def stats(self) -> dict:
        out = {
            "loss": float(self.loss),
            "lr": self.lr,
            "grad_norm": float(self.grad_norm),
            "skipped": float(self.skipped),
        }
        if self.aux_loss is not None:
            out["aux_loss"] = float(self.aux_loss)
        if self.target_tokens is not None:
            out["target_tokens"] = int(self.target_tokens)
        if self.balanced_layers is not None:
            out["balanced_routing_layers"] = int(self.balanced_layers)
        out.update(expert_load_stats(self.expert_counts))  # [L, E] tokens per expert, whole global batch
        return out


class MetricsLogger:
    """Writes what the trainer measured; rank 0 writes files unless told every rank should.

    metrics.jsonl holds one whole JSON row per logged step, also across restarts: at the start a
    torn last row (a crash or a full disk mid-write) is dropped and rows past the step the run
    resumes from (logged after its last checkpoint) are dropped too - the resumed run writes those
    steps again - each with a warning. A run whose step count starts over (no checkpoint, a
    model-only or Hugging Face start) moves an earlier run's rows aside to metrics.jsonl.prev. A write that fails (a full disk) sets `write_error`: the
    trainer stops at the next step (metrics.on_write_error = stop) or goes on without the file."""

    def __init__(self, dump_folder: Path, cfg: MetricsConfig, rank: int, resume_step: int | None = None):
        self.rank, self.cfg = rank, cfg
        self.jsonl = None
        self.tb = None
        self.write_error: str | None = None
        if rank == 0 or not cfg.rank_0_only:
            name = "metrics.jsonl" if rank == 0 else f"metrics_rank_{rank}.jsonl"
            self.path = dump_folder / name
            repair_rows(self.path, resume_step)
            self.jsonl = open(self.path, "a", buffering=1)
            if cfg.enable_tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                sub = dump_folder / cfg.save_tb_folder / (f"rank_{rank}" if rank else "")
                self.tb = SummaryWriter(log_dir=str(sub))

    def log(self, step: int, values: dict, prefix: str = "") -> None:
        """Scalars go everywhere; a list (one value per layer) goes to the jsonl as a list and to
        TensorBoard as `name/layer_XX`, not to the console."""
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()}
        if self.jsonl:
            self._write(json.dumps({"step": step, **clean}) + "\n")
        if self.tb:
            for k, v in clean.items():
                items = (
                    [(f"{prefix}{k}/layer_{i:02d}", x) for i, x in enumerate(v)]
                    if isinstance(v, list)
                    else [(f"{prefix}{k}", v)]
                )
                for tag, x in items:
                    if isinstance(x, float) and math.isfinite(x):
                        self.tb.add_scalar(tag, x, step)
        parts = [f"step {step:>6}"] + [_fmt(k, v) for k, v in clean.items() if not isinstance(v, list)]
        logger.info("  ".join(parts))

    def _write(self, row: str) -> None:
        """One row in one write (line-buffered: flushed whole)."""
        try:
            self.jsonl.write(row)
        except OSError as e:
            self.write_error = f"{self.path} could not be written ({write_reason(e, self.path.parent)})"
            logger.info(f"warning: {self.write_error}; no more rows are written to it")
            try:
                self.jsonl.close()
            except OSError:
                pass
            self.jsonl = None

    def close(self) -> None:
        if self.jsonl:
            try:
                self.jsonl.close()
            except OSError:
                pass
        if self.tb:
            self.tb.close()


def repair_rows(path: Path, resume_step: int | None) -> None:
    """Drop a torn row and the rows past resume_step from path, atomically (warns about each);
    resume_step None (the step count starts over): move the file aside, to <name>.prev."""
    if not path.is_file():
        return
    if resume_step is None:
        if path.stat().st_size:
            prev = path.with_name(path.name + ".prev")
            n = 1
            while prev.exists():
                n += 1
                prev = path.with_name(f"{path.name}.prev{n}")
            os.replace(path, prev)
            logger.info(
                f"warning: {path} holds an earlier run's rows; this run starts at step 1: moved them to {prev}"
            )
        return
    lines = path.read_bytes().split(b"\n")
    kept, torn, later = [], 0, 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            torn += 1
            continue
        if isinstance(row, dict) and row.get("step", 0) > resume_step:
            later += 1
            continue
        kept.append(line)
    if not torn and not later and lines[-1] == b"":
        return
    if torn:
        logger.info(f"warning: {path}: dropped {torn} torn row(s) (a crash or a full disk while writing)")
    if later:
        logger.info(
            f"warning: {path}: {later} row(s) past step {resume_step}, the step resumed from, are dropped: "
            "this run writes them again"
        )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(line + b"\n" for line in kept))
    os.replace(tmp, path)


def _fmt(k: str, v) -> str:
    if not isinstance(v, float):
        return f"{k} {v}"
    if k == "lr":
        return f"{k} {v:.3e}"
    if abs(v) >= 1000:
        return f"{k} {v:,.0f}"
    if 0 < abs(v) < 0.01:
        return f"{k} {v:.3e}"
    return f"{k} {v:.4f}"
