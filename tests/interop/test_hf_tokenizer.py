"""o200k_harmony as Hugging Face tokenizer files (hf_tokenizer.py), checked on a small tiktoken
table (the real one takes seconds to convert: its full check is tests/interop/test_export.py)."""

import json

import pytest
import tiktoken

from gptoss_titan.interop import hf_tokenizer
from gptoss_titan.interop.chat_template import HARMONY_CHAT_TEMPLATE

tokenizers = pytest.importorskip("tokenizers")

PATTERN = r"""'s|'t| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Each merged token is two earlier ones, as in a trained BPE table.
MERGED = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"th", b" th", b" the"]
# Special ids follow the ranks (as in o200k_harmony); two names share one id, as there.
SPECIALS = {"<|endoftext|>": 268, "<|endofprompt|>": 269, "<|reserved_269|>": 269, "<|reserved_270|>": 270}


@pytest.fixture
def tiny(monkeypatch):
    ranks = {bytes([b]): b for b in range(256)} | {t: 256 + i for i, t in enumerate(MERGED)}
    enc = tiktoken.Encoding("tiny", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=SPECIALS)
    monkeypatch.setattr(hf_tokenizer, "get_tokenizer", lambda name: enc)
    return enc


def test_byte_table_is_printable_and_reversible():
    table = hf_tokenizer._bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ"  # GPT-2's spelling of a space


def test_one_name_per_special_id(tiny):
    names = {268: "<|endoftext|>", 269: "<|endofprompt|>", 270: "<|reserved_270|>"}
    assert hf_tokenizer._specials(tiny) == names  # the shared id 269: its non-reserved name


def test_tokenizer_json_encodes_and_decodes_like_tiktoken(tiny):
    tok = tokenizers.Tokenizer.from_str(json.dumps(hf_tokenizer.tokenizer_json()))
    for text in [
        "hello world",
        "the thing hello, hell and hellos!",
        " hello<|endoftext|>the world",
        "<|reserved_270|>x<|endofprompt|>  tabs\tand\n\nnew lines ",
        "héllo 🙂 12345 don't",
    ]:
        ids = tiny.encode(text, allowed_special="all")
        assert tok.encode(text, add_special_tokens=False).ids == ids, text
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_write_tokenizer_names_the_special_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_tokenizer, "tokenizer_json", lambda: {"model": "stub"})  # the slow part
    hf_tokenizer.write_tokenizer(tmp_path, 4096)
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == {"model": "stub"}
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"}
    assert json.loads((tmp_path / "special_tokens_map.json").read_text()) == special
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config.items() >= special.items()
    assert config["model_max_length"] == 4096 and config["chat_template"] == HARMONY_CHAT_TEMPLATE.strip()
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
