#!/usr/bin/env python3
"""Tokenize a corpus into sharded uint32 token files + meta.json for data.dataset_path / data.sources.

python scripts/prepare_data.py --dataset kjv --output data/kjv                       # bundled, offline
python scripts/prepare_data.py --files a.txt b.jsonl c.parquet --output data/mine    # local files
python scripts/prepare_data.py --files 'crawl/*.jsonl.gz' --workers 8 --output data/crawl   # globs, parallel
python scripts/prepare_data.py --dataset HuggingFaceFW/fineweb-edu --config_name sample-10BT \
    --max_tokens 2e9 --workers 16 --output data/fineweb                               # datasets, streamed
python scripts/prepare_data.py --chat conversations.jsonl --output data/sft           # chat, loss masks

Any number of --workers gives the same files. A killed preparation resumes from its last complete
shard when the same command runs again (the work sits in .NAME.partial beside the output).

--chat: one {"messages": [...]} object per line (OpenAI style: system/developer, user, assistant
with "thinking", "content", "tool_calls", tool results), rendered with openai-harmony; --mask
chooses the supervised tokens (last_turn: the last turn's assistant messages; final: its final
answer only; all: every assistant message). Malformed lines are reported as file:line and skipped
(--strict: stop at the first, exit 2, nothing written). Invalid UTF-8 in --files inputs is
replaced by U+FFFD and counted in a warning at the end (--strict: refused, exit 2); a truncated
or damaged compressed file is one line naming it, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptoss_titan.data.prepare import BUNDLED, DEFAULT_SHARD_TOKENS, prepare
from gptoss_titan.data.sources import Utf8Check, file_items, hf_documents, kjv_documents
from gptoss_titan.runtime.cli import exit_now, run_cli
from gptoss_titan.runtime.errors import DataError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--dataset", help=f"bundled corpus ({', '.join(BUNDLED)}) or a Hugging Face datasets name"
    )
    src.add_argument(
        "--files", nargs="+", help="local .txt / .jsonl[.gz|.bz2|.xz|.zst] / .parquet files or quoted globs"
    )
    src.add_argument("--chat", help="conversations .jsonl (harmony-rendered, with loss masks)")
    p.add_argument("--mask", default="last_turn", help="chat: last_turn (default), final or all")
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first invalid UTF-8 (--files) or malformed conversation (--chat), exit 2",
    )
    p.add_argument("--output", required=True, help="output folder (must not exist)")
    p.add_argument("--split", default="train", help="datasets split to read")
    p.add_argument("--config_name", default=None, help="datasets configuration name")
    p.add_argument(
        "--text_field", default="text", help="field holding the text in jsonl/parquet/datasets rows"
    )
    p.add_argument("--tokenizer", default="o200k_harmony")
    p.add_argument(
        "--val_every", type=int, default=None, help="every N-th document goes to val.bin (100; chat: 20)"
    )
    p.add_argument("--max_documents", type=int, default=None, help="stop after this many documents")
    p.add_argument(
        "--max_tokens", type=float, default=None, help="stop after about this many tokens (2e9 ok)"
    )
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (output is the same for any)")
    p.add_argument(
        "--shard_tokens", type=float, default=DEFAULT_SHARD_TOKENS, help="training tokens per shard (2^28)"
    )
    a = p.parse_args(argv)
    try:
        return run_cli(lambda: run(a))
    except KeyboardInterrupt:
        partial = Path(a.output).with_name(f".{Path(a.output).name}.partial")
        kept = "; run the same command again to resume" if partial.is_dir() else " (nothing kept)"
        print(f"interrupted{kept}", file=sys.stderr)
        return 130


def run(a: argparse.Namespace) -> None:
    try:
        prepare_from_args(a)
    except OSError as e:  # a full disk, a read-only or vanished folder: what the preparation kept can resume
        raise DataError(
            f"{e.strerror or e} ({e.filename or a.output}); fix that and run the same command again"
        ) from None


def prepare_from_args(a: argparse.Namespace) -> None:
    if a.val_every is None:
        a.val_every = 20 if a.chat else 100
    if a.val_every < 2:
        raise DataError(f"--val_every {a.val_every} must be >= 2")
    if a.chat:
        from gptoss_titan.data.chat import prepare_chat

        out = prepare_chat(
            a.chat,
            a.output,
            a.mask,
            a.val_every,
            a.strict,
            log=lambda m: print(m, file=sys.stderr),
        )
        print(f"wrote {out}/train.bin, val.bin (+ .mask.bin, .idx.npy), meta.json")
        return
    utf8, label = Utf8Check(a.strict), ""
    if a.files:
        docs, source = file_items(a.files, a.text_field, utf8), f"{','.join(a.files)} [{a.text_field}]"
        label = f"{_names(a.files)} [{a.text_field}]"
    elif a.dataset in BUNDLED:
        docs, source = kjv_documents(), a.dataset
    else:
        docs = hf_documents(a.dataset, a.split, a.text_field, a.config_name)
        source = f"{a.dataset}:{a.config_name or ''}:{a.split} [{a.text_field}]"
    out = prepare(
        docs,
        a.output,
        source,
        a.tokenizer,
        a.val_every,
        progress=True,
        max_documents=a.max_documents,
        workers=a.workers,
        shard_tokens=int(a.shard_tokens),
        max_tokens=int(a.max_tokens) if a.max_tokens is not None else None,
        label=label,
    )
    if utf8.count:
        print(f"warning: {utf8.summary()}", file=sys.stderr)
    print(f"wrote {out} (token shards and meta.json)")


def _names(files: list[str]) -> str:
    """The inputs for the progress line: a few names as given, else the count and the first (the
    line is redrawn at every refresh: 96 paths would fill a screen each time)."""
    joined = ",".join(files)
    return joined if len(files) <= 3 and len(joined) <= 120 else f"{len(files)} inputs from {files[0]}"


if __name__ == "__main__":
    exit_now(main())
