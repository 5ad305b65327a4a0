"""Multi-node launch for real: two torchrun "nodes" on loopback, and a two-node SLURM cluster on
this host (tests/slurm/cluster.sh) running scripts/multinode_trainer.slurm with sbatch. Both must
give the per-step losses of the single-node 2-process run (FSDP x2 with EP 2)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import free_port, synthetic_data

ROOT = Path(__file__).resolve().parents[2]
SLURM_BINS = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")
pytestmark = pytest.mark.slow


def overrides(data: Path, dump: Path) -> list[str]:
    return [
        f"--data.dataset_path={data}",
        f"--job.dump_folder={dump}",
        "--training.steps=3",
        "--training.seq_len=32",
        "--training.local_batch_size=1",
        "--parallelism.expert_parallel_degree=2",
        "--validation.enable=false",
        "--metrics.log_freq=1",
        "--metrics.sample_freq=0",
    ]


def losses(dump: Path) -> list[float]:
    rows = [json.loads(x) for x in (dump / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**e, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("multinode") / "data", vocab=201088)


@pytest.fixture(scope="module")
def single_node(data, tmp_path_factory):
    dump = tmp_path_factory.mktemp("single") / "run"
    r = subprocess.run(
        [str(ROOT / "scripts" / "run_train.sh"), *overrides(data, dump)],
        cwd=ROOT,
        env=env(NGPU="2", MASTER_PORT=str(free_port())),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    out = losses(dump)
    assert len(out) == 3
    return out


def test_two_torchrun_nodes_on_loopback(data, single_node, tmp_path):
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={node}",
                "--nproc_per_node=1",
                "--rdzv_id=loopback",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                "-m",
                "gptoss_titan.train",
                "--config",
                "train_configs/debug_model.toml",
                *overrides(data, tmp_path / "run"),
                "--metrics.rank_0_only=false",
            ],
            cwd=ROOT,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "2 x cpu" in outs[0] + outs[1]  # one world of two processes across the two "nodes"
    assert losses(tmp_path / "run") == pytest.approx(single_node, rel=1e-6)
    # every rank writes its own TensorBoard folder and jsonl when asked to
    assert list((tmp_path / "run" / "tb" / "rank_1").glob("events.out.tfevents.*"))
    assert losses(tmp_path / "run") == [
        json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics_rank_1.jsonl").read_text().splitlines()
    ]


def slurm_missing() -> str:
    missing = [b for b in SLURM_BINS if shutil.which(b) is None]
    if missing:
        return (
            f"Slurm not installed ({', '.join(missing)}): apt-get install slurmctld slurmd slurm-client munge"
        )
    if os.geteuid() != 0:
        return "the throwaway Slurm cluster runs its daemons as root"
    return ""


@pytest.fixture
def slurm_cluster(tmp_path):
    if reason := slurm_missing():
        pytest.skip(reason)
    folder = tmp_path / "slurm"
    script = ROOT / "tests" / "slurm" / "cluster.sh"
    r = subprocess.run([str(script), "up", str(folder)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        yield folder / "slurm.conf"
    finally:
        d = subprocess.run([str(script), "down", str(folder)], capture_output=True, text=True, timeout=120)
        assert d.returncode == 0, d.stdout + d.stderr


def alive(pids: list[int]) -> list[int]:
    """Pids that still run (zombies waiting to be reaped do not count)."""
    out = []
    for pid in pids:
        stat = subprocess.run(
            ["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True
        ).stdout.strip()
        if stat and not stat.startswith("Z"):
            out.append(pid)
    return out


def test_sbatch_two_nodes_equals_single_node(data, single_node, slurm_cluster, tmp_path):
    dump, out = tmp_path / "run", tmp_path / "job.out"
    e = env(
        SLURM_CONF=str(slurm_cluster), NGPU="1", RDZV_PORT=str(free_port()), LOG_DIR=str(tmp_path / "logs")
    )
    r = subprocess.run(
        [
            "sbatch",
            "--wait",
            "-N",
            "2",
            "-o",
            str(out),
            "scripts/multinode_trainer.slurm",
            *overrides(data, dump),
        ],
        cwd=ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = out.read_text() if out.exists() else ""
    assert r.returncode == 0, r.stdout + r.stderr + log[-4000:]
    assert "2 nodes x 1 processes, head n1 at 127.0.0.1:" in log  # NodeAddr, not the node name
    assert losses(dump) == pytest.approx(single_node, rel=1e-6)
    node_logs = sorted(
        p.relative_to(tmp_path / "logs").parts[0] for p in (tmp_path / "logs").rglob("stdout.log")
    )
    assert node_logs == ["node0", "node1"]  # per-rank logs from both nodes
    # a failing job is reported by sbatch --wait (a bad override fails the config check: exit 2)
    bad = subprocess.run(
        [
            "sbatch",
            "--wait",
            "-N",
            "2",
            "-o",
            str(tmp_path / "bad.out"),
            "scripts/multinode_trainer.slurm",
            "--training.stepz=3",
        ],
        cwd=ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "did you mean 'steps'" in (tmp_path / "bad.out").read_text()


def test_slurm_teardown_stops_every_daemon(slurm_cluster):
    folder = slurm_cluster.parent
    pids = [int(x) for x in (folder / "pids").read_text().split()]
    assert len(alive(pids)) == 3  # slurmctld + 2 slurmd
    subprocess.run(
        [str(ROOT / "tests" / "slurm" / "cluster.sh"), "down", str(folder)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert alive(pids) == []


def test_slurm_script_outside_slurm_is_one_line_error():
    r = subprocess.run(
        ["bash", "scripts/multinode_trainer.slurm"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert "sbatch" in r.stderr
