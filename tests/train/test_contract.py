"""The resume contract (train/contract.py): must-match fields refused in one line before anything is
written, changes that take effect logged one line each, the global batch and the data changed with
a warning, training.steps at or below the checkpoint's step said; a new lr and schedule apply."""

import json

import pytest

from gptoss_titan.checkpoint.files import CheckpointError
from gptoss_titan.config import parse_args
from gptoss_titan.train.contract import resume_lines
from gptoss_titan.train.optim import lr_factor

from ..conftest import one_line_error, read_metrics, run_train_sh
from ..helpers.training import SMALL, argv_for


def saved(tmp_path, *extra):
    """A step-5 folder holding the config.json of argv_for's run with `extra`."""
    step = tmp_path / "checkpoint" / "step-5"
    step.mkdir(parents=True)
    (step / "config.json").write_text(json.dumps(parse_args(argv_for(tmp_path, *extra)).to_dict()))
    return step


def test_classes_of_change(tmp_path):
    step = saved(tmp_path, "--training.steps=10")
    same = parse_args(argv_for(tmp_path, "--training.steps=10", "--job.dump_folder=/elsewhere"))
    assert resume_lines(step, same, 2, 2) == []  # where the run goes is not compared
    cfg = parse_args(argv_for(tmp_path, "--training.steps=20", "--optimizer.lr=3e-2", "--training.seed=7"))
    lines = resume_lines(step, cfg, 4, 2)
    assert lines[0].startswith(
        "warning: resume: training.seed 0 -> 7: the sample order keeps the checkpoint's seed"
    )
    assert (
        lines[1]
        == "warning: resume: the global batch 2 -> 4 sequences: the data position (samples consumed) is kept"
    )
    assert (
        "resume: optimizer.lr 0.003 -> 0.03 from step 5" in lines
        and "resume: training.steps 10 -> 20 from step 5" in lines
    )
    with pytest.raises(
        CheckpointError, match=r"training.seq_len = 64 but the checkpoint .* was trained with 32"
    ):
        resume_lines(
            step, parse_args(argv_for(tmp_path, "--training.seq_len=64", "--training.steps=10")), 2, 2
        )
    with pytest.raises(CheckpointError, match="training.steps = 3 is below the checkpoint's step 5"):
        resume_lines(step, parse_args(argv_for(tmp_path, "--training.steps=3")), 2, 2)
    done = resume_lines(step, parse_args(argv_for(tmp_path, "--training.steps=5")), 2, 2)
    assert done[-1] == "resume: the run is complete at step 5 (training.steps = 5); raise it to train on"


@pytest.mark.slow
def test_through_the_launcher(tmp_path):
    """2 steps, then: another seq_len is refused before anything is written; a new lr takes effect
    at the resumed step (the schedule rebuilt from the new config), said in one line."""
    ckpt = ("--checkpoint.enable=true", "--metrics.sample_freq=0", "--lr_scheduler.warmup_steps=0", *SMALL)
    first = run_train_sh({"NGPU": "1"}, *argv_for(tmp_path, "--training.steps=2", *ckpt))
    assert first.returncode == 0, first.stderr[-2000:]
    config = (tmp_path / "run" / "config.json").read_bytes()
    r = run_train_sh({"NGPU": "1"}, *argv_for(tmp_path, "--training.steps=4", "--training.seq_len=64", *ckpt))
    assert r.returncode == 2 and "training.seq_len = 64 but the checkpoint" in one_line_error(r.stderr)
    assert (tmp_path / "run" / "config.json").read_bytes() == config  # nothing written
    r = run_train_sh({"NGPU": "1"}, *argv_for(tmp_path, "--training.steps=4", "--optimizer.lr=3e-2", *ckpt))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resume: optimizer.lr 0.003 -> 0.03 from step 2" in r.stdout
    lrs = {row["step"]: row["lr"] for row in read_metrics(tmp_path / "run") if "lr" in row}
    # the schedule of the new config (peak 3e-2 over 4 steps) at steps 3 and 4, not the old one's
    sched = parse_args(argv_for(tmp_path, *ckpt)).lr_scheduler
    assert lrs[1] == pytest.approx(3e-3 * lr_factor(1, 2, sched), rel=1e-6)
    assert [lrs[3], lrs[4]] == pytest.approx([3e-2 * lr_factor(s, 4, sched) for s in (3, 4)], rel=1e-6)
    r = run_train_sh({"NGPU": "1"}, *argv_for(tmp_path, "--training.steps=4", "--optimizer.lr=3e-2", *ckpt))
    assert r.returncode == 0 and "the run is complete at step 4" in r.stdout


def test_rl_keys(tmp_path):
    """A supervised checkpoint does not resume as RL (its data position and steps mean other
    things); a checkpoint from before [rl] existed resumes as a supervised run; a changed prompt
    set or count keeps the prompt position, with a warning."""
    step = saved(tmp_path, "--training.steps=10")
    rl = parse_args(argv_for(tmp_path, "--training.steps=10", "--rl.enable=true", "--rl.max_new_tokens=16"))
    with pytest.raises(
        CheckpointError, match=r"rl.enable = True but the checkpoint .* was trained with False"
    ):
        resume_lines(step, rl, 2, 2)
    saved_cfg = json.loads((step / "config.json").read_text())
    del saved_cfg["rl"]
    (step / "config.json").write_text(json.dumps(saved_cfg))
    assert resume_lines(step, parse_args(argv_for(tmp_path, "--training.steps=10")), 2, 2) == []
    step.joinpath("config.json").write_text(json.dumps(rl.to_dict()))
    more = parse_args(
        argv_for(
            tmp_path,
            "--training.steps=10",
            "--rl.enable=true",
            "--rl.max_new_tokens=16",
            "--rl.prompts_per_step=8",
        )
    )
    assert resume_lines(step, more, 2, 2) == [
        "warning: resume: rl.prompts_per_step 4 -> 8: the prompt position (prompts consumed) is kept: "
        "the next steps take the new count"
    ]
