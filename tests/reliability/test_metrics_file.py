"""metrics.jsonl across crashes, resumes and full disks (train/metrics.py): valid JSON, one row
per step, whatever happened; a full disk while logging stops the run in one line (exit 3, through
the launcher) or, if asked, the run goes on without the file."""

import json
import os
import resource
import signal
import subprocess
import time

import pytest

from gptoss_titan.train.metrics import repair_rows

from ..conftest import ROOT, free_port, one_line_error, run_train_sh, synthetic_data


def test_repair_drops_a_torn_row_and_the_rows_past_the_resumed_step(tmp_path, caplog, monkeypatch):
    from gptoss_titan.runtime.log import logger

    monkeypatch.setattr(logger, "propagate", True)
    f = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4)]
    f.write_text("\n".join(rows) + "\n" + '{"step": 5, "lo')  # killed mid-write
    with caplog.at_level("INFO", logger="gptoss_titan"):
        repair_rows(f, resume_step=3)
    assert f.read_text() == "\n".join(rows[:3]) + "\n"
    assert "dropped 1 torn row" in caplog.text and "1 row(s) past step 3" in caplog.text
    before = f.stat().st_mtime_ns
    repair_rows(f, resume_step=3)  # nothing to do: left alone
    assert f.stat().st_mtime_ns == before and not (tmp_path / "metrics.jsonl.tmp").exists()
    # a run whose count starts over (no full-state checkpoint) keeps the earlier rows aside
    repair_rows(f, resume_step=None)
    repair_rows(f, resume_step=None)  # nothing left to move
    assert not f.exists() and (tmp_path / "metrics.jsonl.prev").read_text() == "\n".join(rows[:3]) + "\n"
    f.write_text(rows[0] + "\n")
    repair_rows(f, resume_step=None)
    assert (tmp_path / "metrics.jsonl.prev2").read_text() == rows[0] + "\n"


def base(tmp_path, *extra):
    return [
        "--model.flavor=bench",
        f"--data.dataset_path={synthetic_data(tmp_path / 'data')}",
        f"--job.dump_folder={tmp_path / 'run'}",
        "--training.seq_len=32",
        "--training.local_batch_size=2",
        "--metrics.sample_freq=0",
        "--metrics.log_freq=1",
        "--validation.enable=false",
        *extra,
    ]


def steps_logged(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_one_row_per_step_after_a_kill_and_a_resume(tmp_path):
    ckpt = ("--checkpoint.enable=true", "--checkpoint.interval=3")
    env = {**os.environ, "NGPU": "1", "MASTER_PORT": str(free_port())}
    p = subprocess.Popen(
        [str(ROOT / "scripts" / "run_train.sh"), *base(tmp_path, "--training.steps=100000", *ckpt)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while (
        not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5) and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)  # launcher and worker at once, mid-run
    p.wait()
    with open(metrics, "a") as f:
        f.write('{"step": 99, "loss": 1.2')  # as if killed mid-row
    done = max(steps_logged_valid(metrics))
    r = run_train_sh({"NGPU": "1"}, *base(tmp_path, f"--training.steps={done + 2}", *ckpt))
    assert r.returncode == 0, r.stderr[-2000:]
    assert steps_logged(tmp_path / "run") == list(range(1, done + 3))
    assert "torn row" in r.stdout


def steps_logged_valid(path) -> list[int]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line)["step"])
        except ValueError:
            pass
    return out


def limited(nbytes: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


@pytest.mark.slow
@pytest.mark.parametrize("on_error", ["stop", "continue"])
def test_a_full_disk_while_logging(tmp_path, on_error):
    """Files may not grow past 24 KB (RLIMIT_FSIZE, as a full disk would): metrics.jsonl stops
    growing after a few dozen rows."""
    argv = base(tmp_path, "--training.steps=150", "--metrics.enable_tensorboard=false")
    r = subprocess.run(
        [str(ROOT / "scripts" / "run_train.sh"), *argv, f"--metrics.on_write_error={on_error}"],
        env={**os.environ, "NGPU": "1", "MASTER_PORT": str(free_port())},
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=limited(24 << 10),
        timeout=600,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    if on_error == "stop":
        assert r.returncode == 3, r.stderr[-2000:]
        err = one_line_error(r.stderr)
        limit = f"{metrics} could not be written (File too large; files are limited to {24 << 10} bytes (ulimit -f))"
        assert f"{limit}: stopped by an unwritable metrics.jsonl" in err, err
        assert "checkpoint.enable is false: nothing saved; or set metrics.on_write_error = continue" in err
    else:
        assert r.returncode == 0 and "no more rows are written to it" in r.stdout, r.stderr[-2000:]
    n = len(steps_logged_valid(metrics))
    assert 10 < n < 150
