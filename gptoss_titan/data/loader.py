"""Deterministic, resumable, data-parallel token loaders: one token folder, or a weighted mixture.

The token stream is cut into sequences of seq_len + 1 tokens (inputs and shifted targets share
one window; the next window starts seq_len later). Each epoch visits them in a permutation drawn
from (seed, epoch). A global sample counter is the whole state (order.py): global micro-batch g covers
samples [g x dp x b, (g + 1) x dp x b) and rank r takes its b-sized slice. Because the state is
global, a run saved with one data-parallel degree resumes exactly with another.

A mixture ([[data.sources]]) deals the global samples to its sources in blocks of MIX_BLOCK: each
block holds every source's share (weights rounded by largest remainder) in an order drawn from
(seed, block), and each source walks its own windows in its own epochs (a small source repeats,
which is how up-sampling works). Validation takes the same number of windows from the start of
every source's validation split. Sample g's source and its index there follow from g alone, so
mixtures resume exactly at any data-parallel degree too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .order import EpochOrder, SampleLoader
from .packed import ChatSplit, is_chat
from .prepare import DataError, bundled_dataset
from .shards import TokenStream, open_tokens

MIX_BLOCK = 4096  # samples per mixture block: proportions exact to 1/4096 in every block


def resolve_dataset(dataset: str, dataset_path: str, tokenizer: str, cache_dir: str = "") -> Path:
    """The folder holding the token files and meta.json for the config's data section."""
    if dataset_path:
        return Path(dataset_path)
    return bundled_dataset(dataset, tokenizer, cache_dir)


def open_split(folder: Path, split: str, vocab_size: int, seq_len: int) -> TokenStream:
    """One split of a token folder, after the cheap checks (no scan; ids are checked as read)."""
    return open_tokens(folder, split, vocab_size, min_tokens=seq_len + 1)


class TokenLoader(SampleLoader):
    """Yields (inputs, targets) int64 [b, seq_len] for one data-parallel rank; Stateful for DCP."""

    def __init__(
        self,
        tokens: TokenStream | np.ndarray,
        seq_len: int,
        local_batch_size: int,
        dp_rank: int = 0,
        dp_degree: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        self.tokens = tokens
        num_samples = (len(tokens) - 1) // seq_len
        super().__init__(num_samples, seq_len, local_batch_size, dp_rank, dp_degree, seed, shuffle)

    def _window(self, g: int) -> np.ndarray:
        s = self.order(g) * self.seq_len
        return self.tokens[s : s + self.seq_len + 1]

    def _batch(self, samples: range) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [np.asarray(self._window(g), dtype=np.int64) for g in samples]
        window = torch.from_numpy(np.stack(rows))  # [b, seq_len + 1]
        return window[:, :-1], window[:, 1:]


def mixture_counts(weights: list[float], block: int = MIX_BLOCK) -> np.ndarray:
    """Samples per source in one block: weights x block, rounded by largest remainder."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * block
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: block - counts.sum()]] += 1
    return counts


class MixtureLoader(TokenLoader):
    """TokenLoader over several token streams sampled in fixed proportions (see the module notes)."""

    def __init__(self, streams: list[TokenStream], weights: list[float], names: list[str], seq_len: int,
                 local_batch_size: int, dp_rank: int = 0, dp_degree: int = 1, seed: int = 0):  # fmt: skip
        self.counts = mixture_counts(weights)
        for name, n, w in zip(names, self.counts, weights):
            if n == 0:
                raise DataError(
                    f"data source {name} has weight {w}, below 1/{MIX_BLOCK} of the total; raise it or drop it"
                )
        self.streams = streams
        super().__init__(streams[0], seq_len, local_batch_size, dp_rank, dp_degree, seed)

    def _orders(self) -> None:
        n = [(len(t) - 1) // self.seq_len for t in self.streams]
        self.orders = [EpochOrder(k, [self.seed, 1 + i], True) for i, k in enumerate(n)]
        self._block, self._src, self._idx = -1, np.arange(0), np.arange(0)

    def source_of(self, g: int) -> tuple[int, int]:
        """(source, sample index within that source) of global sample g."""
        k, j = divmod(g, MIX_BLOCK)
        if k != self._block:
            src = np.random.default_rng([self.seed, 0x6D6978, k]).permutation(
                np.repeat(np.arange(len(self.counts)), self.counts)
            )
            idx = np.zeros(MIX_BLOCK, dtype=np.int64)
            for s in range(len(self.counts)):
                where = np.flatnonzero(src == s)
                idx[where] = k * self.counts[s] + np.arange(len(where))
            self._block, self._src, self._idx = k, src, idx
        return int(self._src[j]), int(self._idx[j])

    def _window(self, g: int) -> np.ndarray:
        s, i = self.source_of(g)
        start = self.orders[s](i) * self.seq_len
        return self.streams[s][start : start + self.seq_len + 1]


def open_data(cfg, vocab_size: int, dp_rank: int, dp_degree: int):
    """The run's training loader (this rank's share) and validation data (tokens, or a ChatSplit
    for chat data; None when off), after every check of the data (a JobConfig's data, training and
    validation sections)."""
    d, t = cfg.data, cfg.training
    if d.stream:  # tokenized on the fly (streaming.py)
        from .streaming import StreamLoader, stream_validation

        train = StreamLoader(d.stream, d.text_field, d.tokenizer, t.seq_len, t.local_batch_size, vocab_size,
                             dp_rank, dp_degree, d.stream_workers, d.stream_val_every, d.stream_strict)  # fmt: skip
        if not cfg.validation.enable:
            return train, None
        need = cfg.validation.steps * dp_degree * t.local_batch_size * t.seq_len + 1
        args = (d.stream, d.text_field, d.tokenizer, d.stream_val_every, need, vocab_size, t.seq_len + 1)
        return train, stream_validation(*args, strict=d.stream_strict)
    if d.sources:  # a mixture
        folders = [Path(s.path) for s in d.sources]
        for f in folders:
            if not (f / "meta.json").is_file():
                raise DataError(
                    f"data source {str(f)!r} has no meta.json; prepare it with scripts/prepare_data.py"
                )
            if is_chat(f):
                raise DataError(f"data source {str(f)!r} is chat data; mixtures take token folders only")
        train = MixtureLoader(
            [open_split(f, "train", vocab_size, t.seq_len) for f in folders],
            [s.weight for s in d.sources],
            [repr(s.path) for s in d.sources],
            t.seq_len,
            t.local_batch_size,
            dp_rank,
            dp_degree,
            seed=t.seed,
        )
        if not cfg.validation.enable:
            return train, None
        windows = -(-cfg.validation.steps * dp_degree * t.local_batch_size // len(folders))  # per source
        parts = []
        for f in folders:  # each source's first windows, the same number from each
            val = open_split(f, "val", vocab_size, t.seq_len + 1)
            k = min(windows, (len(val) - 1) // t.seq_len)
            parts.append(np.asarray(val[: k * t.seq_len + 1]))
        return train, np.concatenate([p[:-1] for p in parts] + [parts[-1][-1:]])
    folder = resolve_dataset(d.dataset, d.dataset_path, d.tokenizer, d.cache_dir)
    if is_chat(folder):  # conversations with loss masks (data/packed.py)
        train = ChatSplit(folder, "train", vocab_size).loader(
            t.seq_len, t.local_batch_size, dp_rank, dp_degree, t.seed, pack=t.document_mask
        )
        val = ChatSplit(folder, "val", vocab_size) if cfg.validation.enable else None
        return train, val
    train = TokenLoader(
        open_split(folder, "train", vocab_size, t.seq_len),
        t.seq_len,
        t.local_batch_size,
        dp_rank,
        dp_degree,
        seed=t.seed,
    )
    val = open_split(folder, "val", vocab_size, t.seq_len) if cfg.validation.enable else None
    return train, val
