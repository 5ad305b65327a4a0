"""Crash safety, proven by breaking things: SIGKILL of the launcher at several points and an
immediate restart, two runs on one folder, damaged checkpoint files, NaN gradients, a full disk.

Runs use the bench flavor on CPU (gloo). "Bitwise" comparisons are of final checkpoints written by
runs with the same process and thread counts (CPU reductions split by thread count round
differently).
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ..conftest import ROOT, free_port, losses, one_line_error, run_ok, two_at_a_time
from ..helpers.checkpoint import base_args, weights

HERE = Path(__file__).parent
pytestmark = pytest.mark.slow


def args(tmp: Path, run: str, *extra: str) -> list[str]:
    """test_manager's bench-flavor run, 8 steps of 2 sequences, checkpoints every 2 steps."""
    return base_args(
        tmp,
        run,
        "--training.local_batch_size=2",
        "--training.steps=8",
        "--lr_scheduler.decay_steps=6",
        "--checkpoint.interval=2",
        *extra,
    )


def chaos(nproc: int, port: int, argv: list[str], *faults: str) -> list[str]:
    """The command of a chaos_train.py run; with nproc > 1 through the launcher run_train.sh calls
    (torchrun's agent, our exit codes) on a fixed port."""
    script = [str(HERE / "chaos_train.py"), *faults, *argv]
    if nproc == 1:
        return [sys.executable, *script]
    return [
        sys.executable,
        "-m",
        "gptoss_titan.runtime.launcher",
        f"--nproc_per_node={nproc}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        *script,
    ]


def run_in_root(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
    )


def workers_of(run: Path) -> list[int]:
    """Live processes whose command line names this run folder (the trainer's workers)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (p / "stat").read_text().split()[2]
            except OSError:
                continue
            if str(run) in cmd and "chaos_train.py" in cmd and state != "Z":
                pids.append(int(p.name))
    return pids


def logged_steps(run: Path) -> int:
    """Training steps in metrics.jsonl so far (complete lines only: the file is being written)."""
    text = (run / "metrics.jsonl").read_text()
    return sum('"loss"' in line for line in text.splitlines(keepends=True) if line.endswith("\n"))


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "timed out: " + log.read_text()[-3000:]
        time.sleep(0.1)


@pytest.fixture(scope="module")
def straight(module_tmp):
    """The uninterrupted 2-process run every restart must reproduce (deleted with the module's
    folder after its last test)."""
    run_ok(chaos(2, free_port(), args(module_tmp, "straight")), cwd=ROOT)
    return module_tmp


@pytest.mark.parametrize("point", ["mid_step", "mid_async_save", "mid_validation"])
def test_sigkill_of_the_launcher_then_restart_at_once(straight, point):
    """Kill -9 of torchrun alone: its workers die with it (no orphan writes on), the same command
    restarts at once on the same port (the old connections are in TIME_WAIT), resumes from the
    newest intact step and ends with the uninterrupted run's weights, bit for bit."""
    tmp, port = straight, free_port()
    run = tmp / point
    faults = {"mid_step": (), "mid_async_save": ("--slow-save", "8"), "mid_validation": ("--slow-val", "30")}[
        point
    ]
    extra = {
        "mid_step": (),
        "mid_async_save": ("--checkpoint.async_mode=async",),
        "mid_validation": ("--validation.enable=true", "--validation.freq=3", "--validation.steps=1"),
    }[point]
    argv = args(tmp, point, *extra)
    log = tmp / f"{point}.log"
    p = start(chaos(2, port, argv, *faults), log)
    ck = run / "checkpoint"
    ready = {
        "mid_step": lambda: (ck / "step-4").is_dir() and logged_steps(run) >= 5,
        "mid_async_save": lambda: (ck / "step-2").is_dir() and (ck / "step-4.tmp").is_dir(),
        "mid_validation": lambda: "validating" in log.read_text(),
    }[point]
    wait_for(lambda: (run / "metrics.jsonl").exists() and ready(), p, log)
    assert workers_of(run), "no worker found to be orphaned"
    os.kill(p.pid, signal.SIGKILL)  # the launcher only
    p.wait()
    deadline = time.time() + 20
    while workers_of(run) and time.time() < deadline:
        time.sleep(0.2)
    assert workers_of(run) == [], "a worker outlived its launcher"
    # at once, the same command on the same port, after the launch script's pre-launch check
    run_ok([sys.executable, "-m", "gptoss_titan.runtime.launch", "--nproc", "2", "--port", str(port)])
    r = run_ok(chaos(2, port, argv), cwd=ROOT)
    resumed_from = {"mid_step": "step-4", "mid_async_save": "step-2", "mid_validation": "step-2"}[point]
    assert f"checkpoint/{resumed_from}" in r.stdout + r.stderr
    a, b = weights(straight / "straight/checkpoint/step-8"), weights(ck / "step-8")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(ck.glob("*.tmp"))
    shutil.rmtree(run)  # ~640 MB of checkpoints: the suite's disk stays small


def test_one_run_per_folder_and_a_stale_lock(tmp_path):
    """A second run on a busy folder exits 2 with one line naming the holder; after the holder is
    killed, the next run takes the lock over with a warning and finishes."""
    argv = args(tmp_path, "run", "--training.steps=30")
    log = tmp_path / "first.log"
    first = start(chaos(1, 0, argv, "--slow-save", "2"), log)
    wait_for(lambda: (tmp_path / "run" / "metrics.jsonl").exists(), first, log)
    second = subprocess.run(
        [sys.executable, "-m", "gptoss_titan.train", *argv], capture_output=True, text=True, cwd=ROOT
    )
    assert second.returncode == 2
    err = one_line_error(second.stderr)
    assert f"in use by pid {first.pid} on " in err and "--job.dump_folder" in err
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    third = run_ok([sys.executable, "-m", "gptoss_titan.train", *args(tmp_path, "run")])
    assert f"took over the run folder's lock from pid {first.pid}" in third.stdout


def damage(step: Path, how: str) -> None:
    data = max(step.glob("*.distcp"), key=lambda f: f.stat().st_size)
    if how == "truncated":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif how == "zero_filled":
        data.write_bytes(bytes(data.stat().st_size))
    elif how == "bit_flipped":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        data.write_bytes(bytes(raw))
    elif how == "no_metadata":
        (step / ".metadata").unlink()


@pytest.mark.parametrize("how", ["truncated", "zero_filled", "bit_flipped", "no_metadata"])
def test_damaged_latest_checkpoint(tmp_path, capsys, how):
    """The newest step damaged: a resume passes over it with one warning naming it and loads the
    newest intact one; asking for it (load_step), converting or sampling it is one line, exit 2."""
    from gptoss_titan.train import main

    assert main(args(tmp_path, "run", "--training.steps=6")) == 0
    ck = tmp_path / "run" / "checkpoint"
    damage(ck / "step-6", how)
    capsys.readouterr()
    assert main(args(tmp_path, "run", "--training.steps=6", "--checkpoint.load_step=6")) == 2
    assert "step-6' is damaged" in one_line_error(capsys.readouterr().err)
    for r in two_at_a_time(
        run_in_root,
        [
            [
                sys.executable,
                "scripts/convert_dcp_to_safetensors.py",
                "--checkpoint",
                str(ck / "step-6"),
                "--output",
                str(tmp_path / "hf"),
            ],
            [
                sys.executable,
                "-m",
                "gptoss_titan.sample",
                "--checkpoint",
                str(ck / "step-6"),
                "--prompt",
                "1+1",
            ],
        ],
    ):
        assert r.returncode == 2 and "damaged" in one_line_error(r.stderr), r.stderr[-2000:]
    assert not (tmp_path / "hf").exists()
    assert main(args(tmp_path, "run", "--training.steps=8")) == 0
    out = capsys.readouterr().out
    assert "step-6' is damaged" in out and "passing over it" in out and "checkpoint/step-4" in out
    assert (ck / "step-8").is_dir() and (
        ck / "step-6" / ".metadata"
    ).is_file()  # trained on, step 6 rewritten


def test_damaged_safetensors_is_one_line(tmp_path, trained_hf):
    """The importer and the sampler on a truncated or zero-filled safetensors file: one line naming
    the file, exit 2, nothing written."""

    cmds, shards = [], []
    for how in ("truncated", "zero_filled"):
        folder = tmp_path / how
        shutil.copytree(trained_hf, folder)
        shard = sorted(folder.glob("*.safetensors"))[0]
        raw = shard.read_bytes()
        shard.write_bytes(raw[: len(raw) // 2] if how == "truncated" else bytes(len(raw)))
        out = tmp_path / f"dcp_{how}"
        cmds += [
            [sys.executable, "scripts/convert_hf_to_dcp.py", "--hf", str(folder), "--output", str(out)],
            [sys.executable, "-m", "gptoss_titan.sample", "--hf", str(folder), "--prompt", "1+1"],
        ]
        shards += [shard.name] * 2
    for r, name in zip(two_at_a_time(run_in_root, cmds), shards):
        assert r.returncode == 2 and name in one_line_error(r.stderr), r.stderr[-2000:]
    assert not list(tmp_path.glob("dcp_*"))


@pytest.mark.parametrize("nproc", [1, 2])
def test_nan_gradients_skip_the_step_on_every_rank(tmp_path, nproc):
    """NaN in one gradient on rank 0 at step 3: every rank skips the update (parameters, AdamW
    state, LR schedule, expert biases), and the rest of the run equals a run that consumed that
    step's batch without updating, bit for bit - through a checkpoint saved right after the skip."""
    extra = ("--model.load_balance_bias=true", "--checkpoint.interval=3")
    a = run_ok(chaos(nproc, free_port(), args(tmp_path, "nan", *extra), "--nan-at", "3"), cwd=ROOT)
    assert "step 3 skipped: loss or gradient norm not finite (1 in a row, 1 in all)" in a.stdout + a.stderr
    run_ok(chaos(nproc, free_port(), args(tmp_path, "ref", *extra), "--skip-at", "3"), cwd=ROOT)
    assert losses(tmp_path / "nan")[3:] == losses(tmp_path / "ref")[3:]
    wa, wb = weights(tmp_path / "nan/checkpoint/step-8"), weights(tmp_path / "ref/checkpoint/step-8")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # resumed from the checkpoint written right after the skipped step: the same end
    resumed = args(
        tmp_path,
        "resumed",
        *extra,
        f"--checkpoint.initial_load_path={tmp_path / 'nan/checkpoint/step-3'}",
        "--checkpoint.initial_load_model_only=false",
    )
    run_ok(chaos(nproc, free_port(), resumed), cwd=ROOT)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "nan")[3:]


def test_too_many_skips_stop_the_run_with_exit_3(tmp_path):
    r = subprocess.run(
        chaos(1, 0, args(tmp_path, "run", "--training.max_skipped_steps=2"), "--nan-from", "5"),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 3, r.stderr[-2000:]
    err = one_line_error(r.stderr)
    assert "2 steps in a row were skipped" in err and "the last at step 6" in err
    assert f"the last intact checkpoint is {tmp_path / 'run/checkpoint/step-4'}" in err


def limited(limit: int):
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("on_error", ["stop", "continue"])
def test_a_save_into_a_full_disk_fails_cleanly(tmp_path, on_error):
    """Files larger than 4 MB fail to write (RLIMIT_FSIZE, as a full disk would): the save leaves no
    step folder, says so in one line and stops the run (exit 3) or goes on; the previous
    checkpoint stays loadable and a later run resumes from it."""
    assert (
        subprocess.run(
            [sys.executable, "-m", "gptoss_titan.train", *args(tmp_path, "run", "--training.steps=2")],
            capture_output=True,
            cwd=ROOT,
        ).returncode
        == 0
    )
    argv = args(tmp_path, "run", "--training.steps=4", f"--checkpoint.on_save_error={on_error}")
    r = subprocess.run(
        [sys.executable, "-m", "gptoss_titan.train", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        preexec_fn=limited(4 << 20),
    )
    ck = tmp_path / "run" / "checkpoint"
    assert sorted(p.name for p in ck.iterdir()) == ["step-2"]
    if on_error == "stop":
        assert r.returncode == 3
        err = one_line_error(r.stderr)
        assert (
            "checkpoint step 4 failed and was removed (" in err
            and "files are limited to 4194304 bytes" in err
        )
        assert f"the last intact checkpoint is {ck / 'step-2'}" in err
    else:
        assert r.returncode == 0 and "training goes on" in r.stdout
    run_ok([sys.executable, "-m", "gptoss_titan.train", *args(tmp_path, "run", "--training.steps=4")])
    assert sorted(p.name for p in ck.iterdir()) == ["step-2", "step-4"]
