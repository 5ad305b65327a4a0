"""Token folders the data tests build."""

import json

import numpy as np

from gptoss_titan.data.shards import FORMAT, write_shard


def make_tokens(n=1000, vocab=50):
    return np.random.default_rng(0).integers(0, vocab, n).astype(np.uint32)


def sharded_folder(folder, tokens, sizes, vocab=50):
    """A format-2 token folder cutting `tokens` into shards of the given sizes (train and val)."""
    folder.mkdir(parents=True)
    shards = {"train": [], "val": []}
    for split in shards:
        start = 0
        for i, n in enumerate(sizes):
            part = tokens[start : start + n]
            shards[split].append(write_shard(folder, split, i, part, np.array([0])))
            start += n
    meta = {"format": FORMAT, "tokenizer": "test", "vocab_size": vocab, "shards": shards}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder
