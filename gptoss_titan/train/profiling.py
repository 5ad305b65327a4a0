"""torch.profiler traces and CUDA memory snapshots every `profile_freq` steps (TorchTitan's layout).

Traces: `<dump>/<save_traces_folder>/iteration_<step>/rank<R>_trace.json` (open in Perfetto or
chrome://tracing). Memory snapshots (CUDA only): `<dump>/<save_memory_snapshot_folder>/
iteration_<step>/rank<R>_memory_snapshot.pickle` (open at https://pytorch.org/memory_viz).
Call `step()` once after every training step.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import torch

from ..config import Profiling
from ..runtime.log import logger


class Profiler:
    def __init__(self, cfg: Profiling, dump: Path, rank: int, start_step: int, device: torch.device):
        self.cfg, self.rank, self.step_num = cfg, rank, start_step
        self.trace_dir = dump / cfg.save_traces_folder
        self.snap_dir = dump / cfg.save_memory_snapshot_folder
        self.prof = None
        self.snapshots = cfg.enable_memory_snapshot and device.type == "cuda"
        if cfg.enable_memory_snapshot and not self.snapshots:
            logger.info("profiling.enable_memory_snapshot needs CUDA; no memory snapshots on this device")
        if cfg.enable_profiling:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            # A cycle of profile_freq steps ends with `active` recorded steps. The profiler counts
            # from 0 at the first step of this run; the offset puts traces on multiples of
            # profile_freq of the global step, also after a resume.
            wait = cfg.profile_freq - cfg.profiler_warmup - cfg.profiler_active
            base = torch.profiler.schedule(wait=wait, warmup=cfg.profiler_warmup, active=cfg.profiler_active)
            self.prof = torch.profiler.profile(
                activities=acts,
                schedule=lambda k: base(k + start_step),
                on_trace_ready=self._save_trace,
                record_shapes=True,
            )
            self.prof.__enter__()
        if self.snapshots:
            torch.cuda.memory._record_memory_history(max_entries=100_000)

    def _save_trace(self, prof: torch.profiler.profile) -> None:
        folder = self.trace_dir / f"iteration_{self.step_num}"  # the step just finished
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        prof.export_chrome_trace(str(folder / f"rank{self.rank}_trace.json"))
        logger.info(
            f"profiler trace of step {self.step_num} written to {folder} in {time.perf_counter() - t:.1f} s"
        )

    def step(self) -> None:
        self.step_num += 1
        if self.prof is not None:
            self.prof.step()
        if self.snapshots and self.step_num % self.cfg.profile_freq == 0:
            folder = self.snap_dir / f"iteration_{self.step_num}"
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"rank{self.rank}_memory_snapshot.pickle", "wb") as f:
                pickle.dump(torch.cuda.memory._snapshot(), f)

    def close(self) -> None:
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.prof = None
        if self.snapshots:
            torch.cuda.memory._record_memory_history(enabled=None)
