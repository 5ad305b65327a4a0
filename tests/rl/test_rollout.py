"""Rollouts (rl/rollout.py) on a tiny model in fp64: the log-probs decoding saw equal the trainer's
forward on the same tokens (to rounding: the KV-cached one-row path sums in another order), the
target mask picks exactly the sampled tokens, and a seed gives the same rollout."""

import torch

from gptoss_titan.model.loss import IGNORE_INDEX
from gptoss_titan.rl.prompts import Prompt
from gptoss_titan.rl.rollout import _batches, rollout, sampling_seed

from ..conftest import build, tiny_args


def prompts():
    return [Prompt([5, 6, 7, 8], {}, {}), Prompt([9, 10, 11], {}, {}), Prompt([1, 2, 3, 4], {}, {})]


def test_decode_logprobs_equal_the_training_forward_fp64():
    torch.manual_seed(0)
    model = build(tiny_args()).double()
    ro = rollout(
        model,
        prompts(),
        3,
        6,
        0.8,
        1.0,
        seed=1,
        device=torch.device("cpu"),
        autocast=torch.autocast("cpu", enabled=False),
    )
    assert ro.tokens.shape == (9, 4 + 6) and ro.prompt_lens == [4] * 3 + [3] * 3 + [4] * 3
    mask = ro.target_mask()
    assert mask.sum() == sum(ro.completion_lens) == 9 * 6  # vocabulary 256 holds no stop token
    assert torch.equal(ro.tokens[3:6, 3 + 6 :], torch.full((3, 1), 199999))  # the shorter prompt: padded
    y = torch.where(mask, ro.tokens[:, 1:], IGNORE_INDEX)
    with torch.no_grad():
        logp, _, _ = model(ro.tokens[:, :-1], y, logprob_temperature=0.8)
    # the training path computes its log-probs in fp32 (model/logprobs.py): a few fp32 ulps
    torch.testing.assert_close(ro.decode_logprobs.double(), logp.double() * mask, rtol=0, atol=2e-6)
    assert bool((ro.decode_logprobs[~mask] == 0).all())
    same = rollout(
        model,
        prompts(),
        3,
        6,
        0.8,
        1.0,
        seed=1,
        device=torch.device("cpu"),
        autocast=torch.autocast("cpu", enabled=False),
    )
    other = rollout(
        model,
        prompts(),
        3,
        6,
        0.8,
        1.0,
        seed=2,
        device=torch.device("cpu"),
        autocast=torch.autocast("cpu", enabled=False),
    )
    assert torch.equal(same.tokens, ro.tokens) and not torch.equal(other.tokens, ro.tokens)
    assert model.training  # left as it was


def test_prompts_of_one_length_decode_together():
    assert _batches(prompts(), 3, 64) == [[0, 2], [1]]
    assert _batches(prompts(), 3, 3) == [[0], [2], [1]]
    assert sampling_seed(0, 5, 1) != sampling_seed(0, 5, 0) != sampling_seed(0, 6, 0)
