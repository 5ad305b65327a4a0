"""Corpus preparation (prepare.py) and the preparation script."""

import importlib
import json
import subprocess
import sys

import numpy as np
import pytest

from gptoss_titan.data import EOT_ID, DataError, get_tokenizer, prepare
from gptoss_titan.data.shards import open_tokens
from gptoss_titan.data.sources import file_items


def read_split(folder, split="train"):
    return np.asarray(open_tokens(folder, split, 1 << 30)[:])


def test_prepare_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world <|endoftext|> and <|start|> as plain text")
    rows = [{"text": f"document number {i}"} for i in range(5)]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    prepare(
        file_items([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]),
        out,
        "test",
        val_every=3,
        progress=False,
    )
    meta = json.loads((out / "meta.json").read_text())
    train, val = read_split(out), read_split(out, "val")
    assert meta["train_documents"] == 4 and meta["val_documents"] == 2 and meta["format"] == 2
    assert len(train) == meta["train_tokens"] and (train == EOT_ID).sum() == 4  # specials in text: plain text
    assert meta["max_id"] == max(train.max(), val.max())
    enc = get_tokenizer()
    assert (
        enc.decode(train[: list(train).index(EOT_ID)].tolist())
        == "hello world <|endoftext|> and <|start|> as plain text"
    )
    assert len(val) == meta["val_tokens"] > 0
    with pytest.raises(DataError, match="already exists"):
        prepare(iter(["x"]), out, "again", progress=False)


def test_prepare_is_atomic(tmp_path):
    def docs():
        yield "one document"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(docs(), tmp_path / "out", "t", progress=False)
    assert list(tmp_path.iterdir()) == []  # nothing complete: nothing kept


def corpus(tmp_path, n=400):
    """Varied documents over several compressed and plain JSON-lines files and a parquet file."""
    import bz2
    import gzip
    import lzma

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    words = ["light", "earth", "water", "and", "God", "said", "\n", "é", "1:2", "  ", "<|return|>"]
    docs = [" ".join(rng.choice(words, rng.integers(1, 80))) for _ in range(n)]
    d = tmp_path / "corpus"
    d.mkdir()
    q = n // 4
    lines = lambda part: "".join(json.dumps({"text": t}) + "\n\n" for t in part)  # noqa: E731
    (d / "a.jsonl").write_text(lines(docs[:q]))
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.write(lines(docs[q : 2 * q]))
    with bz2.open(d / "c.jsonl.bz2", "wt") as f:
        f.write(lines(docs[2 * q : 3 * q - 10]))
    with lzma.open(d / "c2.jsonl.xz", "wt") as f:
        f.write(lines(docs[3 * q - 10 : 3 * q]))
    pq.write_table(pa.table({"text": docs[3 * q :]}), d / "d.parquet")
    return docs, [str(d / "*.jsonl*"), str(d / "d.parquet")]


def test_sharded_workers_equal_single_file_one_worker(tmp_path):
    docs, patterns = corpus(tmp_path)
    single = prepare(docs, tmp_path / "single", "t", val_every=7, progress=False)
    many = prepare(file_items(patterns), tmp_path / "many", "t", val_every=7, progress=False, workers=2,
                   shard_tokens=500)  # fmt: skip
    a, b = (json.loads((f / "meta.json").read_text()) for f in (single, many))
    assert len(a["shards"]["train"]) == 1 and len(b["shards"]["train"]) > 5
    for k in ("train_tokens", "val_tokens", "train_documents", "val_documents", "max_id"):
        assert a[k] == b[k], k
    for split in ("train", "val"):
        assert np.array_equal(read_split(single, split), read_split(many, split))
    enc = get_tokenizer()
    train = [d for i, d in enumerate(docs) if i % 7 != 6]
    shard0 = b["shards"]["train"][0]
    toks = np.fromfile(many / shard0["file"], dtype=np.uint32)
    starts = np.load(many / shard0["file"].replace(".bin", ".docs.npy"))
    assert len(starts) == shard0["documents"] and starts[0] == 0
    for j, s in enumerate(starts):  # the document index points at each document
        end = starts[j + 1] if j + 1 < len(starts) else len(toks)
        assert enc.decode(toks[s : end - 1].tolist()) == train[j] and toks[end - 1] == EOT_ID
    capped = prepare(
        file_items(patterns), tmp_path / "cap", "t", val_every=7, progress=False, max_tokens=3000
    )
    m = json.loads((capped / "meta.json").read_text())
    assert 3000 <= m["train_tokens"] + m["val_tokens"] < 3000 + 200


def test_killed_preparation_resumes_from_its_last_complete_part(tmp_path, monkeypatch):
    docs, _ = corpus(tmp_path)
    ref = prepare(docs, tmp_path / "ref", "t", val_every=7, progress=False, shard_tokens=400)

    def killed_after(n):
        for i, d in enumerate(docs):
            if i == n:
                raise KeyboardInterrupt
            yield d

    out = tmp_path / "out"
    prep = importlib.import_module("gptoss_titan.data.prepare")
    monkeypatch.setattr(prep, "CHUNK_DOCS", 16)  # parts complete before the reader is stopped
    with pytest.raises(KeyboardInterrupt):
        prepare(killed_after(390), out, "t", val_every=7, progress=False, shard_tokens=400, workers=2)
    partial = tmp_path / ".out.partial"
    done = json.loads((partial / "progress.json").read_text())["documents"]
    assert not out.exists() and 0 < done < 390
    with pytest.raises(DataError, match="other arguments"):
        prepare(iter(docs), out, "t", val_every=5, progress=False, shard_tokens=400)
    tokenized = []
    real = prep._tokenize
    monkeypatch.setattr(prep, "_tokenize", lambda task: tokenized.extend(task[1]) or real(task))
    prepare(iter(docs), out, "t", val_every=7, progress=False, shard_tokens=400)
    assert not partial.exists() and len(tokenized) == len(docs) - done  # the done ones are not redone
    for split in ("train", "val"):
        assert np.array_equal(read_split(ref, split), read_split(out, split))
    a, b = (json.loads((f / "meta.json").read_text()) for f in (ref, out))
    assert a == b


def test_prepare_script_errors(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "scripts/prepare_data.py",
            "--files",
            str(tmp_path / "missing.txt"),
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "missing.txt" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_malformed_jsonl_is_one_line_with_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    r = subprocess.run(
        [
            sys.executable,
            "scripts/prepare_data.py",
            "--files",
            str(tmp_path / "bad.jsonl"),
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and f"{tmp_path / 'bad.jsonl'}:2 is not valid JSON" in r.stderr
    last = r.stderr.strip().splitlines()[-1]  # (the lines before it are the progress bar)
    assert last.startswith("error: ") and "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def _prepare_kjv(cache: str) -> str:
    from gptoss_titan.data.prepare import bundled_dataset

    return str(bundled_dataset("kjv", cache_dir=cache))


def test_concurrent_preparers_of_one_output_agree(tmp_path):
    """Every rank of a run asks for the bundled corpus at once: one prepares, the others wait for it."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(3) as pool:
        outs = pool.map(_prepare_kjv, [str(tmp_path)] * 3)
    assert len(set(outs)) == 1
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["kjv-o200k_harmony"]  # no partial or lock file left
    meta = json.loads((tmp_path / names[0] / "meta.json").read_text())
    assert meta["train_documents"] + meta["val_documents"] == 1189


def _prepare_data(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/prepare_data.py", *args], capture_output=True, text=True)


def test_damaged_input_and_invalid_utf8_through_the_script(tmp_path):
    """A truncated .gz is one line, exit 2, nothing written; invalid UTF-8 is replaced and counted in
    a warning, or refused with --strict (exit 2, nothing written)."""
    import gzip

    rows = "".join(json.dumps({"text": f"In the beginning {i} " * 30}) + "\n" for i in range(400))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(rows)
    data = (tmp_path / "c.jsonl.gz").read_bytes()
    (tmp_path / "c.jsonl.gz").write_bytes(data[: len(data) // 2])
    r = _prepare_data("--files", str(tmp_path / "c.jsonl.gz"), "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "c.jsonl.gz' is a truncated or damaged gz file" in last
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))

    (tmp_path / "u.jsonl").write_bytes(rows.encode() + b'{"text": "caf\xe9 ' + b"word " * 50 + b'"}\n')
    r = _prepare_data("--files", str(tmp_path / "u.jsonl"), "--output", str(tmp_path / "o"), "--strict")
    assert (
        r.returncode == 2
        and f"{tmp_path / 'u.jsonl'}:401 is not valid UTF-8" in r.stderr.strip().splitlines()[-1]
    )
    assert not (tmp_path / "o").exists() and "Traceback" not in r.stderr
    r = _prepare_data("--files", str(tmp_path / "u.jsonl"), "--output", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert (
        f"warning: 1 document(s) held invalid UTF-8, replaced by U+FFFD (the first: {tmp_path / 'u.jsonl'}:401)"
        in r.stderr
    )


def test_the_progress_line_names_the_count_and_the_first_of_many_inputs(tmp_path):
    for i in range(12):
        (tmp_path / f"part-{i:02}.txt").write_text(f"In the beginning {i} " * 200)
    r = _prepare_data(
        "--files",
        *sorted(str(p) for p in tmp_path.glob("*.txt")),
        "--output",
        str(tmp_path / "o"),
        "--val_every",
        "3",
    )
    assert r.returncode == 0, r.stderr
    assert f"tokenizing 12 inputs from {tmp_path / 'part-00.txt'} [text]" in r.stderr
    assert "part-05.txt" not in r.stderr
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert "part-11.txt" in meta["source"]  # meta.json keeps every input


def test_a_chat_file_with_invalid_utf8_is_a_skipped_conversation(tmp_path):
    good = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    )
    (tmp_path / "c.jsonl").write_bytes(
        (good + "\n").encode() * 40
        + good.replace("hello", "h\\u00e9").encode().replace(b"\\u00e9", b"\xe9")
        + b"\n"
    )
    r = _prepare_data("--chat", str(tmp_path / "c.jsonl"), "--output", str(tmp_path / "o"))
    assert r.returncode == 0 and f"skipped {tmp_path / 'c.jsonl'}:41: not valid UTF-8 (byte" in r.stderr, (
        r.stderr
    )
    r = _prepare_data("--chat", str(tmp_path / "c.jsonl"), "--output", str(tmp_path / "o2"), "--strict")
    assert r.returncode == 2 and "c.jsonl:41: not valid UTF-8" in r.stderr and not (tmp_path / "o2").exists()
