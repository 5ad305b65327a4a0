"""Sampling (generate.py): cached decoding equals recomputation; the sampling rules do what they say."""

import pytest
import torch

from gptoss_titan.infer.generate import generate, sample_next

from ..conftest import build, tiny_args


def test_generate_cached_equals_uncached_and_stops():
    args = tiny_args(n_layers=2, sliding_window=4, max_seq_len=64)
    m = build(args).eval()
    prompt = torch.randint(0, args.vocab_size, (1, 6))
    a = generate(m, prompt, 20)
    b = generate(m, prompt, 20, use_cache=False)
    assert torch.equal(a, b) and a.shape == (1, 26)
    stop = int(a[0, 8])
    c = generate(m, prompt, 20, stop_ids=(stop,))
    assert c.shape[1] == 9 and int(c[0, -1]) == stop
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(m, prompt, 100)


def test_seeded_sampling_is_reproducible():
    args = tiny_args(n_layers=2, sliding_window=4, max_seq_len=64)
    m = build(args).eval()
    prompt = torch.randint(0, args.vocab_size, (1, 6))
    s1 = generate(m, prompt, 20, temperature=1.0, top_k=50, top_p=0.9, seed=3)
    s2 = generate(m, prompt, 20, temperature=1.0, top_k=50, top_p=0.9, seed=3)
    s3 = generate(m, prompt, 20, temperature=1.0, top_k=50, top_p=0.9, seed=4)
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)


@pytest.mark.slow
def test_generate_compiled_equals_eager():
    args = tiny_args(n_layers=2, sliding_window=4, max_seq_len=64)
    m = build(args).eval()
    prompt = torch.randint(0, args.vocab_size, (1, 6))
    assert torch.equal(generate(m, prompt, 16), generate(m, prompt, 16, compile=True))


def draws(logits: torch.Tensor, n: int = 4000, **kw) -> torch.Tensor:
    """Frequencies of n samples of one row of logits."""
    g = torch.Generator().manual_seed(0)
    ids = sample_next(logits.expand(n, -1), generator=g, **kw)
    return torch.bincount(ids, minlength=logits.shape[-1]).float() / n


def test_top_k_keeps_the_k_largest_and_renormalizes():
    probs = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    freq = draws(probs.log().unsqueeze(0), temperature=1.0, top_k=2, top_p=1.0)
    assert freq[[0, 2, 4]].sum() == 0  # only ids 1 and 3
    torch.testing.assert_close(freq[[1, 3]], torch.tensor([0.4, 0.3]) / 0.7, atol=0.03, rtol=0)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    """Sorted probabilities 0.4, 0.3, 0.2, 0.1 with top_p 0.6: 0.4 alone is short of 0.6, so 0.3 joins;
    0.2 would start above 0.6 and is dropped. Then renormalized: 4/7 and 3/7."""
    probs = torch.tensor([0.2, 0.1, 0.4, 0.3])
    freq = draws(probs.log().unsqueeze(0), temperature=1.0, top_k=0, top_p=0.6)
    assert freq[0] == 0 and freq[1] == 0
    torch.testing.assert_close(freq[[2, 3]], torch.tensor([4 / 7, 3 / 7]), atol=0.03, rtol=0)
    # top_p = 1 keeps everything, in proportion
    torch.testing.assert_close(
        draws(probs.log().unsqueeze(0), temperature=1.0, top_k=0, top_p=1.0), probs, atol=0.03, rtol=0
    )


def test_temperature_zero_is_greedy_and_temperature_sharpens():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert sample_next(logits, 0.0, 0, 1.0, None).tolist() == [1]
    hot, cold = (
        draws(logits, temperature=2.0, top_k=0, top_p=1.0),
        draws(logits, temperature=0.5, top_k=0, top_p=1.0),
    )
    assert cold[1] > torch.softmax(logits[0], -1)[1] > hot[1]
    torch.testing.assert_close(cold, torch.softmax(logits[0] / 0.5, -1), atol=0.03, rtol=0)
