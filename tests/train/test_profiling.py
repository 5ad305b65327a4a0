"""Profiler (train/profiling.py): traces end on multiples of profile_freq of the global step,
after a resume too; memory snapshots are CUDA-only and say so once."""

import json

import torch

from gptoss_titan.config import Profiling
from gptoss_titan.train.profiling import Profiler


def run(tmp_path, start_step: int, steps: int) -> list[str]:
    cfg = Profiling(enable_profiling=True, profile_freq=3, profiler_warmup=1, profiler_active=1)
    prof = Profiler(cfg, tmp_path, 0, start_step, torch.device("cpu"))
    for _ in range(steps):
        torch.ones(8, 8) @ torch.ones(8, 8)
        prof.step()
    prof.close()
    folders = sorted(p.name for p in (tmp_path / cfg.save_traces_folder).glob("iteration_*"))
    for f in folders:
        trace = json.loads((tmp_path / cfg.save_traces_folder / f / "rank0_trace.json").read_text())
        assert any("aten::mm" in e.get("name", "") for e in trace["traceEvents"])
    return folders


def test_traces_on_multiples_of_the_global_step(tmp_path):
    assert run(tmp_path / "fresh", 0, 7) == ["iteration_3", "iteration_6"]
    assert run(tmp_path / "resumed", 4, 5) == ["iteration_6", "iteration_9"]  # steps 5..9


def test_memory_snapshots_need_cuda(tmp_path, caplog, monkeypatch):
    from gptoss_titan.runtime.log import logger

    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level("INFO", logger="gptoss_titan"):
        prof = Profiler(Profiling(enable_memory_snapshot=True), tmp_path, 0, 0, torch.device("cpu"))
    prof.step()
    prof.close()
    assert not prof.snapshots and "needs CUDA" in caplog.text
    assert not (tmp_path / "memory_snapshot").exists()
