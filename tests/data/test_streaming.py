"""Streaming mode (data/streaming.py): on-the-fly tokenization equals a prepared folder, resumes exactly."""

import json
import subprocess

import numpy as np
import pytest
import torch

from gptoss_titan.data import DataError, prepare
from gptoss_titan.data.shards import open_tokens
from gptoss_titan.data.sources import file_items
from gptoss_titan.data.streaming import StreamLoader, stream_validation

from ..conftest import python_cmd, read_metrics
from ..helpers.training import argv_for


def corpus(tmp_path, n=300):
    rng = np.random.default_rng(0)
    words = ["light", "earth", "water", "and", "God", "said", "é", "1:2"]
    docs = [" ".join(rng.choice(words, rng.integers(1, 60))) for _ in range(n)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:200]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[200:]))
    return str(tmp_path / "*.jsonl")


def loader(spec, workers=0, b=2, seq=16, rank=0, dp=1):
    return StreamLoader(spec, "text", "o200k_harmony", seq, b, 201088, rank, dp, workers, 10)


def test_stream_equals_a_prepared_folder_read_in_order(tmp_path):
    spec = corpus(tmp_path)
    folder = prepare(file_items([spec]), tmp_path / "prep", "t", val_every=10, progress=False)
    train = np.asarray(open_tokens(folder, "train", 201088)[:]).astype(np.int64)
    s = loader(spec)
    for i in range(20):
        x, y = s.next_batch()
        for r in range(2):
            start = (2 * i + r) * 16
            assert torch.equal(x[r], torch.from_numpy(train[start : start + 16]))
            assert torch.equal(y[r], torch.from_numpy(train[start + 1 : start + 17]))
    val = stream_validation(spec, "text", "o200k_harmony", 10, 500, 201088, 17)
    assert np.array_equal(val, np.asarray(open_tokens(folder, "val", 201088)[:500]))


def test_stream_resumes_exactly_with_workers_and_rejects_another_layout(tmp_path):
    spec = corpus(tmp_path)
    a = loader(spec, workers=2)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    ref = [a.next_batch()[0] for _ in range(40)]  # past the end of the corpus: a second epoch
    b = loader(spec, workers=2)
    b.load_state_dict(state)
    assert all(torch.equal(b.next_batch()[0], r) for r in ref)
    c = loader(spec, workers=2)  # saved again right after a resume: no worker falls back to the start
    c.load_state_dict(state)
    c.next_batch()
    again = c.state_dict()
    d = loader(spec, workers=2)
    d.load_state_dict(again)
    assert all(torch.equal(d.next_batch()[0], r) for r in ref[1:20])
    ranks = [loader(spec, workers=2, b=1, rank=r, dp=2) for r in range(2)]
    assert not torch.equal(ranks[0].next_batch()[0], ranks[1].next_batch()[0])  # different documents
    with pytest.raises(DataError, match=r"saved with \{'workers': \(2, 1\)\}"):
        loader(spec, workers=1).load_state_dict(state)


@pytest.mark.slow
def test_streaming_training_resumes_exactly(tmp_path):
    spec = corpus(tmp_path)
    from gptoss_titan.train import main

    def args(name, *extra):
        argv = [a for a in argv_for(tmp_path) if not a.startswith(("--data.dataset_path", "--model.flavor"))]
        argv += ["--model.flavor=debug", f"--data.stream={spec}", "--data.stream_workers=1", "--data.stream_val_every=10",
                 f"--job.dump_folder={tmp_path / name}", "--training.steps=4", "--checkpoint.enable=true",
                 "--checkpoint.interval=2", "--metrics.sample_freq=0", "--training.deterministic=true",
                 "--lr_scheduler.decay_steps=4", *extra]  # fmt: skip
        return argv

    def run(name, *extra):
        assert main(args(name, *extra)) == 0
        return [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r]

    straight = run("straight")
    run("resumed", "--training.steps=2")
    resumed = run("resumed")
    assert resumed == straight
    assert any("val_loss" in r for r in read_metrics(tmp_path / "straight"))
    # 2 processes resuming the 1-process stream: every rank stops with the same one-line error
    cmd = python_cmd(2, "-m", "gptoss_titan.train", *args("resumed", "--training.steps=6"))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    # every rank stops on it with its own line, and the launcher (python_cmd's) passes on exit 2
    lines = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    message = "no stream position for every data-parallel rank"
    assert r.returncode == 2 and lines and all(message in x for x in lines), r.stderr[-2000:]
    assert r.stderr.count(message) >= 2, r.stderr[-2000:]


def test_invalid_utf8_in_a_stream_is_logged_once_and_counted_or_refused(tmp_path, monkeypatch):
    """Replaced by U+FFFD with one warning at the first and a count at the end of each pass (rank 0,
    worker 0 only: every worker reads every document); data.stream_strict refuses it in one line."""
    from gptoss_titan.runtime.log import logger

    rows = b"".join(json.dumps({"text": f"word {i} " * 4}).encode() + b"\n" for i in range(30))
    (tmp_path / "u.jsonl").write_bytes(rows + b'{"text": "caf\xe9 au lait"}\n')
    said: list[str] = []
    monkeypatch.setattr(logger, "info", said.append)
    s = StreamLoader(str(tmp_path / "u.jsonl"), "text", "o200k_harmony", 8, 2, 201088, 0, 1, 0, 10)
    for _ in range(40):  # more than one pass over the 31 documents
        s.next_batch()
    first = [x for x in said if "data.stream: 1 document(s) held invalid UTF-8" in x]
    passes = [x for x in said if "data.stream pass 0: 1 document(s) held invalid UTF-8" in x]
    assert len(first) == 1 and f"(the first: {tmp_path / 'u.jsonl'}:31)" in first[0] and len(passes) == 1
    strict = StreamLoader(
        str(tmp_path / "u.jsonl"), "text", "o200k_harmony", 8, 2, 201088, 0, 1, 0, 10, strict=True
    )
    with pytest.raises(DataError, match=r"u.jsonl:31 is not valid UTF-8 .*drop data.stream_strict = true"):
        for _ in range(40):
            strict.next_batch()
