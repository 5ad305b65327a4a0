"""The order in which a loader visits its n samples (epochs of permutations drawn from (seed, epoch)),
and the position bookkeeping every resumable loader shares."""

from __future__ import annotations

import numpy as np
import torch

from ..runtime.errors import DataError


class EpochOrder:
    """Sample index of the i-th visit: epoch i // n, a seeded permutation within it (or in order)."""

    def __init__(self, n: int, seed: int | list[int], shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._epoch, self._perm = -1, np.arange(0)

    def __call__(self, i: int) -> int:
        epoch, j = divmod(i, self.n)
        if not self.shuffle:
            return j
        if epoch != self._epoch:
            seed = self.seed if isinstance(self.seed, list) else [self.seed]
            self._perm = np.random.default_rng([*seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return int(self._perm[j])


class SampleLoader:
    """What the token and chat loaders share: a global sample counter (the whole state), this
    data-parallel rank's share of each global micro-batch, and the samples' EpochOrder.

    Global micro-batch g covers samples [g x dp x b, (g + 1) x dp x b) and rank r takes its
    b-sized slice, so a checkpoint saved at one data-parallel degree resumes at another. A subclass
    sets num_samples and turns sample numbers into a batch (`_batch`); Stateful for DCP.
    """

    def __init__(self, num_samples: int, seq_len: int, b: int, dp_rank: int, dp_degree: int, seed: int,
                 shuffle: bool):  # fmt: skip
        self.num_samples, self.seq_len, self.b = num_samples, seq_len, b
        self.dp_rank, self.dp_degree, self.seed, self.shuffle = dp_rank, dp_degree, seed, shuffle
        self._orders()
        self.position = 0  # global samples consumed

    def _orders(self) -> None:
        """The sample order(s), drawn from the seed (again after a checkpoint's seed is loaded)."""
        self.order = EpochOrder(self.num_samples, self.seed, self.shuffle)

    def _batch(self, samples: range) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.position + self.dp_rank * self.b
        batch = self._batch(range(start, start + self.b))
        self.position += self.dp_degree * self.b
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seq_len"]) != self.seq_len:
            raise DataError(
                f"the checkpoint's data position is for seq_len {state['seq_len']}, not {self.seq_len}"
            )
        self.position, self.seed = int(state["position"]), int(state["seed"])
        self._orders()  # the samples' order follows the checkpoint's seed
