"""The resumable, data-parallel token loader (loader.py)."""

import numpy as np
import pytest
import torch

from gptoss_titan.data import DataError, TokenLoader, open_split


def make_tokens(n=1000, vocab=50):
    return np.random.default_rng(0).integers(0, vocab, n).astype(np.uint32)


def test_loader_is_deterministic_and_resumable():
    tok = make_tokens()
    a = TokenLoader(tok, 16, 2, seed=3)
    batches = [a.next_batch() for _ in range(40)]  # > one epoch (62 samples)
    x, y = batches[0]
    assert x.shape == (2, 16) and torch.equal(x[:, 1:], y[:, :-1])
    b = TokenLoader(tok, 16, 2, seed=3)
    for _ in range(10):
        b.next_batch()
    c = TokenLoader(tok, 16, 2, seed=3)
    c.load_state_dict(b.state_dict())
    for i in range(10, 40):
        xc, yc = c.next_batch()
        assert torch.equal(xc, batches[i][0]) and torch.equal(yc, batches[i][1])
    d = TokenLoader(tok, 16, 2, seed=4)
    assert not torch.equal(d.next_batch()[0], batches[0][0])


def test_loader_shards_by_rank():
    tok = make_tokens()
    one = TokenLoader(tok, 16, 4)
    ranks = [TokenLoader(tok, 16, 2, dp_rank=r, dp_degree=2) for r in range(2)]
    for _ in range(5):
        x, _ = one.next_batch()
        parts = [r.next_batch()[0] for r in ranks]
        assert torch.equal(torch.cat(parts), x)


def test_open_split_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_split(tmp_path, "train", 100, 8)
    np.arange(20, dtype=np.uint32).tofile(tmp_path / "train.bin")
    with pytest.raises(DataError, match="fewer than seq_len"):
        open_split(tmp_path, "train", 100, 32)
    with pytest.raises(DataError, match="token id 19 >= the model's vocab_size 10"):
        open_split(tmp_path, "train", 10, 8)
    assert len(open_split(tmp_path, "train", 100, 8)) == 20
