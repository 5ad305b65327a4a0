"""The launcher users call (scripts/run_train.sh -> gptoss_titan.runtime.launcher, torchrun's agent):
the worker's exit code and its one line reach the shell, with no torchrun report; a rank that
dies by a signal is named with its signal."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ..conftest import ROOT, free_port, one_line_error, run_train_sh, synthetic_data


def base(tmp_path: Path, *extra: str) -> list[str]:
    data = synthetic_data(tmp_path / "data")
    return [
        "--model.flavor=bench",
        f"--data.dataset_path={data}",
        f"--job.dump_folder={tmp_path / 'run'}",
        "--training.seq_len=32",
        "--training.local_batch_size=2",
        "--metrics.sample_freq=0",
        "--metrics.log_freq=1",
        *extra,
    ]


@pytest.mark.slow
def test_an_error_after_launch_is_one_line_and_exit_2(tmp_path):
    """Bad data found by the workers (ids beyond the vocabulary): 2 processes, exit 2, one line."""
    r = run_train_sh({"NGPU": "2"}, *base(tmp_path, "--training.steps=2", "--model.args.vocab_size=4096"))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr
    assert ">= the model's vocab_size 4096" in one_line_error(r.stderr)
    assert "ChildFailedError" not in r.stdout + r.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_damaged_stream_data_after_launch_is_one_line_and_exit_2(tmp_path):
    """data.stream read by the workers: a truncated .gz (2 processes, read in a loader worker
    process) and invalid UTF-8 with data.stream_strict (1 process, read in the trainer): exit 2,
    one line naming the file."""
    import gzip
    import json

    rows = "".join(json.dumps({"text": f"In the beginning {i} " * 30}) + "\n" for i in range(40))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(rows)
    data = (tmp_path / "c.jsonl.gz").read_bytes()
    (tmp_path / "c.jsonl.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "u.jsonl").write_bytes(rows.encode() + b'{"text": "caf\xe9"}\n')

    def stream(spec: str, *extra: str) -> list[str]:
        argv = [a for a in base(tmp_path, "--training.steps=100", *extra) if "dataset_path" not in a]
        return [*argv, "--model.flavor=debug", f"--data.stream={spec}", "--validation.enable=false"]

    r = run_train_sh({"NGPU": "2"}, *stream(str(tmp_path / "c.jsonl.gz"), "--data.stream_workers=1"))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr
    # the rank that met the damage first says so; rank 0 (shown) may instead lose a collective to it
    lines = r.stderr.strip().splitlines()
    assert all(x.startswith("error: ") for x in lines) and "Traceback" not in r.stdout + r.stderr, r.stderr
    assert "c.jsonl.gz' is a truncated or damaged gz file (after line" in lines[-1], r.stderr
    r = run_train_sh(
        {}, *stream(str(tmp_path / "u.jsonl"), "--data.stream_workers=0", "--data.stream_strict=true")
    )
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr
    assert f"{tmp_path / 'u.jsonl'}:41 is not valid UTF-8 (byte" in one_line_error(r.stderr)
    assert "drop data.stream_strict = true" in r.stderr


def worker_pids(launcher: int) -> dict[int, int]:
    """Global rank -> pid of the launcher's workers (their RANK variable)."""
    out = {}
    for pid in subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout.split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = [e for e in env if e.startswith(b"RANK=")]
        if rank:
            out[int(rank[0][5:])] = int(pid)
    return out


@pytest.mark.slow
def test_a_rank_killed_by_a_signal_is_named(tmp_path):
    env = {**os.environ, "NGPU": "2", "MASTER_PORT": str(free_port())}
    p = subprocess.Popen(
        [str(ROOT / "scripts" / "run_train.sh"), *base(tmp_path, "--training.steps=100000")],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        metrics = tmp_path / "run" / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline:
            assert p.poll() is None, p.communicate()
            time.sleep(0.5)
        os.kill(worker_pids(p.pid)[1], signal.SIGKILL)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signal.SIGKILL, err
    # rank 0 (the rank shown) says in one line that a collective failed; the launcher names the cause
    assert "Traceback" not in out + err and "ChildFailedError" not in out + err, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: rank 1 (pid ") and "died by SIGKILL" in lines[-1], err
    assert all(line.startswith("error: ") for line in lines) and len(lines) <= 2, err


def start(tmp_path: Path, *extra: str, nproc: int = 2) -> subprocess.Popen:
    env = {**os.environ, "NGPU": str(nproc), "MASTER_PORT": str(free_port())}
    return subprocess.Popen(
        [str(ROOT / "scripts" / "run_train.sh"), *base(tmp_path, *extra)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: Ctrl-C is a SIGINT to the whole group
    )


def wait_for_step(p: subprocess.Popen, run: Path, step: int) -> None:
    deadline = time.monotonic() + 300
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert p.poll() is None, p.communicate()
        rows = metrics.read_text().splitlines() if metrics.exists() else []
        if sum('"loss"' in r for r in rows) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within 300 s")


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig,nproc",
    [(signal.SIGTERM, 2), (signal.SIGUSR1, 2), (signal.SIGINT, 1)],
    ids=["TERM-2", "USR1-2", "INT-1"],
)
def test_a_signal_stops_every_rank_at_one_step_saves_it_and_the_rerun_resumes_exactly(tmp_path, sig, nproc):
    """SIGTERM (scancel, preemption) or SIGUSR1 (sbatch --signal) to the launcher, or Ctrl-C (SIGINT
    to the whole process group): every rank stops at the same step, saves it, says so in one line,
    exit 128 + N; the same command resumes from it and continues bit for bit as a run that never
    stopped."""
    ckpt = ("--checkpoint.enable=true", "--checkpoint.interval=1000")
    p = start(tmp_path, "--training.steps=1000", *ckpt, nproc=nproc)
    try:
        wait_for_step(p, tmp_path / "run", 2)
        if sig == signal.SIGINT:
            os.killpg(p.pid, sig)  # Ctrl-C: the terminal signals the launcher and its workers
        else:
            os.kill(p.pid, sig)  # the launcher (run_train.sh execs it)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + sig, err
    assert "Traceback" not in out + err and "ChildFailedError" not in out + err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    stop = next(line for line in lines if "stopped by" in line)
    n = int(stop.split(" at step ")[1].split(";")[0])
    assert (
        f"stopped by {sig.name} at step {n}; saved " in stop and f"step-{n}; rerun the same command" in stop
    )
    ckpts = sorted(q.name for q in (tmp_path / "run" / "checkpoint").iterdir())
    assert ckpts == [f"step-{n}"], ckpts  # the stop step, intact (no .tmp left)
    if sig == signal.SIGUSR1:
        return
    again = run_train_sh({"NGPU": str(nproc)}, *base(tmp_path, f"--training.steps={n + 2}", *ckpt))
    assert again.returncode == 0, again.stderr[-3000:]
    ref_dir = tmp_path / "ref"
    ref = run_train_sh(
        {"NGPU": str(nproc)}, *base(tmp_path, f"--training.steps={n + 2}", f"--job.dump_folder={ref_dir}")
    )
    assert ref.returncode == 0, ref.stderr[-3000:]

    def losses_after(run: Path) -> list:
        rows = [r for r in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
        return [r.split('"loss": ')[1].split(",")[0] for r in rows][n:]

    resumed = losses_after(tmp_path / "run")
    assert len(resumed) == 2 and resumed == losses_after(ref_dir)  # the two steps after the stop


@pytest.mark.slow
def test_twin_launches_on_one_port(tmp_path):
    """Two launches at the same instant on the same port and folder: one trains, the other is
    refused at once in one line (exit 2) instead of joining the first one's rendezvous."""
    port = str(free_port())
    argv = base(tmp_path, "--training.steps=3")
    env = {**os.environ, "NGPU": "2", "MASTER_PORT": port}
    procs = [
        subprocess.Popen(
            [str(ROOT / "scripts" / "run_train.sh"), *argv],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [o[1][-2000:] for o in outs]
    err = next(o[1] for p, o in zip(procs, outs) if p.returncode == 2)
    line = one_line_error(err)
    # refused by the launcher's port lock, or - if the first one listens already - the port check
    assert line.startswith(f"error: rendezvous port {port} is in use "), line
