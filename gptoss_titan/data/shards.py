"""Token folders: sharded uint32 files indexed in meta.json, read as one stream without a scan.

Layout written by prepare.py (format 2):
  meta.json           {"format": 2, "shards": {"train": [{"file", "tokens", "documents", "max_id"}],
                       "val": [...]}, totals, tokenizer, vocab_size, eot_id, ...}
  train-00000.bin     uint32 tokens; each document ends with <|endoftext|>
  train-00000.docs.npy  uint32 start offset of each document in the shard (document boundaries)
Older folders (one train.bin / val.bin) read the same way, as a single shard (scanned once for
their largest id when meta.json does not record it).

Opening a split checks what is cheap: meta.json, every shard's presence and byte size, the
largest token id recorded per shard against the model's vocabulary. Token ids are also checked as
they are read (one max over each window), so a damaged shard is caught when it is used, not by a
full scan at start (a 100B-token corpus is ~400 GB).
"""

from __future__ import annotations

import bisect
import collections
import json
from pathlib import Path

import numpy as np

from ..runtime.errors import DataError

FORMAT = 2
MAX_OPEN = 64  # open shard maps per stream (file descriptors)
SPLITS = ("train", "val")


def shard_file(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def read_meta(folder: Path) -> dict:
    path = folder / "meta.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DataError(f"{str(path)!r} is not valid JSON; prepare the data again") from None


class TokenStream:
    """The shards of one split as one token sequence: `len()` and `[a:b]` slices (numpy uint32
    arrays, read from memory maps, crossing shard ends), every id checked against vocab_size."""

    def __init__(self, files: list[Path], sizes: list[int], vocab_size: int, name: str):
        self.files, self.vocab_size, self.name = files, vocab_size, name
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tolist()
        self._maps: collections.OrderedDict[int, np.memmap] = collections.OrderedDict()

    def __len__(self) -> int:
        return self.starts[-1]

    def _map(self, i: int) -> np.memmap:
        """Shard i's memory map; at most MAX_OPEN stay open (each holds a file descriptor)."""
        if i not in self._maps:
            if len(self._maps) >= MAX_OPEN:
                self._maps.popitem(last=False)
            self._maps[i] = np.memmap(self.files[i], dtype=np.uint32, mode="r")
        self._maps.move_to_end(i)
        return self._maps[i]

    def __getitem__(self, s: slice) -> np.ndarray:
        a, b, _ = s.indices(len(self))
        parts = []
        i = bisect.bisect_right(self.starts, a) - 1
        while a < b:
            end = min(b, self.starts[i + 1])
            if end > a:  # (a shard of 0 tokens is passed over)
                parts.append(self._map(i)[a - self.starts[i] : end - self.starts[i]])
            a, i = end, i + 1
        if not parts:
            return np.zeros(0, dtype=np.uint32)
        out = np.concatenate(parts) if len(parts) != 1 else np.asarray(parts[0])
        if len(out) and int(out.max()) >= self.vocab_size:
            bad = int(out.max())
            raise DataError(
                f"{self.name} holds token id {bad} >= the model's vocab_size {self.vocab_size} "
                "(damaged, or prepared with another tokenizer); prepare it again with the model's tokenizer"
            )
        return out


def open_tokens(folder: Path, split: str, vocab_size: int, min_tokens: int = 1) -> TokenStream:
    """A split of a token folder (sharded or single-file), after the cheap checks."""
    meta = read_meta(folder)
    shards = meta.get("shards", {}).get(split) if meta.get("format") == FORMAT else None
    if shards is None:  # a single <split>.bin (format 1, or made by hand)
        path = folder / f"{split}.bin"
        if not path.is_file():
            raise DataError(
                f"data file {str(path)!r} not found; create it with scripts/prepare_data.py --output {folder}"
            )
        if path.stat().st_size % 4:
            raise DataError(f"data file {str(path)!r} is not a uint32 token file (size not a multiple of 4)")
        shards = [{"file": path.name, "tokens": path.stat().st_size // 4}]
        if "max_id" not in meta:  # a folder from before format 2: one scan, as then
            tokens, step = np.memmap(path, dtype=np.uint32, mode="r"), 1 << 26
            top = [int(tokens[i : i + step].max()) for i in range(0, len(tokens), step)]
            shards[0]["max_id"] = max(top, default=-1)
    files, sizes = [], []
    for s in shards:
        path = folder / s["file"]
        if not path.is_file():
            raise DataError(
                f"shard {str(path)!r} listed in meta.json is missing; restore it or prepare the data again"
            )
        if path.stat().st_size != 4 * int(s["tokens"]):
            raise DataError(
                f"shard {str(path)!r} has {path.stat().st_size} bytes, meta.json says {s['tokens']} tokens "
                f"({4 * int(s['tokens'])} bytes); it is truncated or damaged: prepare the data again"
            )
        if int(s.get("max_id", -1)) >= vocab_size:
            raise DataError(
                f"shard {str(path)!r} holds token id {s['max_id']} >= the model's vocab_size {vocab_size} "
                f"(tokenizer {meta.get('tokenizer', '?')}); prepare it with the model's tokenizer"
            )
        files.append(path)
        sizes.append(int(s["tokens"]))
    stream = TokenStream(files, sizes, vocab_size, f"data {str(folder)!r} ({split})")
    if len(stream) < min_tokens:
        raise DataError(
            f"data {str(folder)!r} ({split}) has {len(stream)} tokens, fewer than seq_len + 1 = {min_tokens}; "
            "use more data or a smaller --training.seq_len"
        )
    return stream


def write_shard(folder: Path, split: str, index: int, tokens: np.ndarray, doc_starts: np.ndarray) -> dict:
    """One shard and its document index, each written under a temporary name and renamed."""
    name = shard_file(split, index)
    tmp = folder / f".{name}.tmp"
    tokens.astype(np.uint32, copy=False).tofile(tmp)
    tmp.rename(folder / name)
    docs = folder / name.replace(".bin", ".docs.npy")
    with open(folder / f".{docs.name}.tmp", "wb") as f:
        np.save(f, doc_starts.astype(np.uint32))
    (folder / f".{docs.name}.tmp").rename(docs)
    return {
        "file": name,
        "tokens": int(len(tokens)),
        "documents": int(len(doc_starts)),
        "max_id": int(tokens.max()) if len(tokens) else -1,
    }
