#!/usr/bin/env python3
"""Tokenize a corpus into train.bin / val.bin (uint32) + meta.json for data.dataset_path.

python scripts/prepare_data.py --dataset kjv --output data/kjv                       # bundled, offline
python scripts/prepare_data.py --files a.txt b.jsonl c.parquet --output data/mine    # local files
python scripts/prepare_data.py --dataset roneneldan/TinyStories --output data/ts     # datasets (network)
python scripts/prepare_data.py --chat conversations.jsonl --output data/sft           # chat, loss masks

--chat: one {"messages": [...]} object per line (OpenAI style: system/developer, user, assistant
with "thinking", "content", "tool_calls", tool results), rendered with openai-harmony; --mask
chooses the supervised tokens (last_turn: the last turn's assistant messages; final: its final
answer only; all: every assistant message). Malformed lines are reported as file:line and skipped
(--strict: stop at the first, exit 2, nothing written).
"""

from __future__ import annotations

import argparse
import sys

from gptoss_titan.data.prepare import BUNDLED, file_documents, hf_documents, kjv_documents, prepare
from gptoss_titan.errors import DataError, UserError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--dataset", help=f"bundled corpus ({', '.join(BUNDLED)}) or a Hugging Face datasets name"
    )
    src.add_argument("--files", nargs="+", help="local .txt / .jsonl / .parquet files")
    src.add_argument("--chat", help="conversations .jsonl (harmony-rendered, with loss masks)")
    p.add_argument("--mask", default="last_turn", help="chat: last_turn (default), final or all")
    p.add_argument("--strict", action="store_true", help="chat: stop at the first malformed conversation")
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
    a = p.parse_args(argv)
    try:
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
            return 0
        if a.files:
            docs, source = file_documents(a.files, a.text_field), ",".join(a.files)
        elif a.dataset in BUNDLED:
            docs, source = kjv_documents(), a.dataset
        else:
            docs, source = hf_documents(a.dataset, a.split, a.text_field, a.config_name), a.dataset
        out = prepare(
            docs, a.output, source, a.tokenizer, a.val_every, progress=True, max_documents=a.max_documents
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}/train.bin, val.bin, meta.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
