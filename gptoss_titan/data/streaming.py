"""Streaming mode (`data.stream`): a corpus tokenized on the fly, with a checkpointable position.

For corpora nobody wants to pre-tokenize: local files or globs (the same readers as
prepare_data.py: txt, jsonl also compressed, parquet) or a Hugging Face `datasets` corpus
(`hf:NAME[:CONFIG]`, streamed). Documents are dealt to data-parallel ranks and their
`data.stream_workers` loader processes by index (document i goes to worker i mod (dp x W)); each
worker tokenizes its own documents (each followed by <|endoftext|>) and cuts windows of
seq_len + 1 tokens with a stride of seq_len, as the token-folder loader does. Every
`validation_every`-th document is held out for validation (as prepare_data.py does).

The loader is torchdata's StatefulDataLoader; each worker's state is (epoch, documents of its
own consumed, the tokens left over), so a resumed run skips the documents already used (read,
not tokenized) and continues with exactly the next window. The state is per rank: a streaming run
resumes at the same data-parallel degree, worker count, sequence length and stream settings
(checked, one-line error otherwise). Every worker reads the whole source and keeps its share (for
`hf:` corpora that is dp x W streams; sharding the source by file is a known next step).
"""

from __future__ import annotations

import base64
import itertools
import pickle
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..runtime.errors import DataError
from ..runtime.log import logger
from .sources import Utf8Check, document_tokens, file_items, hf_documents
from .tokenizer import get_tokenizer

warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata 0.11 on torch 2.13


STRICT_FLAG = "data.stream_strict = true"


def stream_items(spec: str, text_field: str, utf8: Utf8Check) -> Iterator:
    """The items of a stream spec: "hf:NAME[:CONFIG]" or comma-separated local files / globs."""
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        return hf_documents(name, "train", text_field, config or None)
    return file_items(spec.split(","), text_field, utf8)


class _Windows(IterableDataset):
    """This rank's windows; in each loader worker, that worker's share of the documents.

    State at each window: (epoch, documents of this worker's share consumed so far - the current
    one included, the tokens carried over from before the current document (fewer than
    seq_len + 1), the offset of the next window in carry + current document). A resume skips the
    earlier documents, tokenizes the current one again and continues at the offset: the saved
    state stays small whatever the document lengths."""

    def __init__(self, spec: str, text_field: str, tokenizer: str, seq_len: int, vocab_size: int,
                 rank: int, world: int, val_every: int, strict: bool):  # fmt: skip
        self.spec, self.text_field, self.tokenizer = spec, text_field, tokenizer
        self.seq_len, self.vocab_size, self.rank, self.world, self.val_every = (
            seq_len,
            vocab_size,
            rank,
            world,
            val_every,
        )
        self.strict = strict
        self.state = {"epoch": 0, "docs": 0, "carry": [], "offset": 0}

    def __iter__(self):
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        share, mine = self.world * workers, self.rank * workers + wid
        enc = get_tokenizer(self.tokenizer)
        start = self.state  # where this worker resumes (the start of the stream, or a checkpoint)
        epoch, n, s = start["epoch"], self.seq_len + 1, self.seq_len
        # every worker reads every document; the first of rank 0 reports invalid UTF-8 for all
        report = (
            (lambda m: logger.info(f"warning: data.stream: {m}; counted again at each pass's end"))
            if mine == 0
            else None
        )
        utf8 = Utf8Check(self.strict, STRICT_FLAG, report)
        while True:
            count, seen = 0, 0
            train = (
                item
                for i, item in enumerate(stream_items(self.spec, self.text_field, utf8))
                if not (self.val_every and i % self.val_every == self.val_every - 1)
            )
            carry: list[int] = []
            for j, item in enumerate(train):
                seen += 1
                if j % share != mine:
                    continue
                count += 1
                if count < start["docs"]:  # used before the checkpoint: read past, not tokenized
                    continue
                resumed = count == start["docs"]  # the document the checkpoint was in
                prefix = list(start["carry"]) if resumed else carry
                buf = prefix + document_tokens(enc, item)
                pos = start["offset"] if resumed else 0
                while len(buf) - pos >= n:
                    window = buf[pos : pos + n]
                    pos += s
                    self.state = {"epoch": epoch, "docs": count, "carry": prefix, "offset": pos}
                    yield torch.tensor(window, dtype=torch.int64)
                carry = buf[pos:]
            if count == 0:
                raise DataError(
                    f"data.stream {self.spec!r} gave no document to loader worker {mine} of {share} "
                    f"({seen} training documents in all); use fewer data-parallel ranks or stream_workers"
                )
            if report and utf8.count:
                logger.info(f"warning: data.stream pass {epoch}: {utf8.summary()}")
            utf8.count = 0
            epoch, start = epoch + 1, {"epoch": epoch + 1, "docs": 0, "carry": [], "offset": 0}

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = {**state, "carry": list(state["carry"])}


class StreamLoader:
    """next_batch() -> (inputs, targets) [b, seq_len]; per-rank state for the checkpoint."""

    def __init__(self, spec: str, text_field: str, tokenizer: str, seq_len: int, local_batch_size: int,
                 vocab_size: int, dp_rank: int, dp_degree: int, workers: int, val_every: int,
                 strict: bool = False):  # fmt: skip
        from torchdata.stateful_dataloader import StatefulDataLoader

        self.layout = {"dp_rank": dp_rank, "dp_degree": dp_degree, "workers": workers, "seq_len": seq_len,
                       "spec": spec, "text_field": text_field, "tokenizer": tokenizer, "val_every": val_every}  # fmt: skip
        self.state_key = f"dataloader_dp{dp_rank}"  # ranks of one data-parallel rank (cp, tp) share it
        self.vocab_size = vocab_size
        self.dataset = _Windows(
            spec, text_field, tokenizer, seq_len, vocab_size, dp_rank, dp_degree, val_every, strict
        )
        self.loader = StatefulDataLoader(
            self.dataset,
            batch_size=local_batch_size,
            num_workers=workers,
            snapshot_every_n_steps=1,
            multiprocessing_context="fork" if workers else None,
        )
        self._it = None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = iter(self.loader)
        try:
            window = next(self._it)  # [b, seq_len + 1]
        except DataError as e:  # raised in a loader worker: keep the message, not the worker's traceback
            raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
        top = int(window.max())
        if top >= self.vocab_size:
            raise DataError(f"data.stream gave token id {top} >= the model's vocab_size {self.vocab_size}")
        return window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict:
        blob = pickle.dumps({"layout": self.layout, "loader": self.loader.state_dict()})
        return {"stream": base64.b64encode(blob).decode()}

    def load_state_dict(self, state: dict) -> None:
        saved = pickle.loads(base64.b64decode(state["stream"]))
        if saved["layout"] != self.layout:
            diff = {
                k: (saved["layout"].get(k), v) for k, v in self.layout.items() if saved["layout"].get(k) != v
            }
            raise DataError(
                f"the checkpoint's stream position was saved with {diff} (then, now); a streaming run resumes "
                "with the same data-parallel degree, stream_workers, seq_len and stream"
            )
        self.loader.load_state_dict(saved["loader"])
        self._it = None


def stream_validation(spec: str, text_field: str, tokenizer: str, val_every: int, n_tokens: int,
                      vocab_size: int, min_tokens: int, strict: bool = False) -> np.ndarray:  # fmt: skip
    """The held-out documents' tokens, the first n_tokens of them (tokenized once, at start)."""
    enc = get_tokenizer(tokenizer)
    out: list[int] = []
    items = stream_items(spec, text_field, Utf8Check(strict, STRICT_FLAG))
    for item in itertools.islice(items, val_every - 1, None, val_every):
        out.extend(document_tokens(enc, item))
        if len(out) >= n_tokens:
            break
    tokens = np.asarray(out[:n_tokens], dtype=np.uint32)
    if len(tokens) < min(n_tokens, min_tokens) or int(tokens.max()) >= vocab_size:
        raise DataError(
            f"data.stream {spec!r} holds too few validation documents (every {val_every}th) or ids beyond the "
            "vocabulary; disable validation or stream more data"
        )
    return tokens
