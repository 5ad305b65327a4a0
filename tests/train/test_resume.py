"""What a run resumes from (resume.py) and the one-line errors for bad requests (files.py)."""

import json

import pytest

from gptoss_titan.checkpoint.files import CheckpointError, complete_steps
from gptoss_titan.config import Checkpoint, ConfigError, parse_args
from gptoss_titan.model import FLAVORS
from gptoss_titan.train import main
from gptoss_titan.train.resume import Resume, choose_resume

from ..conftest import one_line_error
from ..helpers.checkpoint import base_args


def fake_step(folder, step, args=FLAVORS["bench"], keys=("model", "optimizer")):
    """A step folder with metadata files only (choose_resume reads nothing else but .metadata)."""
    import torch
    import torch.distributed.checkpoint as dcp

    d = folder / f"step-{step}"
    dcp.save({k: {"x": torch.zeros(1)} for k in keys}, checkpoint_id=str(d), no_dist=True)
    (d / "model_args.json").write_text(json.dumps(args.to_dict()))
    return d


def test_choose_resume(tmp_path):
    args = FLAVORS["bench"]
    ck = tmp_path / "checkpoint"
    cfg = Checkpoint(enable=True)
    assert choose_resume(cfg, ck, args) is None  # nothing yet
    fake_step(ck, 3)
    fake_step(ck, 6)
    (ck / "step-9.tmp").mkdir()  # an unfinished save never counts
    fake_step(ck, 12, keys=("model",))
    assert complete_steps(ck) == [3, 6, 12]
    assert choose_resume(cfg, ck, args) == Resume(ck / "step-12", model_only=True)  # a model-only save
    assert choose_resume(Checkpoint(enable=True, load_step=6), ck, args) == Resume(
        ck / "step-6", model_only=False
    )
    # the run's own checkpoints win over initial_load_path; without them, initial_load_path (a run folder)
    other = Checkpoint(enable=True, initial_load_path=str(ck), initial_load_model_only=False)
    assert choose_resume(other, ck, args).path == ck / "step-12"
    assert choose_resume(other, tmp_path / "empty", args) == Resume(ck / "step-12", model_only=False)
    assert choose_resume(Checkpoint(enable=False), ck, args) is None
    with pytest.raises(CheckpointError, match=r"load_step = 4 not found .* \(complete steps: 3, 6, 12\)"):
        choose_resume(Checkpoint(enable=True, load_step=4), ck, args)
    with pytest.raises(CheckpointError, match="has model dim = 256 but the config gives 64"):
        choose_resume(cfg, ck, FLAVORS["debug"])


def test_bad_exclude_from_loading_is_a_config_error():
    with pytest.raises(ConfigError, match="checkpoint.exclude_from_loading = 'optimiser' is not one of"):
        parse_args(["--checkpoint.exclude_from_loading=dataloader,optimiser"])


@pytest.mark.slow
def test_checkpoint_errors(tmp_path, capsys):
    assert main(base_args(tmp_path, "a", f"--checkpoint.initial_load_path={tmp_path / 'nope'}")) == 2
    assert "does not exist" in one_line_error(capsys.readouterr().err) and not (tmp_path / "a").exists()
    assert main(base_args(tmp_path, "run", "--training.steps=3")) == 0
    capsys.readouterr()
    assert main(base_args(tmp_path, "run", "--checkpoint.load_step=2")) == 2
    assert "load_step = 2 not found" in one_line_error(capsys.readouterr().err)
    assert (
        main(
            base_args(
                tmp_path,
                "b",
                "--model.flavor=debug",
                f"--checkpoint.initial_load_path={tmp_path / 'run/checkpoint/step-3'}",
            )
        )
        == 2
    )
    err = one_line_error(capsys.readouterr().err)
    assert "has model dim = 256 but the config gives 64" in err and not (tmp_path / "b").exists()
    meta = tmp_path / "run/checkpoint/step-3/.metadata"
    meta.write_bytes(meta.read_bytes()[:100])  # truncated
    before = (tmp_path / "run/metrics.jsonl").read_text()
    assert main(base_args(tmp_path, "run", "--training.steps=5")) == 2
    err = one_line_error(capsys.readouterr().err)  # the only step is damaged: no silent fresh start
    assert "every checkpoint in" in err and "is damaged" in err and ".metadata has" in err
    assert (tmp_path / "run/metrics.jsonl").read_text() == before
