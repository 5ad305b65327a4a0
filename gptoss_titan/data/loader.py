"""Deterministic, resumable, data-parallel token loader over a uint32 memmap.

The token stream is cut into sequences of seq_len + 1 tokens (inputs and shifted targets share
one window; the next window starts seq_len later). Each epoch visits them in a permutation drawn
from (seed, epoch). A global sample counter is the whole state: global micro-batch g covers
samples [g x dp x b, (g + 1) x dp x b) and rank r takes its b-sized slice. Because the state is
global, a run saved with one data-parallel degree resumes exactly with another.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .packed import ChatSplit, is_chat
from .prepare import DataError, bundled_dataset


def resolve_dataset(dataset: str, dataset_path: str, tokenizer: str, cache_dir: str = "") -> Path:
    """The folder holding train.bin / val.bin / meta.json for the config's data section."""
    if dataset_path:
        return Path(dataset_path)
    return bundled_dataset(dataset, tokenizer, cache_dir)


def open_split(folder: Path, split: str, vocab_size: int, seq_len: int) -> np.memmap:
    """Memmap of folder/<split>.bin after checking it exists, is long enough and fits the vocabulary."""
    path = folder / f"{split}.bin"
    if not path.is_file():
        raise DataError(
            f"data file {str(path)!r} not found; create it with scripts/prepare_data.py --output {folder}"
        )
    if path.stat().st_size % 4:
        raise DataError(f"data file {str(path)!r} is not a uint32 token file (size not a multiple of 4)")
    tokens = np.memmap(path, dtype=np.uint32, mode="r")
    if len(tokens) < seq_len + 1:
        raise DataError(
            f"data file {str(path)!r} has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "use more data or a smaller --training.seq_len"
        )
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    step = 1 << 26
    top = max(int(tokens[i : i + step].max()) for i in range(0, len(tokens), step))
    if top >= vocab_size:
        raise DataError(
            f"data file {str(path)!r} holds token id {top} >= the model's vocab_size {vocab_size} "
            f"(tokenizer {meta.get('tokenizer', '?')}); re-prepare it with the model's tokenizer"
        )
    return tokens


class TokenLoader:
    """Yields (inputs, targets) int64 [b, seq_len] for one data-parallel rank; Stateful for DCP."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        local_batch_size: int,
        dp_rank: int = 0,
        dp_degree: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        self.tokens, self.seq_len, self.b = tokens, seq_len, local_batch_size
        self.dp_rank, self.dp_degree, self.seed, self.shuffle = dp_rank, dp_degree, seed, shuffle
        self.num_samples = (len(tokens) - 1) // seq_len
        self.position = 0  # global samples consumed
        self._perm_epoch, self._perm = -1, np.arange(0)

    def _sample_index(self, global_sample: int) -> int:
        epoch, i = divmod(global_sample, self.num_samples)
        if not self.shuffle:
            return i
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.position + self.dp_rank * self.b
        rows = []
        for g in range(start, start + self.b):
            s = self._sample_index(g) * self.seq_len
            rows.append(np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64))
        self.position += self.dp_degree * self.b
        window = torch.from_numpy(np.stack(rows))  # [b, seq_len + 1]
        return window[:, :-1], window[:, 1:]

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


def open_data(cfg, vocab_size: int, dp_rank: int, dp_degree: int):
    """The run's training loader (this rank's share) and validation data (tokens, or a ChatSplit
    for chat data; None when off), after every check of the data (a JobConfig's data, training and
    validation sections)."""
    d, t = cfg.data, cfg.training
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
