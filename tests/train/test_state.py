"""TrainState (train/state.py) with the CheckpointManager on one process: the checkpoint's keys,
an exact round trip of every member (plain and async saves), model-only and excluded loads, a
missing member named in one line, optional members, and new ranks taking rank 0's generator."""

import pytest
import torch

from gptoss_titan.checkpoint.files import CheckpointError, step_dir
from gptoss_titan.checkpoint.manager import CheckpointManager
from gptoss_titan.config import SAVED_STATES
from gptoss_titan.config import Checkpoint as CkptConfig
from gptoss_titan.data import TokenLoader
from gptoss_titan.train.state import TrainState

from ..helpers.training import SMALL, train_step_for


def run_state(tmp_path, *extra):
    """(TrainStep, TrainState) of a small run with a real loader over synthetic tokens."""
    cfg, step = train_step_for(tmp_path, *SMALL, *extra)
    t = cfg.training
    tokens = torch.randint(0, step.plan.args.vocab_size, (4096,), generator=torch.Generator().manual_seed(1))
    loader = TokenLoader(tokens.numpy(), t.seq_len, t.local_batch_size, seed=t.seed)
    return step, TrainState.build(step.model, step.optimizer, step.lr_scheduler, loader, step.guard)


def train(step, state, n: int) -> None:
    for _ in range(n):
        state.progress.step += 1
        batches = [state.dataloader.next_batch() for _ in range(step.plan.accum_steps)]
        step(batches, state.progress.step)
        step.settle()


def snapshot(state: TrainState) -> dict:
    opt = state.optimizer.state_dict()["state"]
    return {
        "model": {k: v.clone() for k, v in state.model.state_dict().items()},
        "exp_avg": {k: v["exp_avg"].clone() for k, v in opt.items()},
        "lr": state.lr_scheduler.scheduler.get_last_lr(),
        "data": state.dataloader.state_dict(),
        "progress": state.progress.state_dict(),
        "rng": torch.get_rng_state(),
    }


def assert_same(a: dict, b: dict) -> None:
    for k in ("model", "exp_avg"):
        assert a[k].keys() == b[k].keys()
        assert all(torch.equal(a[k][n], b[k][n]) for n in a[k]), k
    assert a["lr"] == b["lr"] and a["data"] == b["data"] and a["progress"] == b["progress"]
    assert torch.equal(a["rng"], b["rng"])


def manager(folder, **kw) -> CheckpointManager:
    return CheckpointManager(folder, CkptConfig(enable=True, **kw), {"note.json": {"k": 1}})


def test_members_follow_saved_states_per_rank_keys_last():
    step_keys = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state", "step_guard", "rng")
    assert SAVED_STATES == step_keys  # the order they load in: the optimizer before the schedule
    state = TrainState(*[object()] * 6, guard=None)
    assert list(state.members(3)) == [
        "model",
        "optimizer",
        "lr_scheduler",
        "dataloader",
        "train_state",
        "rng_rank3",
    ]


@pytest.mark.parametrize("async_mode", ["disabled", "async"])
def test_round_trip_is_exact(tmp_path, async_mode):
    step, state = run_state(tmp_path, "--training.steps=6")
    train(step, state, 2)
    ckpt = manager(tmp_path / "ckpt", async_mode=async_mode)
    ckpt.save(2, state.state_dicts(0), blocking=True)
    assert (step_dir(tmp_path / "ckpt", 2) / "note.json").read_text().strip().startswith("{")
    saved = snapshot(state)
    train(step, state, 2)  # move everything on
    ref = snapshot(state)
    state.load(ckpt, step_dir(tmp_path / "ckpt", 2), [], model_only=False)
    assert_same(snapshot(state), saved)
    train(step, state, 2)  # and the continuation is the same computation, bit for bit
    assert_same(snapshot(state), ref)
    ckpt.close()


def test_model_only_excluded_missing_and_optional(tmp_path):
    step, state = run_state(tmp_path)
    train(step, state, 1)
    ckpt = manager(tmp_path / "ckpt")
    ckpt.save(1, state.state_dicts(0, model_only=True), blocking=True)
    path = step_dir(tmp_path / "ckpt", 1)
    with pytest.raises(
        CheckpointError, match="has no 'optimizer' state; add it to checkpoint.exclude_from_loading"
    ):
        state.load(ckpt, path, [], model_only=False)
    progress = state.progress.state_dict()
    state.load(ckpt, path, [], model_only=True)  # the model alone: the rest as it was
    state.load(ckpt, path, [k for k in SAVED_STATES if k != "model"], model_only=False)
    assert state.progress.state_dict() == progress
    # a checkpoint from before the step guard existed loads; the guard keeps its state
    full = state.state_dicts(0)
    del full["step_guard"]
    ckpt.save(2, full, blocking=True)
    state.guard.skipped_total = 7
    state.load(ckpt, step_dir(tmp_path / "ckpt", 2), [], model_only=False)
    assert state.guard.skipped_total == 7
    ckpt.close()


def test_new_ranks_take_rank_0s_generator(tmp_path):
    step, state = run_state(tmp_path)
    ckpt = manager(tmp_path / "ckpt")
    torch.manual_seed(123)
    saved = torch.get_rng_state()
    ckpt.save(1, state.state_dicts(0), blocking=True)
    torch.manual_seed(0)
    ckpt.rank = 1  # as rank 1 of a run resumed on more processes than saved
    state.load(ckpt, step_dir(tmp_path / "ckpt", 1), [], model_only=False)
    assert torch.equal(torch.get_rng_state(), saved)
    ckpt.close()
