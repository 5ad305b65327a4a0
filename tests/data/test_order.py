"""The order of the samples and the position bookkeeping every loader shares (order.py)."""

import pytest
import torch

from gptoss_titan.data.order import EpochOrder, SampleLoader
from gptoss_titan.runtime.errors import DataError


def visits(order: EpochOrder, n: int) -> list[int]:
    return [order(i) for i in range(n)]


def test_each_epoch_is_a_seeded_permutation():
    n = 10
    order = EpochOrder(n, 3)
    seen = visits(order, 3 * n)
    epochs = [seen[e * n : (e + 1) * n] for e in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]  # a new permutation every epoch
    assert visits(EpochOrder(n, 3), 3 * n) == seen  # from (seed, epoch) alone
    assert EpochOrder(n, 3)(25) == seen[25]  # random access: no need to walk the earlier epochs
    assert visits(EpochOrder(n, 4), n) != epochs[0]
    assert visits(EpochOrder(n, [3, 1]), n) != epochs[0]  # a list seed is its own stream
    assert visits(EpochOrder(n, 3, shuffle=False), 2 * n) == list(range(n)) * 2


class Numbers(SampleLoader):
    """Batches of the global sample numbers themselves."""

    def _batch(self, samples):
        return torch.tensor(list(samples)), torch.tensor([self.order(g) for g in samples])


def test_ranks_take_their_slice_of_each_global_micro_batch():
    one = Numbers(100, 8, 4, 0, 1, seed=0, shuffle=True)
    ranks = [Numbers(100, 8, 2, r, 2, seed=0, shuffle=True) for r in range(2)]
    for step in range(3):
        g, idx = one.next_batch()
        assert g.tolist() == list(range(4 * step, 4 * step + 4))
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), g)
        assert torch.equal(torch.cat([p[1] for p in parts]), idx)
    assert one.position == ranks[0].position == ranks[1].position == 12  # global samples consumed


def test_state_is_the_position_seed_and_seq_len():
    a = Numbers(50, 8, 3, 0, 1, seed=5, shuffle=True)
    for _ in range(4):
        a.next_batch()
    assert a.state_dict() == {"position": 12, "seed": 5, "seq_len": 8}
    b = Numbers(50, 8, 3, 0, 1, seed=9, shuffle=True)  # resumed: the checkpoint's seed orders the samples
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() and torch.equal(b.next_batch()[1], a.next_batch()[1])
    with pytest.raises(DataError, match="for seq_len 8, not 16"):
        Numbers(50, 16, 3, 0, 1, seed=5, shuffle=True).load_state_dict(a.state_dict())


def test_iteration_is_next_batch_forever():
    it = iter(Numbers(3, 8, 2, 0, 1, seed=0, shuffle=False))
    assert [next(it)[0].tolist() for _ in range(3)] == [[0, 1], [2, 3], [4, 5]]
