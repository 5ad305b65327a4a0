"""The checkpoint layout on disk (checkpoint/files.py): step folders, which of them are complete,
what a path given by a user resolves to, the saved model args, and their one-line errors."""

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

from gptoss_titan.checkpoint.files import (
    MODEL_ARGS_FILE,
    CheckpointError,
    check_model_args,
    checkpoint_fqns,
    checkpoint_keys,
    complete_steps,
    read_model_args,
    resolve_step_dir,
    step_dir,
    step_folders,
)

from ..conftest import tiny_args

# DCP's note that a save without a process group is a one-process save
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def make_steps(folder, finished=(), renamed_only=(), in_flight=()):
    """step-<N> folders with .metadata (finished), without it (renamed_only), and step-<N>.tmp ones."""
    for n in finished:
        step_dir(folder, n).mkdir(parents=True)
        (step_dir(folder, n) / ".metadata").write_bytes(b"")
    for n in renamed_only:
        step_dir(folder, n).mkdir(parents=True)
    for n in in_flight:
        (folder / f"step-{n}.tmp").mkdir(parents=True)
        (folder / f"step-{n}.tmp" / ".metadata").write_bytes(b"")
    return folder


def test_step_folders_and_complete_steps(tmp_path):
    ck = make_steps(tmp_path / "checkpoint", finished=(2, 10, 9), renamed_only=(12,), in_flight=(14,))
    (ck / "step-15").write_text("a file, not a step")
    (ck / "step-x").mkdir()
    (ck / "step-16.pt").write_bytes(b"")
    assert step_dir(ck, 3) == ck / "step-3"
    assert step_folders(ck) == [2, 9, 10, 12]  # numeric order; renamed saves, intact or not
    assert complete_steps(ck) == [2, 9, 10]  # only those with their metadata
    assert step_folders(tmp_path / "none") == [] and complete_steps(tmp_path / "none") == []


def test_resolve_a_step_a_checkpoint_folder_or_a_run_folder(tmp_path):
    run = tmp_path / "run"
    ck = make_steps(run / "checkpoint", finished=(3, 6), renamed_only=(9,), in_flight=(12,))
    assert resolve_step_dir(str(ck / "step-3")) == ck / "step-3"
    assert resolve_step_dir(str(ck)) == ck / "step-6"  # the newest complete step
    assert resolve_step_dir(str(run)) == ck / "step-6"


@pytest.mark.parametrize(
    "path, match",
    [
        ("missing", r"checkpoint '.*missing' does not exist; pass a step-<N> folder or a run folder"),
        ("run/checkpoint/step-9", r"'.*step-9' is damaged \(its .metadata is missing\); pass another step"),
        ("run", r"no complete checkpoint under '.*run' \(no step-<N>/.metadata\)"),  # only a .tmp save
        ("empty", r"no complete checkpoint under '.*empty' \(no step-<N>/.metadata\); pass a step folder"),
    ],
    ids=["missing", "damaged", "in_flight", "empty"],
)
def test_resolve_errors(tmp_path, path, match):
    make_steps(tmp_path / "run" / "checkpoint", renamed_only=(9,), in_flight=(12,))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=match):
        resolve_step_dir(str(tmp_path / path))


def test_model_args_round_trip_and_mismatch(tmp_path):
    args = tiny_args()
    with pytest.raises(
        CheckpointError, match=rf"has no {MODEL_ARGS_FILE}; it is not a gptoss-titan checkpoint"
    ):
        read_model_args(tmp_path)
    with pytest.raises(
        CheckpointError, match=rf"has no {MODEL_ARGS_FILE}; it is not a gptoss-titan checkpoint"
    ):
        check_model_args(tmp_path, args)
    (tmp_path / MODEL_ARGS_FILE).write_text(json.dumps({**args.to_dict(), "a_field_of_later_versions": 1}))
    assert read_model_args(tmp_path) == args  # unknown fields are passed over
    check_model_args(tmp_path, args)
    with pytest.raises(
        CheckpointError,
        match=r"has model dim = 64 but the config gives 32; use the checkpoint's model.flavor or another",
    ):
        check_model_args(tmp_path, tiny_args(dim=32))
    (tmp_path / MODEL_ARGS_FILE).write_text(json.dumps({"dim": 64}))  # older files: only what they hold
    check_model_args(tmp_path, args)
    (tmp_path / MODEL_ARGS_FILE).write_text("{not json")
    for f in (read_model_args, lambda p: check_model_args(p, args)):
        with pytest.raises(CheckpointError, match=rf"has an unreadable {MODEL_ARGS_FILE} \("):
            f(tmp_path)


def test_checkpoint_keys_and_names(tmp_path):
    step = tmp_path / "step-1"
    state = {
        "model": {"w": torch.ones(2), "layer.b": torch.zeros(3)},
        "train_state": {"step": torch.tensor(1)},
    }
    dcp.save(state, checkpoint_id=str(step), no_dist=True)  # one process, no process group
    assert checkpoint_fqns(step) == {"model.w", "model.layer.b", "train_state.step"}
    assert checkpoint_keys(step) == {"model", "train_state"}
    (step / ".metadata").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match=r"is unreadable \(\w+\); delete it or choose another"):
        checkpoint_keys(step)
