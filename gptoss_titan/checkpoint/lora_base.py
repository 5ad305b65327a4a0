"""A LoRA run's record of its frozen base, saved beside the adapters in every step folder.

`lora_base.json`: the base's path, format and a checksum of its index and config (DCP: `.metadata`,
`model_args.json` and the integrity records, which hold every file's checksum; Hugging Face:
`config.json` and the safetensors index, or the safetensors headers). A resume onto another base
is refused in one line; the exporter merges onto the recorded base.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from .files import CheckpointError

BASE_FILE = "lora_base.json"


def _files(path: Path, fmt: str) -> list[Path]:
    p = path
    if fmt == "hf":
        return [p / "config.json", *sorted(p.glob("*.safetensors.index.json"))]
    return [p / ".metadata", p / "model_args.json", *sorted(p.glob("integrity_*.json"))]


def base_record(path: Path, fmt: str) -> dict:
    """The base's path and checksum (sha256 of its index and config files; for a Hugging Face
    folder without an index, of its safetensors headers)."""
    h = hashlib.sha256()
    for f in _files(path, fmt):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    if fmt == "hf" and not any(path.glob("*.safetensors.index.json")):
        for f in sorted(path.glob("*.safetensors")):
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                h.update(f.name.encode() + b"\0" + fh.read(n))
    return {"path": str(path.resolve()), "format": fmt, "sha256": h.hexdigest()}


def check_base(own: Path, record: dict) -> None:
    """The run's checkpoint `own` was trained on this base (CheckpointError in one line if not)."""
    f = own / BASE_FILE
    if not f.is_file():
        raise CheckpointError(
            f"checkpoint {str(own)!r} holds no LoRA adapters ({BASE_FILE} missing): it is not a LoRA run's; "
            "use another run folder, or set lora.rank = 0 to resume it"
        )
    saved = json.loads(f.read_text())
    if saved.get("sha256") != record["sha256"]:
        raise CheckpointError(
            f"the adapters in {str(own)!r} were trained on the base {saved.get('path')!r}, which differs from "
            f"checkpoint.initial_load_path {record['path']!r} (checksum {str(saved.get('sha256'))[:12]} vs "
            f"{record['sha256'][:12]}); point initial_load_path at that base, or start a new run folder"
        )


def read_base_record(step: Path) -> dict | None:
    """The base record of a LoRA checkpoint's step folder, None for any other checkpoint."""
    f = step / BASE_FILE
    return json.loads(f.read_text()) if f.is_file() else None
