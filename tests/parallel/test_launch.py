"""scripts/run_train.sh: multi-process CPU training and the fake-backend dry run at scale."""

import os
import subprocess
from pathlib import Path

import pytest

from ..test_train import synthetic_data
from .test_equivalence import free_port

ROOT = Path(__file__).resolve().parents[2]


def launch(env_extra: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASTER_PORT": str(free_port()), **env_extra}
    return subprocess.run([str(ROOT / "scripts" / "run_train.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("config, ep, params", [("gpt_oss_120b", 8, "116,829,156,672"), ("gpt_oss_20b", 8, "20,914,757,184")])
def test_fake_backend_dry_run_at_scale(config, ep, params):
    r = launch({"COMM_MODE": "fake_backend", "NGPU": "64", "CONFIG_FILE": f"train_configs/{config}.toml"},
               f"--parallelism.expert_parallel_degree={ep}")
    assert r.returncode == 0, r.stderr[-4000:]
    out = r.stdout
    assert f"({params} parameters) on 64 ranks" in out and "efsdp 8 x ep 8" in out
    for row in ("parameters (fp32)", "gradients (fp32)", "AdamW state (2 x fp32)", "largest all-gather"):
        assert row in out
    # experts per rank: all expert params / 64 ranks, in GiB of fp32
    line = next(x for x in out.splitlines() if x.startswith("parameters (fp32)"))
    experts_gib = float(line.split()[3])
    from gptoss_titan.model import FLAVORS

    a = FLAVORS[config.split("_")[-1]]
    expected = a.n_layers * a.num_experts * a._expert_params() * 4 / 64 / 2**30
    assert abs(experts_gib - expected) < 2e-3


def test_dry_run_rejects_bad_mesh():
    r = launch({"COMM_MODE": "fake_backend", "NGPU": "64", "CONFIG_FILE": "train_configs/gpt_oss_120b.toml"},
               "--parallelism.expert_parallel_degree=3")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr


def test_run_train_two_processes_fsdp_ep(tmp_path):
    data = synthetic_data(tmp_path / "data", vocab=201088)
    r = launch({"NGPU": "2"}, f"--data.dataset_path={data}", f"--job.dump_folder={tmp_path / 'run'}",
               "--training.steps=3", "--training.seq_len=32", "--training.local_batch_size=1",
               "--parallelism.expert_parallel_degree=2", "--validation.freq=3", "--validation.steps=1",
               "--metrics.log_freq=1", "--metrics.sample_freq=3", "--metrics.sample_tokens=4")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "expert parallelism: 2 groups of 4 experts" in r.stdout
    assert "sample at step 3:" in r.stdout  # KV-cached sampling on the sharded model, rank 0 broadcasting
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # 3 steps + 1 validation, written once (rank 0)
    assert "terminate called" not in r.stderr
