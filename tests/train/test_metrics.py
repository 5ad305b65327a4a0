"""Metrics (jsonl, TensorBoard read back with EventAccumulator, MFU, expert load) and profiler traces."""

import json

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptoss_titan.config import ConfigError, parse_args
from gptoss_titan.train import main
from gptoss_titan.train.metrics import expert_load_stats, gpu_peak_tflops, measure_matmul_tflops, peak_tflops

from ..conftest import read_metrics
from ..helpers.training import argv_for


def test_gpu_peak_table():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16", tf32=True) == 989.4
    assert gpu_peak_tflops("NVIDIA H100 PCIe", "bfloat16", tf32=True) == 756.5
    assert gpu_peak_tflops("NVIDIA H100 NVL", "float32", tf32=True) == 417.5
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "float32", tf32=False) == 19.5
    assert gpu_peak_tflops("NVIDIA H200", "bfloat16", tf32=False) == 989.4
    assert gpu_peak_tflops("NVIDIA B200", "bfloat16", tf32=False) == 2250.0
    assert gpu_peak_tflops("Tesla T4", "bfloat16", tf32=False) is None


def test_cpu_peak_is_measured_and_config_wins():
    t = measure_matmul_tflops(torch.device("cpu"), torch.float32, n=256, reps=2)
    assert 1e-4 < t < 50  # a real, finite rate for a CPU
    peak, source = peak_tflops(torch.device("cpu"), "float32")
    assert peak > 0 and "measured" in source
    assert peak_tflops(torch.device("cpu"), "float32", configured=123.0) == (123.0, "config")


def test_expert_load_stats():
    counts = torch.tensor([[4, 4, 4, 4], [8, 0, 4, 4]])
    s = expert_load_stats(counts)
    assert s["expert_load_min"] == [4, 0] and s["expert_load_max"] == [4, 8]
    assert s["expert_load_cv"][0] == 0 and s["expert_load_cv"][1] == pytest.approx(np.std([8, 0, 4, 4]) / 4)
    assert s["expert_load_max_over_mean"] == 2.0


def test_metrics_tensorboard_and_profiler_trace(tmp_path):
    run = tmp_path / "run"
    argv = argv_for(
        tmp_path,
        "--training.steps=4",
        "--validation.freq=4",
        "--metrics.peak_tflops=0.05",
        "--profiling.enable_profiling=true",
        "--profiling.profile_freq=2",
        "--profiling.profiler_warmup=1",
        "--profiling.profiler_active=1",
    )
    assert main(argv) == 0
    rows = read_metrics(run)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    n_layers = 4  # bench flavor
    for r in steps:
        assert r["mfu_pct"] == pytest.approx(100 * r["tflops_per_device"] / 0.05)
        assert r["tflops_per_device"] > 0 and r["tokens_per_s"] > 0 and 0 <= r["data_time_pct"] <= 100
        assert len(r["expert_load_min"]) == len(r["expert_load_max"]) == len(r["expert_load_cv"]) == n_layers
        assert all(lo <= hi for lo, hi in zip(r["expert_load_min"], r["expert_load_max"]))
        # every token goes to top_k = 2 of the 8 experts in every layer: 2 x 64 tokens / 8 per expert
        assert r["expert_load_mean"] == [2 * 2 * 32 / 8] * n_layers
        assert r["expert_load_max_over_mean"] >= 1.0 and r["mem_peak_rss_gib"] > 0.1
    # TensorBoard holds the same numbers (float32 in the event file)
    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in (
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "mfu_pct",
        "mem_peak_rss_gib",
        "data_time_s",
        "expert_load_cv/layer_00",
        "expert_load_max/layer_03",
        "val_loss",
    ):
        assert tag in tags, (tag, sorted(tags))
    for tag, key in (("loss", "loss"), ("grad_norm", "grad_norm"), ("mfu_pct", "mfu_pct")):
        events = ea.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3, 4]
        assert [e.value for e in events] == pytest.approx([r[key] for r in steps], rel=1e-6)
    layer3 = [e.value for e in ea.Scalars("expert_load_max/layer_03")]
    assert layer3 == pytest.approx([r["expert_load_max"][3] for r in steps])
    # profiler: a trace at steps 2 and 4 (every profile_freq), a Chrome trace with the step's ops
    for step in (2, 4):
        trace = run / "profile_traces" / f"iteration_{step}" / "rank0_trace.json"
        assert trace.is_file(), sorted(p.name for p in (run / "profile_traces").iterdir())
        events = json.loads(trace.read_text())["traceEvents"]
        names = {e.get("name", "") for e in events}
        assert any(n.startswith("ProfilerStep#") for n in names)
        assert {"aten::mm", "aten::bmm", "aten::addmm", "aten::linear"} & names
    assert sorted(p.name for p in (run / "profile_traces").iterdir()) == ["iteration_2", "iteration_4"]


@pytest.mark.parametrize(
    "flag, needle",
    [
        ("--profiling.profiler_active=0", "profiling.profiler_active = 0"),
        ("--profiling.profiler_warmup=12", "profiling.profiler_warmup + profiler_active"),
        ("--metrics.peak_tflops=-1", "metrics.peak_tflops = -1"),
    ],
)
def test_profiling_and_peak_config_errors(flag, needle):
    with pytest.raises(ConfigError, match=needle.replace("+", r"\+")):
        parse_args(["--data.dataset=kjv", flag])


def test_slow_cpu_bf16_warning(monkeypatch, caplog):
    """The trainer warns when bf16 matmuls are far slower than fp32 (CPUs without native bf16)."""
    import gptoss_titan.train.metrics as train

    rates = {torch.float32: 0.15, torch.bfloat16: 0.001}
    monkeypatch.setattr(train, "measure_matmul_tflops", lambda device, dtype, **kw: rates[dtype])
    monkeypatch.setattr(train.logger, "propagate", True)
    with caplog.at_level("INFO", logger="gptoss_titan"):
        assert train.warn_slow_cpu_bf16(torch.device("cpu"))
    assert "mixed_precision_param=float32 is faster" in caplog.text
    rates[torch.bfloat16] = 0.3  # native bf16: no warning
    assert not train.warn_slow_cpu_bf16(torch.device("cpu"))


def test_peak_memory_is_per_log_window():
    """The trainer resets the peak after each log line: a large, freed allocation shows in the window
    that made it and not in the next one (a fresh process: glibc's defaults return the block)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from gptoss_titan.train.metrics import memory_stats, reset_peak_memory\n"
        "cpu = torch.device('cpu')\n"
        "reset_peak_memory(cpu); base = memory_stats(cpu)['mem_peak_rss_gib']\n"
        "x = torch.ones(64 * 2**20); del x\n"
        "high = memory_stats(cpu)['mem_peak_rss_gib']\n"
        "reset_peak_memory(cpu); low = memory_stats(cpu)['mem_peak_rss_gib']\n"
        "print(base, high, low)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base, high, low = map(float, r.stdout.split())
    assert high - base > 0.2 and low < high - 0.2, (base, high, low)
