"""o200k_harmony as Hugging Face tokenizer files, so exported folders load without the release beside them.

`tokenizer.json` is built from tiktoken's own tables (the bundled official o200k_base file):
a byte-level BPE whose vocabulary is tiktoken's ranks (bytes shown through GPT-2's byte-to-unicode
table), merges for every way a token splits into two tokens (ordered by the merged token's rank,
then the parts'), `ignore_merges` (a piece that is a token stays one token, as in tiktoken), the
o200k pre-tokenizer regex, and the 1,090 special ids 199998..201087 at their own ids. Two names
share id 200018 in tiktoken (`<|endofprompt|>`, `<|reserved_200018|>`); one id gets one name here
(`<|endofprompt|>`), which llama.cpp's vocabulary check needs. Checked by the tests against
tiktoken on text full of special and reserved tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.tokenizer import get_tokenizer
from ..model.tokens import EOT_ID, RETURN_ID, STARTOFTEXT_ID
from .chat_template import HARMONY_CHAT_TEMPLATE


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _specials(enc) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, i in sorted(enc._special_tokens.items(), key=lambda kv: (kv[1], "reserved" in kv[0])):
        names.setdefault(i, name)  # the first, non-"reserved" name of a shared id
    return names


def tokenizer_json() -> dict:
    enc = get_tokenizer("o200k_harmony")
    ranks: dict[bytes, int] = enc._mergeable_ranks  # tiktoken's table (private attribute, stable since 0.3)
    u = _bytes_to_unicode()

    def show(b: bytes) -> str:
        return "".join(u[x] for x in b)

    vocab = {show(b): r for b, r in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        splits = [
            (token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks
        ]
        for left, right in sorted(splits, key=lambda p: (ranks[p[0]], ranks[p[1]])):
            merges.append((rank, ranks[left], ranks[right], show(left), show(right)))
    merges.sort()
    added = [
        {
            "id": i,
            "content": name,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, name in sorted(_specials(enc).items())
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": enc._pat_str},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": [[left, right] for *_, left, right in merges],
        },
    }


def write_tokenizer(folder: Path, max_len: int) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json into an export folder."""
    enc = get_tokenizer("o200k_harmony")
    names = _specials(enc)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(), ensure_ascii=False))
    special = {"bos_token": names[STARTOFTEXT_ID], "eos_token": names[RETURN_ID], "pad_token": names[EOT_ID]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        **special,
        "chat_template": HARMONY_CHAT_TEMPLATE.strip(),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
