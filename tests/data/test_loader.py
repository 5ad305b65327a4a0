"""The resumable, data-parallel token loader (loader.py)."""

import numpy as np
import pytest
import torch

from gptoss_titan.data import DataError, TokenLoader, open_split

from ..helpers.data import make_tokens, sharded_folder


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


def test_shards_read_as_one_stream(tmp_path):
    tok = make_tokens()
    folder = sharded_folder(tmp_path / "d", tok, [7, 300, 1, 692])
    stream = open_split(folder, "train", 50, 16)
    assert (
        len(stream) == 1000 and np.array_equal(stream[:], tok) and np.array_equal(stream[5:309], tok[5:309])
    )
    a, b = TokenLoader(tok, 16, 3, seed=1), TokenLoader(stream, 16, 3, seed=1)
    for _ in range(30):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    assert len(stream[10:10]) == 0 and len(stream[2000:3000]) == 0
    c = TokenLoader(stream, 16, 3, seed=5)  # resumed: the checkpoint's seed orders the windows
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.next_batch()[0], a.next_batch()[0])


def test_mixture_validation_takes_every_source(tmp_path):
    from gptoss_titan.config import parse_args
    from gptoss_titan.data import open_data

    folders = [
        sharded_folder(tmp_path / f"s{i}", make_tokens(2000) + 50 * i, [1000, 1000], 200) for i in range(3)
    ]
    cfg = parse_args([f"--data.sources={','.join(map(str, folders))}", "--model.flavor=bench", "--metrics.sample_freq=0",
                      "--training.seq_len=16", "--validation.steps=2", "--training.local_batch_size=3"])  # fmt: skip
    _, val = open_data(cfg, 8192, 0, 1)
    loader = TokenLoader(val, 16, 3, shuffle=False)
    seen = {int(x) // 50 for _ in range(2) for x in loader.next_batch()[0].flatten()}
    assert seen == {0, 1, 2}


def test_mixture_proportions_determinism_and_resume_across_dp(tmp_path):
    from gptoss_titan.data.loader import MixtureLoader

    streams = [open_split(sharded_folder(tmp_path / f"s{i}", make_tokens(n) + 50 * i, [n // 2, n - n // 2], 200),
                          "train", 200, 16) for i, n in enumerate((1000, 300, 5000))]  # fmt: skip
    weights = [0.5, 0.2, 0.3]

    def loader(**kw):
        return MixtureLoader(streams, weights, ["a", "b", "c"], 16, kw.pop("b", 4), seed=7, **kw)

    one = loader()
    seen = np.bincount([one.source_of(g)[0] for g in range(10_000)], minlength=3) / 10_000
    assert np.abs(seen - weights).max() < 0.01
    batches = [one.next_batch()[0] for _ in range(40)]  # source b (18 windows) repeats many epochs
    assert all((x // 50 == x[0] // 50).all() for b in batches for x in b)  # a window = one source
    two = [loader(b=2, dp_rank=r, dp_degree=2) for r in range(2)]
    for t in two:
        t.load_state_dict(loader().state_dict() | {"position": 4 * 25})
    for i in range(25, 40):
        assert torch.equal(torch.cat([t.next_batch()[0] for t in two]), batches[i])
