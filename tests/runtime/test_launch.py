"""Launching (launch.py and scripts/run_train.sh): pre-launch checks and a 2-process run."""

import os
import socket
import subprocess

import pytest

from gptoss_titan.runtime.launch import LaunchError, check_nproc, cpu_threads

from ..conftest import ROOT, one_line_error, run_train_sh, synthetic_data


@pytest.mark.slow
def test_run_train_two_processes_fsdp_ep(tmp_path):
    data = synthetic_data(tmp_path / "data", vocab=201088)
    r = run_train_sh(
        {"NGPU": "2"},
        f"--data.dataset_path={data}",
        f"--job.dump_folder={tmp_path / 'run'}",
        "--training.steps=3",
        "--training.seq_len=32",
        "--training.local_batch_size=1",
        "--parallelism.expert_parallel_degree=2",
        "--validation.freq=3",
        "--validation.steps=1",
        "--metrics.log_freq=1",
        "--metrics.sample_freq=3",
        "--metrics.sample_tokens=4",
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "expert parallelism: 2 groups of 4 experts" in r.stdout
    assert "sample at step 3:" in r.stdout  # KV-cached sampling on the sharded model, rank 0 broadcasting
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # 3 steps + 1 validation, written once (rank 0)
    assert "terminate called" not in r.stderr


def test_port_in_use_is_one_line_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [str(ROOT / "scripts" / "run_train.sh"), f"--job.dump_folder={tmp_path / 'run'}"],
            cwd=ROOT,
            env={**os.environ, "NGPU": "2", "MASTER_PORT": str(port)},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 2 and f"port {port} is in use" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_ngpu_larger_than_gpus(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    check_nproc(4)
    with pytest.raises(LaunchError, match="NGPU = 8 but this node has 4 GPUs; set NGPU=4"):
        check_nproc(8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_nproc(8)  # CPU: NGPU is a process count


@pytest.mark.parametrize(
    "ngpu, says",
    [("abc", "NGPU = 'abc' is not a number of processes; set e.g. NGPU=2"), ("0", "NGPU = 0 must be >= 1")],
)
def test_bad_ngpu_is_one_line_before_launch(tmp_path, ngpu, says):
    """run_train.sh's launcher resolves NGPU itself (no torch probe in the shell): a bad value is its line."""
    r = run_train_sh({"NGPU": ngpu}, f"--job.dump_folder={tmp_path / 'run'}")
    assert r.returncode == 2 and one_line_error(r.stderr) == f"error: {says}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "arg, says",
    [
        ("--training.stepz=3", "error: unknown key training.stepz in command line; did you mean 'steps'?"),
        (
            "--data.dataset_path=/nonexistent",
            "error: data folder '/nonexistent' has no meta.json (nor train.bin); ",
        ),
    ],
)
def test_bad_config_is_the_launchers_line_before_any_worker(tmp_path, arg, says):
    """The launcher's --preflight checks the config and its data folders in its own process, before
    any worker (without it the workers would refuse the folder with 'data file ... not found'):
    one line, nothing written."""
    r = run_train_sh({"NGPU": "2"}, f"--job.dump_folder={tmp_path / 'run'}", arg)
    assert r.returncode == 2 and one_line_error(r.stderr).startswith(says), r.stderr
    assert "[rank" not in r.stdout + r.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "port, says",
    [("abc", "rendezvous port 'abc' is not a TCP port"), ("70000", "port 70000 is not a TCP port")],
)
def test_bad_master_port_is_one_line_before_launch(tmp_path, port, says):
    r = run_train_sh({"MASTER_PORT": port}, f"--job.dump_folder={tmp_path / 'run'}")
    assert r.returncode == 2 and says in one_line_error(r.stderr)
    assert not (tmp_path / "run").exists()


def test_cpu_processes_share_the_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # (restored after the test)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    cpu_threads(3)
    assert os.environ["OMP_NUM_THREADS"] == "5"  # the user's setting wins
    monkeypatch.delenv("OMP_NUM_THREADS")
    cpu_threads(3)
    assert os.environ["OMP_NUM_THREADS"] == "2"  # 8 cores // 3 processes
    monkeypatch.delenv("OMP_NUM_THREADS")
    cpu_threads(16)
    assert os.environ["OMP_NUM_THREADS"] == "1"


def test_a_port_in_time_wait_is_free_for_a_restart():
    """The rendezvous port of a run that just crashed has its connections in TIME_WAIT: a restart at
    once must not be refused (only a listening socket makes the port busy)."""
    from gptoss_titan.runtime.launch import check_port

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()  # the server side closes first: its end of the connection enters TIME_WAIT
    server.close()
    client.close()
    with pytest.raises(OSError):  # what the old check did: a plain bind fails
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    check_port(port, "127.0.0.1")  # passes
