"""Text corpora -> sharded token files + meta.json (format in shards.py), in parallel, resumable.

Documents are encoded with o200k_harmony as ordinary text (special-token strings in the data are
plain text, never a crash), each followed by <|endoftext|>; every val_every-th document goes to
validation. The reading process hands chunks of documents (JSON lines still unparsed) to `workers`
processes in order and writes their tokens in order, so the output is the same for any number of
workers. Output is cut into parts: a part ends after the document that brings its training tokens
to `shard_tokens`, and writes one train shard and one val shard (if it has val documents). The
work happens in a hidden `.NAME.partial` folder beside the output, with a progress file updated
after every complete part: a killed preparation resumes from there (same command, same
arguments; the documents already done are skipped, not tokenized again). The output folder
appears only when everything is written.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..model.tokens import EOT_ID
from ..runtime.errors import DataError
from .shards import FORMAT, SPLITS, write_shard
from .sources import JsonLine, document_tokens, file_documents, hf_documents, kjv_documents
from .tokenizer import get_tokenizer

BUNDLED = ("kjv", "kjv_chat", "arithmetic_chat")  # chat sets (loss-masked): data/chat.py, data/arithmetic.py
DEFAULT_SHARD_TOKENS = 1 << 28  # 268M tokens, 1 GiB per train shard
CHUNK_DOCS = 256  # documents per task handed to a worker
PROGRESS = "progress.json"
__all__ = ["BUNDLED", "bundled_dataset", "file_documents", "hf_documents", "kjv_documents", "prepare"]


def _tokenize(task: tuple[str, list]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of the chunk's documents, each with its <|endoftext|>, concatenated; lengths)."""
    name, items = task
    enc = get_tokenizer(name)
    ids = [document_tokens(enc, it) for it in items]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))
    return flat, lengths


def _ignore_sigint() -> None:
    """Pool workers leave Ctrl-C to the reading process (which stops them): no traceback per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _ordered(pool, tasks: Iterator, window: int) -> Iterator:
    """Results of `_tokenize` over tasks in order, at most `window` in flight. (Pool.imap would read
    the whole input ahead in a helper thread, and hang on a KeyboardInterrupt raised there.)"""
    pending: collections.deque = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(_tokenize, (task,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class _Parts:
    """Buffers documents and writes them as parts (shards + progress file) in the partial folder."""

    def __init__(self, folder: Path, settings: dict, state: dict):
        self.folder, self.settings, self.state = folder, settings, state
        self.buf: dict[str, list[np.ndarray]] = {k: [] for k in SPLITS}
        self.buffered = dict.fromkeys(SPLITS, 0)
        self.total = sum(s["tokens"] for split in SPLITS for s in state["shards"][split])

    def tokens(self) -> int:
        return self.total

    def add(self, ids: np.ndarray) -> None:
        every = self.settings["val_every"]
        split = "val" if every and self.state["documents"] % every == every - 1 else "train"
        self.buf[split].append(ids)
        self.buffered[split] += len(ids)
        self.total += len(ids)
        self.state["documents"] += 1
        if self.buffered["train"] >= self.settings["shard_tokens"]:
            self.flush()

    def flush(self) -> None:
        for split in SPLITS:
            if self.buf[split]:
                lengths = np.array([len(x) for x in self.buf[split]], dtype=np.int64)
                starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
                index = len(self.state["shards"][split])
                info = write_shard(self.folder, split, index, np.concatenate(self.buf[split]), starts)
                self.state["shards"][split].append(info)
                self.buf[split], self.buffered[split] = [], 0
        tmp = self.folder / f".{PROGRESS}.tmp"
        tmp.write_text(json.dumps({"settings": self.settings, **self.state}))
        tmp.rename(self.folder / PROGRESS)

    def complete_parts(self) -> int:
        return len(self.state["shards"]["train"])


def _resume(partial: Path, settings: dict) -> dict:
    """The progress of an interrupted preparation with the same settings (else a fresh state)."""
    fresh = {"documents": 0, "shards": {k: [] for k in SPLITS}}
    if not partial.is_dir():
        partial.mkdir(parents=True)
        return fresh
    f = partial / PROGRESS
    if not f.is_file():
        return fresh
    saved = json.loads(f.read_text())
    if saved.get("settings") != settings:
        diff = {k: (saved.get("settings", {}).get(k), v) for k, v in settings.items()
                if saved.get("settings", {}).get(k) != v}  # fmt: skip
        raise DataError(
            f"{str(partial)!r} holds an interrupted preparation with other arguments {diff} (saved, now); "
            "run the same command to resume it, or delete that folder to start over"
        )
    return {"documents": saved["documents"], "shards": saved["shards"]}


@contextlib.contextmanager
def _exclusive(out: Path):
    """One preparer per output folder at a time (every rank of a run may ask for a bundled corpus):
    an flock on a hidden lock file beside it; the others wait, then find the output complete."""
    import fcntl  # (POSIX)

    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_name(f".{out.name}.lock")
    while True:
        lock = open(path, "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another preparation of {str(out)!r} to finish", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as e:  # a file system without flock (e.g. Lustre mounted without it)
            lock.close()
            raise DataError(
                f"cannot lock {str(path)!r} ({e.strerror}); prepare into a local folder"
            ) from None
        if path.exists() and os.fstat(lock.fileno()).st_ino == os.stat(path).st_ino:
            break  # (else the holder removed that file on its way out: lock the new one)
        lock.close()
    try:
        if out.exists():
            raise DataError(f"output folder {str(out)!r} already exists; remove it or choose another")
        yield
    finally:
        path.unlink(missing_ok=True)
        lock.close()


def prepare(
    documents: Iterable[str | JsonLine],
    out_dir: str | os.PathLike,
    source: str,
    tokenizer: str = "o200k_harmony",
    val_every: int = 100,
    progress: bool = True,
    max_documents: int | None = None,
    workers: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    max_tokens: int | None = None,
    label: str = "",
) -> Path:
    """Tokenize documents (or source items, see sources.py) into out_dir; returns out_dir. `label`
    names the source on the progress line (default: `source`, which meta.json records in full)."""
    out = Path(out_dir)
    if out.exists():
        raise DataError(f"output folder {str(out)!r} already exists; remove it or choose another")
    for name, v, low in (("--workers", workers, 1), ("--shard_tokens", shard_tokens, 1),
                         ("--max_tokens", max_tokens, 1), ("--val_every", val_every, 2)):  # fmt: skip
        if v is not None and v < low:
            raise DataError(f"{name} {v} must be >= {low}")
    if shard_tokens >= 1 << 32:
        raise DataError(f"--shard_tokens {shard_tokens} must be below 2^32 (document offsets are uint32)")
    get_tokenizer(tokenizer)  # a bad name fails here, before any work
    settings = {"source": source, "tokenizer": tokenizer, "val_every": val_every, "shard_tokens": shard_tokens,
                "max_tokens": max_tokens, "max_documents": max_documents}  # fmt: skip
    with _exclusive(out):
        return _prepare(documents, out, settings, progress, workers, label or source)


def _prepare(
    documents: Iterable, out: Path, settings: dict, progress: bool, workers: int, label: str
) -> Path:
    source, tokenizer, shard_tokens = settings["source"], settings["tokenizer"], settings["shard_tokens"]
    max_documents, max_tokens = settings["max_documents"], settings["max_tokens"]
    enc = get_tokenizer(tokenizer)
    partial = out.with_name(f".{out.name}.partial")
    parts = _Parts(partial, settings, _resume(partial, settings))
    skipped = parts.state["documents"]
    items = itertools.islice(iter(documents), skipped, max_documents)  # done documents: read, not tokenized
    tasks = ((tokenizer, c) for c in _chunks(items, CHUNK_DOCS))
    pool = (
        mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers, _ignore_sigint)
        if workers > 1
        else None
    )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"tokenizing {label}", unit="tok", unit_scale=True, total=max_tokens,
                   initial=parts.tokens(), smoothing=0.1)  # fmt: skip
        if skipped:
            bar.write(f"resuming after {skipped:,} documents ({parts.complete_parts()} complete parts)")
    try:
        for flat, lengths in _ordered(pool, tasks, 4 * workers) if pool else map(_tokenize, tasks):
            for ids in np.split(flat, np.cumsum(lengths)[:-1]):
                parts.add(ids)
                if max_tokens is not None and parts.tokens() >= max_tokens:
                    break
            if bar is not None:
                bar.update(int(lengths.sum()))
            if max_tokens is not None and parts.tokens() >= max_tokens:
                break
        parts.flush()
        shards = parts.state["shards"]
        totals = {k: sum(s["tokens"] for s in shards[k]) for k in SPLITS}
        if totals["train"] < 2 or totals["val"] < 2:
            raise DataError(f"{label} gave too little text ({totals} tokens); give more documents")
        meta = {
            "format": FORMAT,
            "source": source,
            "tokenizer": tokenizer,
            "vocab_size": enc.n_vocab,
            "dtype": "uint32",
            "eot_id": EOT_ID,
            **{f"{k}_tokens": totals[k] for k in SPLITS},
            **{f"{k}_documents": sum(s["documents"] for s in shards[k]) for k in SPLITS},
            "max_id": max(s["max_id"] for k in SPLITS for s in shards[k]),
            "shard_tokens": shard_tokens,
            "shards": shards,
        }
        (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        (partial / PROGRESS).unlink()
        try:
            os.rename(partial, out)
        except OSError:
            if not (out / "meta.json").exists():  # lost a race to another process: theirs is complete
                raise
            shutil.rmtree(partial, ignore_errors=True)
        return out
    except BaseException as e:
        if parts.complete_parts() == 0 or isinstance(e, DataError) and "too little text" in str(e):
            shutil.rmtree(partial, ignore_errors=True)
        elif bar is not None:
            bar.write(
                f"stopped: {parts.complete_parts()} complete parts ({parts.state['documents']:,} documents) kept "
                f"in {str(partial)!r}; run the same command to resume"
            )
        raise
    finally:
        if pool:
            pool.terminate()
        if bar is not None:
            bar.close()


def _prepare_chat_set(name: str, out: Path) -> None:
    import tempfile

    from .arithmetic import arithmetic_rows
    from .chat import kjv_chat_conversations, prepare_chat

    convs = kjv_chat_conversations() if name == "kjv_chat" else arithmetic_rows(1000, seed=1, answered=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{name}.jsonl"
        src.write_text("".join(json.dumps(c) + "\n" for c in convs))
        prepare_chat(str(src), out, strict=True, source=f"{name} (bundled)")


def default_cache_dir() -> Path:
    """Where bundled corpora are prepared when data.cache_dir is "" (the config field is the only switch)."""
    return Path.home() / ".cache" / "gptoss_titan"


def bundled_dataset(name: str, tokenizer: str = "o200k_harmony", cache_dir: str = "") -> Path:
    """Path of a bundled corpus's memmaps under cache_dir (data.cache_dir; "" = default_cache_dir()),
    prepared on first use (concurrent callers are safe)."""
    if name not in BUNDLED:
        raise DataError(
            f"unknown bundled dataset {name!r}; available: {', '.join(BUNDLED)} (or set data.dataset_path)"
        )
    out = Path(cache_dir or default_cache_dir()) / f"{name}-{tokenizer}"
    if not (out / "meta.json").exists():
        try:
            if name.endswith("_chat"):
                _prepare_chat_set(name, out)
            else:
                prepare(kjv_documents(), out, source=name, tokenizer=tokenizer, val_every=50, progress=False)
        except DataError:
            if not (out / "meta.json").exists():  # not merely another process finishing first
                raise
    return out
