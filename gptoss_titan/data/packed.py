"""Chat data (data/chat.py's output) as training sequences: whole conversations, packed, masked.

Each sequence holds seq_len + 1 tokens made of whole conversations (each ends with
<|endoftext|>), so none is cut and none starts mid-way. With training.document_mask the
conversations of a sequence do not attend to each other and several share a sequence (greedy, in
a seeded order); without it each sequence holds one conversation. The rest is <|endoftext|>
padding. Targets outside the loss mask (prompts, padding, the separators) are IGNORE_INDEX, so the
loss divides by the supervised tokens only. A conversation longer than seq_len + 1 is cut (counted
and reported once).

The packing is fixed for a run (seed); each epoch visits its sequences in a permutation drawn from
(seed, epoch). As in loader.py, a global sample counter is the whole state (order.py): resumable at any
data-parallel degree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..model.loss import IGNORE_INDEX
from ..model.tokens import EOT_ID
from ..runtime.errors import DataError
from .order import SampleLoader


class ChatSplit:
    """One split of a chat folder: tokens, loss mask and conversation offsets (memory-mapped)."""

    def __init__(self, folder: Path, split: str, vocab_size: int):
        self.folder, self.split = folder, split
        try:
            self.tokens = np.memmap(folder / f"{split}.bin", dtype=np.uint32, mode="r")
            self.mask = np.memmap(folder / f"{split}.mask.bin", dtype=np.uint8, mode="r")
            self.offsets = np.load(folder / f"{split}.idx.npy")
        except (OSError, ValueError) as e:
            raise DataError(
                f"chat data {str(folder)!r} ({split}) is incomplete or damaged ({type(e).__name__}); "
                "prepare it again with scripts/prepare_data.py --chat"
            ) from None
        if len(self.mask) != len(self.tokens) or int(self.offsets[-1]) != len(self.tokens):
            raise DataError(
                f"chat data {str(folder)!r} ({split}): tokens, mask and index disagree; prepare it again"
            )
        top = int(self.tokens.max()) if len(self.tokens) else 0
        if top >= vocab_size:
            raise DataError(
                f"chat data {str(folder)!r} holds token id {top} >= the model's vocab_size {vocab_size}"
            )

    def loader(self, seq_len: int, b: int, dp_rank: int, dp_degree: int, seed: int = 0, shuffle: bool = True,
               pack: bool = True) -> PackedLoader:  # fmt: skip
        return PackedLoader(self, seq_len, b, dp_rank, dp_degree, seed, shuffle, pack)


def is_chat(folder: Path) -> bool:
    meta = folder / "meta.json"
    return meta.is_file() and bool(json.loads(meta.read_text()).get("chat"))


class PackedLoader(SampleLoader):
    """Yields (inputs, targets) int64 [b, seq_len], targets IGNORE_INDEX outside the loss mask."""

    def __init__(self, data: ChatSplit, seq_len: int, b: int, dp_rank: int = 0, dp_degree: int = 1,
                 seed: int = 0, shuffle: bool = True, pack: bool = True):  # fmt: skip
        self.data = data
        n = len(data.offsets) - 1
        order = np.random.default_rng([seed, 1 << 20]).permutation(n) if shuffle else np.arange(n)
        lengths = np.diff(data.offsets)
        self.sequences: list[list[int]] = []
        self.cut, room = 0, seq_len + 1
        for c in order.tolist():
            length = int(lengths[c])
            self.cut += length > seq_len + 1
            if pack and self.sequences and length <= room:
                self.sequences[-1].append(c)
                room -= length
            else:
                self.sequences.append([c])
                room = seq_len + 1 - min(length, seq_len + 1)
        super().__init__(len(self.sequences), seq_len, b, dp_rank, dp_degree, seed, shuffle)

    def _sequence(self, global_sample: int) -> list[int]:
        return self.sequences[self.order(global_sample)]

    def _window(self, convs: list[int]) -> tuple[np.ndarray, np.ndarray]:
        n = self.seq_len + 1
        toks = np.full(n, EOT_ID, dtype=np.int64)
        mask = np.zeros(n, dtype=bool)
        pos = 0
        for c in convs:
            s, e = int(self.data.offsets[c]), int(self.data.offsets[c + 1])
            e = min(e, s + n - pos)
            toks[pos : pos + e - s] = self.data.tokens[s:e]
            mask[pos : pos + e - s] = self.data.mask[s:e] != 0
            pos += e - s
        return toks, mask

    def _batch(self, samples: range) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for g in samples:
            toks, mask = self._window(self._sequence(g))
            xs.append(toks[:-1])
            ys.append(np.where(mask[1:], toks[1:], IGNORE_INDEX))
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
