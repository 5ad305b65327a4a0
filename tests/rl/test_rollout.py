"""Rollouts (rl/rollout.py) on a tiny model in fp64: the log-probs decoding saw equal the trainer's
forward on the same tokens (to rounding: the KV-cached one-row path sums in another order), the
target mask picks exactly the sampled tokens, and a seed gives the same rollout."""

from pathlib import Path

import pytest
import torch

from gptoss_titan.model.loss import IGNORE_INDEX
from gptoss_titan.rl.prompts import Prompt
from gptoss_titan.rl.rollout import _batches, rollout, sampling_seed

from ..conftest import build, python_cmd, run_ok, tiny_args


def prompts():
    return [Prompt([5, 6, 7, 8], {}, {}), Prompt([9, 10, 11], {}, {}), Prompt([1, 2, 3, 4], {}, {})]


def sample(model, seed):
    """3 completions of <= 6 tokens per prompt at temperature 0.8, fp64 CPU."""
    return rollout(
        model, prompts(), 3, 6, 0.8, 1.0, seed, torch.device("cpu"), torch.autocast("cpu", enabled=False)
    )


def test_decode_logprobs_equal_the_training_forward_fp64():
    torch.manual_seed(0)
    model = build(tiny_args()).double()
    ro = sample(model, seed=1)
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
    same = sample(model, seed=1)
    other = sample(model, seed=2)
    assert torch.equal(same.tokens, ro.tokens) and not torch.equal(other.tokens, ro.tokens)
    assert model.training  # left as it was


def test_prompts_of_one_length_decode_together():
    assert _batches(prompts(), 3, 64) == [[0, 2], [1]]
    assert _batches(prompts(), 3, 3) == [[0], [2], [1]]
    assert sampling_seed(0, 5, 1) != sampling_seed(0, 5, 0) != sampling_seed(0, 6, 0)


@pytest.mark.slow
def test_compiled_decode_samples_as_eager_with_one_graph_per_batch_shape():
    """compiled: the decode steps run through torch.compile (fp64 here, so the samples
    are the eager ones); the cache's capacity is rounded up (10 and 9 -> 16), so the two batches
    (6 and 3 rows) compile two graphs, not one per position or prompt length."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = build(tiny_args()).double()
    eager = sample(model, seed=1)
    before = counters["stats"]["unique_graphs"]
    compiled = rollout(
        model, prompts(), 3, 6, 0.8, 1.0, 1, torch.device("cpu"), torch.autocast("cpu", enabled=False),
        dtype=torch.float64, compiled=True,
    )  # fmt: skip
    assert counters["stats"]["unique_graphs"] - before == 2
    assert torch.equal(compiled.tokens, eager.tokens)
    # fp64 logits, log-probs stored in fp32: an fp32 rounding apart at most (|log p| < 8 here)
    torch.testing.assert_close(compiled.decode_logprobs, eager.decode_logprobs, rtol=2**-23, atol=2**-20)


@pytest.mark.slow
def test_fsdp_weights_gathered_once_per_rollout():
    r = run_ok(python_cmd(2, str(Path(__file__).parent / "gather_job.py")), timeout=600)
    assert "gathered once: 3 all-gathers for 12 forwards (per forward: 25); same samples" in r.stdout
