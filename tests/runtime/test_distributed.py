"""Process-wide settings and process groups (distributed.py)."""

import os
import subprocess
import sys

import pytest
import torch

from gptoss_titan.config import parse_args
from gptoss_titan.runtime.distributed import apply_process_settings
from gptoss_titan.train import Trainer

_MALLOC = """
import ctypes, sys, torch
from gptoss_titan.runtime.distributed import keep_freed_cpu_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_cpu_memory()
buf = torch.empty(16 << 20).fill_(1.0)  # 64 MiB, above glibc's largest default mmap threshold (32 MiB)
mmapped = libc.mallinfo2().hblkhd
del buf
print(mmapped >> 20, libc.mallinfo2().fordblks >> 20)
"""


@pytest.mark.parametrize("keep", [True, False])
def test_entry_point_applies_process_settings(monkeypatch, keep):
    """Process-wide settings come from the config and are applied by the entry point (not by the
    Trainer or any constructor): glibc's allocator setting on CPU, deterministic algorithms."""
    import gptoss_titan.runtime.distributed as distributed

    calls = []
    monkeypatch.setattr(distributed, "keep_freed_cpu_memory", lambda: calls.append(1) or True)
    cfg = parse_args(
        [
            "--data.dataset=kjv",
            f"--training.cpu_keep_freed_memory={str(keep).lower()}",
            f"--training.deterministic={str(keep).lower()}",
        ]
    )
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        lines = apply_process_settings(cfg)
        assert len(calls) == int(keep) and torch.are_deterministic_algorithms_enabled() == keep
        # cuBLAS needs its workspace setting before CUDA starts: set with deterministic mode, never without
        assert (os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8") == keep
        assert any("deterministic" in x for x in lines) == keep
    finally:
        torch.use_deterministic_algorithms(False)


def test_trainer_reads_no_environment_in_forward_or_backward(tmp_path, monkeypatch):
    """Nothing in a training step reads an environment variable: every switch is resolved when
    the model and trainer are built."""
    from ..conftest import synthetic_data

    data = synthetic_data(tmp_path / "data")
    tr = Trainer(
        parse_args(
            [
                "--model.flavor=bench",
                f"--data.dataset_path={data}",
                f"--job.dump_folder={tmp_path}",
                "--training.steps=1",
                "--training.seq_len=32",
                "--training.local_batch_size=2",
                "--validation.enable=false",
            ]
        )
    )
    reads = []
    real_get = os.environ.get

    class Spy(dict):
        def get(self, key, default=None):
            reads.append(key)
            return real_get(key, default)

        def __getitem__(self, key):
            reads.append(key)
            return os.environ.copy()[key]

    monkeypatch.setattr(os, "environ", Spy(os.environ))
    tr.train_step()
    assert not [r for r in reads if "GPTOSS" in r], reads


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc tuning")
def test_keep_freed_cpu_memory_keeps_big_blocks_in_the_heap():
    """training.cpu_keep_freed_memory (default on CPU): a 64 MiB block comes from malloc's heap and
    stays there, free for reuse, after it is freed; with glibc's defaults it is mmapped and given
    back to the kernel, so its pages fault in (and are zeroed) again on every step."""
    got = {}
    for mode in ("default", "keep"):
        r = subprocess.run([sys.executable, "-c", _MALLOC, mode], capture_output=True, text=True, check=True)
        got[mode] = [
            int(v) for v in r.stdout.split()
        ]  # [MiB mmapped while alive, MiB free in the heap after]
    assert got["default"][0] >= 64 and got["default"][1] < 64, got
    assert got["keep"][0] < 64 and got["keep"][1] >= 64, got


def test_cuda_settings_are_applied_before_cuda_starts(monkeypatch):
    """The CUDA branch of the entry point's settings, forced here: TF32 for fp32 matmuls (a config
    switch, default on) and expandable allocator segments; compile raises dynamo's recompile limit."""
    import torch._dynamo.config as dynamo_config

    import gptoss_titan.runtime.distributed as distributed

    calls = []
    monkeypatch.setattr(distributed, "device_type", lambda: "cuda")
    monkeypatch.setattr(distributed, "set_cuda_allocator_settings", calls.append)
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        dynamo_config.recompile_limit,
    )
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        dynamo_config.recompile_limit = 8
        lines = apply_process_settings(parse_args(["--data.dataset=kjv", "--compile.enable=true"]))
        assert torch.backends.cuda.matmul.allow_tf32 and calls == ["expandable_segments:True"]
        assert dynamo_config.recompile_limit == 64 and any("TF32" in x for x in lines)
        apply_process_settings(
            parse_args(
                [
                    "--data.dataset=kjv",
                    "--training.allow_tf32=false",
                    "--training.cuda_expandable_segments=false",
                ]
            )
        )
        assert not torch.backends.cuda.matmul.allow_tf32 and len(calls) == 1
    finally:
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            dynamo_config.recompile_limit,
        ) = saved


def test_torch_older_than_the_floor_is_one_line(monkeypatch):
    import gptoss_titan.runtime.distributed as distributed
    from gptoss_titan.runtime.errors import UserError

    monkeypatch.setattr(distributed, "torch_version", lambda: (2, 9))
    with pytest.raises(
        UserError, match=r"older than 2.10, the oldest this package runs on; pip install 'torch>=2.10'"
    ):
        distributed.check_torch_version()


def test_lost_peer_names_a_gone_or_hanging_peer_and_leaves_bugs_alone():
    import torch.distributed as dist

    from gptoss_titan.runtime.distributed import lost_peer

    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29837")
    assert "another rank stopped, died or hangs" in str(lost_peer(gone))
    timeout = dist.DistBackendError(
        "Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9) ran for 100000 ms"
    )
    assert lost_peer(timeout) is not None
    assert lost_peer(dist.DistStoreError("failed to recv, got 0 bytes")) is not None
    assert lost_peer(dist.DistBackendError("NCCL error: invalid usage (run with NCCL_DEBUG=WARN)")) is None
    assert lost_peer(RuntimeError("[gloo] mismatched sizes 4 vs 8")) is None
    assert lost_peer(ValueError("a bug")) is None
