"""Token folders (shards.py): shards read as one stream, checked cheaply when opened and as read."""

import json

import numpy as np
import pytest

from gptoss_titan.data import shards
from gptoss_titan.data.shards import FORMAT, TokenStream, open_tokens, read_meta, write_shard
from gptoss_titan.runtime.errors import DataError

from ..helpers.data import make_tokens, sharded_folder


def test_damaged_shards_are_named(tmp_path):
    tok = make_tokens()
    folder = sharded_folder(tmp_path / "d", tok, [500, 500])
    (folder / "train-00001.bin").unlink()
    with pytest.raises(DataError, match="train-00001.bin' listed in meta.json is missing"):
        open_tokens(folder, "train", 50, min_tokens=17)
    folder = sharded_folder(tmp_path / "e", tok, [500, 500])
    with open(folder / "train-00000.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="train-00000.bin' has 100 bytes, meta.json says 500 tokens"):
        open_tokens(folder, "train", 50, min_tokens=17)
    folder = sharded_folder(tmp_path / "f", tok, [500, 500])
    with pytest.raises(DataError, match="holds token id 49 >= the model's vocab_size 40"):
        open_tokens(folder, "train", 40, min_tokens=17)  # from meta.json's max_id: no scan
    bad = tok.copy()
    bad[900] = 77  # a damaged byte that meta.json does not know about: caught when read
    np.asarray(bad[500:]).tofile(folder / "train-00001.bin")
    stream = open_tokens(folder, "train", 50, min_tokens=17)
    with pytest.raises(DataError, match="holds token id 77 >= the model's vocab_size 50"):
        stream[890:910]


def test_opening_does_not_scan(tmp_path, monkeypatch):
    """A format-2 folder opens from meta.json and file sizes only (sparse 4 GB shards, never read)."""
    folder = tmp_path / "big"
    folder.mkdir()
    n = 1 << 30  # tokens per shard
    shards = []
    for i in range(2):
        with open(folder / f"train-{i:05d}.bin", "wb") as f:
            f.truncate(4 * n)
        shards.append({"file": f"train-{i:05d}.bin", "tokens": n, "documents": 1, "max_id": 5})
    (folder / "meta.json").write_text(json.dumps({"format": FORMAT, "shards": {"train": shards, "val": []}}))
    monkeypatch.setattr(np, "memmap", None)  # opening must not map (let alone read) any shard
    stream = open_tokens(folder, "train", 50, min_tokens=17)
    assert len(stream) == 2 * n


def test_write_shard_writes_the_tokens_and_their_document_index(tmp_path):
    tokens = np.array([5, 6, 7, 8, 9], dtype=np.int64)
    record = write_shard(tmp_path, "val", 3, tokens, np.array([0, 2]))
    assert record == {"file": "val-00003.bin", "tokens": 5, "documents": 2, "max_id": 9}
    assert np.array_equal(np.fromfile(tmp_path / "val-00003.bin", dtype=np.uint32), tokens)
    docs = np.load(tmp_path / "val-00003.docs.npy")
    assert docs.dtype == np.uint32 and docs.tolist() == [0, 2]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["val-00003.bin", "val-00003.docs.npy"]  # no temporary file left
    assert write_shard(tmp_path, "val", 4, tokens[:0], np.array([], dtype=np.int64))["max_id"] == -1


def test_slices_cross_shard_ends_with_few_files_open(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "MAX_OPEN", 2)
    tok = make_tokens()
    sizes = [100, 0, 250, 50, 600]  # an empty shard is passed over
    files, start = [], 0
    for i, n in enumerate(sizes):
        tok[start : start + n].tofile(tmp_path / f"{i}.bin")
        files.append(tmp_path / f"{i}.bin")
        start += n
    stream = TokenStream(files, sizes, 50, "test")
    assert len(stream) == 1000
    for a, b in [(0, 1000), (90, 110), (99, 400), (350, 401), (999, 1000), (5, 5), (990, 2000)]:
        assert np.array_equal(stream[a:b], tok[a:b]), (a, b)
        assert len(stream._maps) <= 2
    assert stream[:].dtype == np.uint32


def test_single_file_folders_are_scanned_once_for_their_largest_id(tmp_path):
    """A folder from before format 2 (one train.bin, no max_id in meta.json) is checked by a scan."""
    np.arange(30, dtype=np.uint32).tofile(tmp_path / "train.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": "old"}))
    assert len(open_tokens(tmp_path, "train", 30)) == 30
    with pytest.raises(DataError, match="holds token id 29 >= the model's vocab_size 29"):
        open_tokens(tmp_path, "train", 29)
    (tmp_path / "val.bin").write_bytes(b"123")
    with pytest.raises(DataError, match="not a uint32 token file"):
        open_tokens(tmp_path, "val", 30)


def test_read_meta(tmp_path):
    assert read_meta(tmp_path) == {}  # no meta.json: a folder made by hand
    (tmp_path / "meta.json").write_text('{"format": 2')
    with pytest.raises(DataError, match="is not valid JSON"):
        read_meta(tmp_path)
