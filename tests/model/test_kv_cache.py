"""The KV cache (kv_cache.py) through the model's one forward: cached logits equal recomputation."""

import pytest
import torch

from ..conftest import build, tiny_args


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
            got.append(m(seq[:, t : t + 1], cache=cache, start_pos=torch.tensor(t)))
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-5, rtol=1e-5)
    sliding = [c for i, c in enumerate(cache.layers) if args.is_sliding(i)]
    assert all(c.k.shape[2] == window for c in sliding)  # ring buffer: memory does not grow with length
    assert cache.layers[1].k.shape[2] == 30


def test_several_tokens_on_a_filled_cache():
    """A second chunk of several tokens (chunked prefill) attends to the cached slots plus its own keys."""
    args = tiny_args(n_layers=2, sliding_window=4, max_seq_len=64)
    m = build(args).eval()
    seq = torch.randint(0, args.vocab_size, (1, 20))
    with torch.no_grad():
        full = m(seq)
        cache = m.new_cache(1, 20)
        parts = [
            m(seq[:, :6], cache=cache),
            m(seq[:, 6:15], cache=cache, start_pos=6),
            m(seq[:, 15:16], cache=cache, start_pos=torch.tensor(15)),
        ]
    torch.testing.assert_close(torch.cat(parts, dim=1), full[:, :16], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_decode_step_has_static_shapes(compiled):
    """A decode step is the model's own forward with the position as a tensor: eager and under
    torch.compile(fullgraph=True) it gives the full forward's logits at every position, well past
    the window, for a batch of 2, and compiled it is one graph for every step (no recompiles)."""
    args = tiny_args(n_layers=3, sliding_window=4, max_seq_len=64)
    m = build(args).eval()
    torch.manual_seed(1)
    seq = torch.randint(0, args.vocab_size, (2, 24))

    def step(tokens, pos, cache):
        return m(tokens, cache=cache, start_pos=pos)

    fn = torch.compile(step, fullgraph=True, dynamic=False) if compiled else step
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        full = m(seq)  # [B, T, V]
        cache = m.new_cache(2, 24)
        got = [m(seq[:, :5], cache=cache, start_pos=0)]
        for t in range(5, 24):
            got.append(fn(seq[:, t : t + 1], torch.tensor(t), cache))
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-5, rtol=1e-5)
    assert [c.k.shape[2] for c in cache.layers] == [4, 24, 4]  # the sliding layers keep the window only
    if compiled:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == 1


def test_cache_capacity_is_checked():
    m = build(tiny_args(max_seq_len=16))
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        m.new_cache(1, 17)
