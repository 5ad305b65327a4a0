"""Chat data end to end: prepare_data.py --chat (file:line errors, --strict), the packed loader
(whole conversations, masks as targets), masked loss = the manual masked loss, 2 processes
train like 1 on masked, packed data, and so does a 2-stage pipeline on chat data."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from gptoss_titan.data.chat import harmony, prepare_chat
from gptoss_titan.data.packed import ChatSplit
from gptoss_titan.model.loss import IGNORE_INDEX
from gptoss_titan.model.tokens import EOT_ID

from ..conftest import ROOT


def conversations(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}: what is {i} + {i}?" + " Explain." * (i % 7)},
                {"role": "assistant", "thinking": f"{i} + {i} = {2 * i}.", "content": f"It is {2 * i}."},
            ]
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    src = d / "conv.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in conversations(120)))
    return prepare_chat(str(src), d / "data", val_every=10, log=lambda m: None)


def test_prepare_cli_reports_bad_lines(tmp_path):
    src = tmp_path / "conv.jsonl"
    lines = [json.dumps(c) for c in conversations(30)]
    lines[4] = "{not json"
    lines[9] = json.dumps(
        {"messages": [{"role": "user", "content": "q"}, {"role": "wizard", "content": "x"}]}
    )
    src.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, str(ROOT / "scripts/prepare_data.py"), "--chat", str(src)]
    r = subprocess.run([*cmd, "--output", str(tmp_path / "ok")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"{src}:5:" in r.stderr and f"{src}:10: message 1: role 'wizard'" in r.stderr
    assert json.loads((tmp_path / "ok" / "meta.json").read_text())["skipped"] == 2
    r = subprocess.run(
        [*cmd, "--output", str(tmp_path / "strict"), "--strict"], capture_output=True, text=True
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and f"{src}:5:" in r.stderr, r.stderr
    assert not (tmp_path / "strict").exists() and not list(tmp_path.glob(".strict*"))


def test_packed_loader_keeps_conversations_whole(chat_folder):
    split = ChatSplit(chat_folder, "train", 201088)
    lengths = np.diff(split.offsets)
    for pack in (True, False):
        loader = split.loader(seq_len=256, b=4, dp_rank=0, dp_degree=1, seed=0, pack=pack)
        assert loader.cut == 0
        seen = sorted(c for seq in loader.sequences for c in seq)
        assert seen == list(range(len(lengths)))  # every conversation once
        assert all(sum(lengths[c] for c in seq) <= 257 for seq in loader.sequences)
        if not pack:
            assert all(len(seq) == 1 for seq in loader.sequences)
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, 256)
        # targets are exactly the masked tokens; every other target is ignored
        for row in range(4):
            toks, mask = loader._window(loader._sequence(row))
            want = np.where(mask[1:], toks[1:], IGNORE_INDEX)
            assert torch.equal(y[row], torch.from_numpy(want))
            assert torch.equal(x[row], torch.from_numpy(toks[:-1]))
    assert max(len(s) for s in split.loader(512, 4, 0, 1, pack=True).sequences) > 1
    # supervised targets decode to the assistant's part only
    enc = harmony()
    loader = split.loader(128, 1, 0, 1, shuffle=False, pack=False)
    x, y = loader.next_batch()
    text = enc.decode_utf8([t for t in y[0].tolist() if t != IGNORE_INDEX])
    assert (
        text
        == "<|channel|>analysis<|message|>0 + 0 = 0.<|end|><|start|>assistant<|channel|>final<|message|>It is 0.<|return|>"
    )
    assert x[0, -1] == EOT_ID  # padded with <|endoftext|>


def test_masked_loss_is_the_manual_masked_loss(chat_folder):
    from gptoss_titan.model.documents import find_documents
    from tests.conftest import build, tiny_args

    model = build(
        tiny_args(vocab_size=201088, dim=32, moe_inter_dim=32, num_experts=2, top_k=1, max_seq_len=256)
    )
    x, y = ChatSplit(chat_folder, "train", 201088).loader(256, 2, 0, 1, pack=True).next_batch()
    ce, _, _ = model(x, y, documents=find_documents(x))
    keep = y != IGNORE_INDEX
    # the same model without documents on one conversation per row must match the manual loss too
    ce_plain, _, _ = model(x, y)
    manual = torch.nn.functional.cross_entropy(model(x)[keep], y[keep], reduction="sum")
    torch.testing.assert_close(ce_plain, manual, rtol=1e-5, atol=1e-4)
    assert 0 < keep.sum() < y.numel() and torch.isfinite(ce)


@pytest.mark.slow
def test_two_processes_train_like_one_on_masked_packed_data(chat_folder, tmp_path):
    from ..helpers.equivalence import assert_same, run

    extra = (
        f"--data.dataset_path={chat_folder}",
        "--training.document_mask=true",
        "--training.seq_len=256",
        "--validation.enable=true",
        "--validation.freq=5",
        "--validation.steps=1",
    )
    one = run(tmp_path, "one", 1, *extra)
    two = run(tmp_path, "two", 2, *extra, "--parallelism.expert_parallel_degree=2")
    assert_same(one, two)
    rows = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["target_tokens"] < 4 * 256 for r in rows if "loss" in r)


@pytest.mark.slow
def test_pipeline_trains_like_one_process_on_chat_data(chat_folder, tmp_path):
    """Chat SFT (prompts masked) packed with document masking through a 2-stage pipeline, alone and
    with context parallelism 2: each micro-batch's documents reach both stages (pipeline.py:
    _layout), the head runs on its counted rows (packed into the schedule's targets), and the
    losses, grad norms, weights and the validation loss (3 batches through 2 micro-batches: the
    last group padded with an all-ignored one) equal one process accumulating the same 2."""
    from ..helpers.equivalence import assert_same, logged, run

    extra = (
        f"--data.dataset_path={chat_folder}",
        "--training.seq_len=256",
        "--training.global_batch_size=4",
        "--validation.enable=true",
        "--validation.freq=5",
        "--validation.steps=3",
        "--training.document_mask=true",
    )
    one = run(tmp_path, "one", 1, *extra, batch=2)
    want = logged(tmp_path, "one", "val_loss")
    assert len(want) == 1
    pp = "--parallelism.pipeline_parallel_degree=2"
    # pp 2; and pp 2 x cp 2, where each micro-batch's layout is its share of the split documents
    for name, nproc, more in (("pp", 2, [pp]), ("pp_cp", 4, [pp, "--parallelism.context_parallel_degree=2"])):
        assert_same(one, run(tmp_path, name, nproc, *extra, *more, batch=2 * nproc))
        np.testing.assert_allclose(logged(tmp_path, name, "val_loss"), want, rtol=1e-5)
    # rows hold several conversations: a stage that attended across them would differ
    packed = ChatSplit(chat_folder, "train", 201088).loader(256, 2, 0, 1, pack=True).sequences
    assert sum(len(seq) > 1 for seq in packed) > len(packed) // 2
