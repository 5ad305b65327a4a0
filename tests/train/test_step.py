"""TrainStep (train/step.py) on one process: a step updates the weights and advances the schedule
a step later; a non-finite gradient skips the update on the device; too many skips in a row stop
the run; bf16 without FSDP is autocast."""

import pytest
import torch

from gptoss_titan.train.step import SkipLimitReached, TrainStep

from ..helpers.training import SMALL, host_batches, train_step_for


def weights(step: TrainStep) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in step.model.state_dict().items()}


def test_a_step_updates_and_the_schedule_follows_a_step_later(tmp_path):
    _, step = train_step_for(
        tmp_path, *SMALL, "--lr_scheduler.warmup_steps=4", "--training.global_batch_size=4"
    )
    assert step.plan.accum_steps == 2 and step.autocast_dtype is None
    before = weights(step)
    lr0 = step.optimizer.param_groups[0]["lr"]
    r = step(host_batches(step), 1)
    assert torch.isfinite(r.loss) and float(r.skipped) == 0.0 and r.lr == lr0
    # targets: every token of 2 micro-batches x 2 sequences x 32 positions
    assert int(r.target_tokens) == 2 * 2 * 32 and r.expert_counts.sum() > 0
    after = weights(step)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert step.optimizer.param_groups[0]["lr"] == lr0  # the schedule waits for settle()
    step.settle()
    assert step.optimizer.param_groups[0]["lr"] > lr0  # warmup: the applied step advanced it


class PoisonedStep(TrainStep):
    """A NaN in one gradient at the steps listed."""

    poison: set[int] = set()

    def clip_gradients(self, step):
        if step in self.poison:
            p = next(p for p in self.model.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("nan")
        return super().clip_gradients(step)


def test_a_nan_gradient_skips_the_update_and_too_many_stop(tmp_path):
    cfg, _ = train_step_for(
        tmp_path, *SMALL, "--training.max_skipped_steps=2", "--optimizer.implementation=foreach"
    )
    from gptoss_titan.parallel.build import build_model, plan_run

    plan = plan_run(cfg, 1)
    step = PoisonedStep(
        cfg, plan, build_model(cfg, plan, None, torch.device("cpu")), None, torch.device("cpu")
    )
    step.poison = {2, 3}
    step(host_batches(step, 1), 1)
    before = weights(step)
    r = step(host_batches(step, 2), 2)
    assert float(r.skipped) == 1.0 and not torch.isfinite(r.grad_norm)
    after = weights(step)
    # the expert-balancing bias moves with rate x (1 - skip) = 0: nothing changes at all
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(SkipLimitReached, match="2 steps in a row were skipped .* the last at step 3"):
        step(host_batches(step, 3), 3)
        step.settle()


def test_bf16_without_fsdp_is_autocast(tmp_path):
    _, step = train_step_for(tmp_path, *SMALL, "--training.mixed_precision_param=bfloat16")
    assert step.autocast_dtype == torch.bfloat16
    with step.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    assert step.parts() == [step.model] and step.all_reduce(torch.ones(())) == 1
