"""Multi-node launch for real: two torchrun "nodes" on loopback, and a two-node SLURM cluster on
this host (tests/slurm/cluster.sh) running scripts/multinode_trainer.slurm with sbatch. Both must
give the per-step losses of the single-node 2-process run (FSDP x2 with EP 2).

Whatever TMPDIR is, every wait here is bounded and ends in a message: the cluster lives in a short
folder under /tmp (slurmstepd makes a unix socket `<spool>/<node>_<job>.<step>`, and a socket path
has at most 107 bytes: with a long TMPDIR the job step cannot start, the job is requeued and held,
and `sbatch --wait` would wait for ever), a held job fails at once with slurmd's log, and torchrun
processes that outlive their timeout are killed.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ..conftest import free_port, synthetic_data

ROOT = Path(__file__).resolve().parents[2]
SLURM_BINS = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")
# The longest unix socket path slurmstepd makes under SlurmdSpoolDir: <node>_<job id>.<step id> (32 bits each)
STEP_SOCKET = Path("spool") / "n2" / "n2_4294967295.4294967295"
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the terminating NUL (Linux)
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
def data(module_tmp):
    return synthetic_data(module_tmp / "data", vocab=201088)


@pytest.fixture(scope="module")
def single_node(data, module_tmp):
    dump = module_tmp / "single" / "run"
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
    outs = [finish(p, 600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "2 x cpu" in outs[0] + outs[1]  # one world of two processes across the two "nodes"
    assert losses(tmp_path / "run") == pytest.approx(single_node, rel=1e-6)
    # every rank writes its own TensorBoard folder and jsonl when asked to
    assert list((tmp_path / "run" / "tb" / "rank_1").glob("events.out.tfevents.*"))
    assert losses(tmp_path / "run") == [
        json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics_rank_1.jsonl").read_text().splitlines()
    ]


def finish(p: subprocess.Popen, timeout: float) -> str:
    """p's output once it exits; past the timeout it is killed and the test fails saying so."""
    try:
        return p.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        p.kill()
        out = p.communicate()[0]
        pytest.fail(
            f"{' '.join(map(str, p.args[:4]))} ... still ran after {timeout} s, killed:\n{out[-3000:]}"
        )


def slurm_missing() -> str:
    missing = [b for b in SLURM_BINS if shutil.which(b) is None]
    if missing:
        return (
            f"Slurm not installed ({', '.join(missing)}): apt-get install slurmctld slurmd slurm-client munge"
        )
    if os.geteuid() != 0:
        return "the throwaway Slurm cluster runs its daemons as root"
    return ""


def short_folder() -> Path:
    """A new folder whose slurmstepd socket paths fit in a unix socket address, whatever TMPDIR is:
    under /tmp (itself, not $TMPDIR), else under /run."""
    for base in ("/tmp", "/run"):
        if os.access(base, os.W_OK):
            folder = Path(os.path.realpath(tempfile.mkdtemp(prefix="slurm-", dir=base)))
            if len(str(folder / STEP_SOCKET)) <= SUN_PATH_MAX:
                return folder
            shutil.rmtree(folder)
    pytest.fail(
        f"no folder for the Slurm cluster whose socket paths ({STEP_SOCKET}) fit in {SUN_PATH_MAX} bytes "
        "under /tmp or /run"
    )


@pytest.fixture
def slurm_cluster(tmp_path):
    if reason := slurm_missing():
        pytest.skip(reason)
    folder = short_folder()
    script = ROOT / "tests" / "slurm" / "cluster.sh"
    try:
        r = subprocess.run([str(script), "up", str(folder)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        yield folder / "slurm.conf"
    finally:
        d = subprocess.run([str(script), "down", str(folder)], capture_output=True, text=True, timeout=120)
        if (folder / "log").is_dir():  # the daemons' logs stay with the test's folder (kept if it fails)
            shutil.copytree(folder / "log", tmp_path / "slurm-logs", dirs_exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        assert d.returncode == 0, d.stdout + d.stderr


# What every start of this Slurm logs as an error and means nothing here (no PMIx, a fresh state folder)
HARMLESS = ("pmix", "PMIx", "mpi/pmix", "state file", "NOTE: Trying backup")


def slurm_logs(conf: Path, lines: int = 10) -> str:
    """The errors (or the last lines) of every daemon log of the cluster, the nodes' first."""
    out = []
    for log in sorted((conf.parent / "log").glob("*.log"), key=lambda f: not f.name.startswith("slurmd")):
        text = log.read_text(errors="replace").splitlines()
        errors = [x for x in text if ("error" in x or "fatal" in x) and not any(h in x for h in HARMLESS)]
        out.append(f"--- {log.name}\n" + "\n".join((errors or text)[-lines:]))
    return "\n".join(out)


def sbatch_wait(args: list[str], env: dict, log: Path, timeout: float) -> subprocess.CompletedProcess:
    """`sbatch --wait ARGS`: its exit status is the job's. The wait is bounded: a job that Slurm
    holds (its launch failed) or that outlives the timeout is cancelled and the test fails, naming
    the job's state and the daemons' errors."""
    conf = Path(env["SLURM_CONF"])
    cmd = ["sbatch", "--wait", *args]
    with open(log, "w+") as out:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline, job, problem = time.time() + timeout, None, None
        while p.poll() is None:
            if job is None and (m := re.search(r"Submitted batch job (\d+)", log.read_text())):
                job = m.group(1)
            if job is not None:
                state = subprocess.run(
                    ["squeue", "-h", "-j", job, "-o", "%T %r"],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=30,
                ).stdout.strip()
                if "launch failed" in state or "held" in state.lower():
                    problem = f"job {job} is {state}"
            if problem is None and time.time() > deadline:
                problem = f"job {job} still {state if job else 'not submitted'} after {timeout} s"
            if problem is not None:
                if job is not None:
                    subprocess.run(["scancel", job], env=env, capture_output=True, timeout=30)
                p.kill()
                p.wait()
                pytest.fail(f"sbatch --wait: {problem}\n{log.read_text()[-2000:]}\n{slurm_logs(conf)}")
            time.sleep(0.5)
        out.seek(0)
        return subprocess.CompletedProcess(cmd, p.returncode, out.read(), "")


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
    r = sbatch_wait(
        ["-N", "2", "-o", str(out), "scripts/multinode_trainer.slurm", *overrides(data, dump)],
        e,
        tmp_path / "sbatch.log",
        timeout=900,
    )
    log = out.read_text() if out.exists() else ""
    assert r.returncode == 0, r.stdout + log[-4000:]
    assert "2 nodes x 1 processes, head n1 at 127.0.0.1:" in log  # NodeAddr, not the node name
    assert losses(dump) == pytest.approx(single_node, rel=1e-6)
    node_logs = sorted(
        p.relative_to(tmp_path / "logs").parts[0] for p in (tmp_path / "logs").rglob("stdout.log")
    )
    assert node_logs == ["node0", "node1"]  # per-rank logs from both nodes
    # a failing job is reported by sbatch --wait (a bad override fails the config check: exit 2)
    bad = sbatch_wait(
        ["-N", "2", "-o", str(tmp_path / "bad.out"), "scripts/multinode_trainer.slurm", "--training.stepz=3"],
        e,
        tmp_path / "sbatch_bad.log",
        timeout=300,
    )
    assert bad.returncode == 2, bad.stdout
    assert "did you mean 'steps'" in (tmp_path / "bad.out").read_text()


def job_state(job: str, e: dict) -> dict[str, str]:
    """`scontrol show job`'s fields (JobState, Restarts, ExitCode, ...)."""
    text = subprocess.run(
        ["scontrol", "show", "job", job], env=e, capture_output=True, text=True, timeout=30
    ).stdout
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


def test_the_stop_signal_saves_requeues_and_the_requeued_job_resumes(data, slurm_cluster, tmp_path):
    """The signal `#SBATCH --signal=USR1@120` sends before the time limit (here at once, by scancel):
    both nodes' ranks stop at one step and save it, the script requeues the job, and the requeued
    job resumes from that checkpoint and finishes: one metrics row per step, no step twice."""
    dump, out = tmp_path / "run", tmp_path / "job.out"
    e = env(
        SLURM_CONF=str(slurm_cluster), NGPU="1", RDZV_PORT=str(free_port()), LOG_DIR=str(tmp_path / "logs")
    )
    argv = [
        *overrides(data, dump),
        "--training.steps=40",
        "--checkpoint.enable=true",
        "--checkpoint.interval=1000",
    ]
    sub = [
        "sbatch",
        "--parsable",
        "-N",
        "2",
        "-o",
        str(out),
        "--open-mode=append",
        "scripts/multinode_trainer.slurm",
    ]
    r = subprocess.run([*sub, *argv], cwd=ROOT, env=e, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    job = r.stdout.strip().split(";")[0]
    deadline, signalled, requeued_at = time.time() + 900, False, 0.0
    try:
        while True:
            state = job_state(job, e)
            if not signalled and (dump / "metrics.jsonl").exists() and len(losses(dump)) >= 3:
                subprocess.run(["scancel", "--signal=USR1", job], env=e, check=True, timeout=30)
                signalled = True
            if (
                state.get("Restarts") == "1" and not requeued_at
            ):  # held cred_expire (10 s here) before it restarts
                requeued_at = time.time()
            if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
                break
            log = out.read_text() if out.exists() else ""
            assert "held" not in state.get("Reason", "").lower(), (
                f"{state}\n{log[-3000:]}\n{slurm_logs(slurm_cluster)}"
            )
            assert time.time() < deadline, f"job {job} still {state.get('JobState')}:\n{log[-3000:]}"
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", job], env=e, capture_output=True, timeout=30)
    log = out.read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", (
        f"{state}\n{log[-4000:]}\n{slurm_logs(slurm_cluster, 30)}"
    )
    assert state["Restarts"] == "1", state
    print(
        f"requeued job: pending {state.get('EligibleTime')}, finished {time.time() - requeued_at:.0f} s after"
    )
    m = re.search(r"stopped by SIGUSR1 at step (\d+); saved (\S+)", log)
    assert m and "requeueing job" in log, log[-4000:]
    step = int(m.group(1))
    assert (
        m.group(2).rstrip(";").endswith(f"step-{step}")
        and f"checkpoint/step-{step}" in log.split("requeueing job")[1]
    )
    rows = [json.loads(x) for x in (dump / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 41))


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
