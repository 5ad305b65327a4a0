"""What import (convert.py) and export (export.py) share: the error they raise, the output folder
written under a temporary name and renamed when complete, and the Hugging Face file names."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from ..runtime.errors import UserError

HF_CONFIG_FILE = "config.json"  # a Hugging Face folder's model config (not our checkpoint's CONFIG_FILE)
MXFP4_TENSORS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # stored as MXFP4 by the release


class ConvertError(UserError):
    """A user-caused conversion problem; the scripts print it as one line and exit 2."""


def parse_size(text: str) -> int:
    """Bytes of a size given as e.g. 5GB, 500MB, 2GiB or 1000."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for u, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(u) and t[: -len(u)].replace(".", "", 1).isdigit():
            return int(float(t[: -len(u)]) * mult)
    if t.isdigit():
        return int(t)
    raise ConvertError(f"--max-shard-size {text!r} is not a size; use e.g. 5GB or 500MB")


def temp_output(output: Path, overwrite: bool) -> Path:
    """A new temporary folder beside `output` to write into (`output` itself must not exist unless
    overwrite)."""
    if output.exists() and not overwrite:
        raise ConvertError(f"output folder {str(output)!r} already exists; remove it or pass --overwrite")
    tmp = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, output: Path) -> None:
    """Rename the complete temporary folder to `output`, replacing what was there."""
    if output.exists():
        shutil.rmtree(output)
    os.rename(tmp, output)
