"""KV-cached decoding equals full recomputation; sampling is reproducible."""

import pytest
import torch

from gptoss_titan.generate import generate

from .conftest import build, tiny_args


@pytest.mark.parametrize("window", [4, 8])
def test_cached_logits_equal_full_recomputation(window):
    args = tiny_args(n_layers=3, sliding_window=window, max_seq_len=64)
    m = build(args).eval()
    torch.manual_seed(0)
    seq = torch.randint(0, args.vocab_size, (2, 30))
    with torch.no_grad():
        full = m(seq)  # [B, T, V]
        cache = m.new_cache(2, 30)
        prefix = 7  # prefill, then one token at a time, well past the window
        got = [m(seq[:, :prefix], cache=cache, start_pos=0)]
        for t in range(prefix, 30):
            got.append(m(seq[:, t : t + 1], cache=cache, start_pos=t))
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-5, rtol=1e-5)
    sliding = [c for i, c in enumerate(cache.layers) if args.is_sliding(i)]
    assert all(c.k.shape[2] == window for c in sliding)  # ring buffer: memory does not grow with length
    assert cache.layers[1].k.shape[2] == 30


def test_generate_cached_equals_uncached_and_seeded_sampling():
    args = tiny_args(n_layers=2, sliding_window=4, max_seq_len=64)
    m = build(args).eval()
    prompt = torch.randint(0, args.vocab_size, (1, 6))
    a = generate(m, prompt, 20)
    b = generate(m, prompt, 20, use_cache=False)
    assert torch.equal(a, b) and a.shape == (1, 26)
    s1 = generate(m, prompt, 20, temperature=1.0, top_k=50, top_p=0.9, seed=3)
    s2 = generate(m, prompt, 20, temperature=1.0, top_k=50, top_p=0.9, seed=3)
    s3 = generate(m, prompt, 20, temperature=1.0, top_k=50, top_p=0.9, seed=4)
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    stop = int(a[0, 8])
    c = generate(m, prompt, 20, stop_ids=(stop,))
    assert c.shape[1] == 9 and int(c[0, -1]) == stop
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(m, prompt, 100)


@pytest.mark.parametrize("compiled", [False, True])
def test_static_decode_step_equals_full_recomputation(compiled):
    """The static-shape decode step (eager and torch.compile'd) gives the full forward's logits at
    every position, well past the window, for a batch of 2 with K = 2 of 4 experts per row."""
    from gptoss_titan.model.decode import decode_step

    args = tiny_args(n_layers=3, sliding_window=4, max_seq_len=64)
    m = build(args).eval()
    torch.manual_seed(1)
    seq = torch.randint(0, args.vocab_size, (2, 24))
    step = torch.compile(decode_step, fullgraph=True, dynamic=False) if compiled else decode_step
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        full = m(seq)  # [B, T, V]
        cache = m.new_cache(2, 24)
        got = [m(seq[:, :5], cache=cache, start_pos=0)]
        for t in range(5, 24):
            got.append(step(m, seq[:, t : t + 1], torch.tensor(t), cache).unsqueeze(1))
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-5, rtol=1e-5)
    assert [c.k.shape[2] for c in cache.layers] == [4, 24, 4]  # the sliding layers keep the window only
    if compiled:  # one graph for every step: no recompilation as the position moves
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == 1


def test_generate_compiled_equals_eager():
    args = tiny_args(n_layers=2, sliding_window=4, max_seq_len=64)
    m = build(args).eval()
    prompt = torch.randint(0, args.vocab_size, (1, 6))
    assert torch.equal(generate(m, prompt, 16), generate(m, prompt, 16, compile=True))
