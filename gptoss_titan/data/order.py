"""The order in which a loader visits its n samples: epochs of permutations drawn from (seed, epoch)."""

from __future__ import annotations

import numpy as np


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
