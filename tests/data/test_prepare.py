"""Corpus preparation (prepare.py) and the preparation script."""

import json
import subprocess
import sys

import numpy as np
import pytest

from gptoss_titan.data import EOT_ID, DataError, get_tokenizer, prepare
from gptoss_titan.data.prepare import kjv_documents


def test_prepare_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world <|endoftext|> and <|start|> as plain text")
    rows = [{"text": f"document number {i}"} for i in range(5)]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    from gptoss_titan.data.prepare import file_documents

    prepare(
        file_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]),
        out,
        "test",
        val_every=3,
        progress=False,
    )
    meta = json.loads((out / "meta.json").read_text())
    train = np.fromfile(out / "train.bin", dtype=np.uint32)
    val = np.fromfile(out / "val.bin", dtype=np.uint32)
    assert meta["train_documents"] == 4 and meta["val_documents"] == 2
    assert (
        len(train) == meta["train_tokens"] and (train == EOT_ID).sum() == 4
    )  # specials in text are plain text
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
    assert list(tmp_path.iterdir()) == []


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


def test_kjv_is_a_real_corpus():
    docs = list(kjv_documents())
    assert len(docs) == 1189  # chapters
    assert docs[0].startswith("Genesis 1\n1 In the beginning God created the heaven and the earth.")


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
