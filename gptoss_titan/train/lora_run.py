"""A LoRA run's two sources: the frozen base and the run's own adapter checkpoints.

The base is `checkpoint.initial_load_path` (a DCP step folder, or a Hugging Face folder with
`initial_load_format = "hf"`), loaded at every start, model only. The run's checkpoints hold the
trainable state alone (adapters, their AdamW, schedule, data position, RNG) plus `lora_base.json`:
the base's path and a checksum of its index and config (DCP: `.metadata`, `model_args.json` and
the integrity records, which hold every file's checksum; Hugging Face: `config.json` and the
safetensors index or headers). A resume onto another base is refused in one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from pathlib import Path

from ..checkpoint.files import CheckpointError
from ..config import Checkpoint as CkptConfig
from ..model import ModelArgs
from .resume import Resume, choose_resume

BASE_FILE = "lora_base.json"


def choose_lora_resumes(cfg: CkptConfig, folder: Path, model_args: ModelArgs) -> tuple[Resume, Resume | None]:
    """(the base, the run's own newest intact checkpoint or None)."""
    if not cfg.initial_load_path:
        raise CheckpointError(
            "lora.rank > 0 trains adapters on a frozen base: set checkpoint.initial_load_path to the base "
            "(a DCP step folder, or a Hugging Face folder with checkpoint.initial_load_format = 'hf')"
        )
    base = choose_resume(dataclasses.replace(cfg, enable=False), folder, model_args)
    own = choose_resume(dataclasses.replace(cfg, initial_load_path=""), folder, model_args)
    assert base is not None
    return base, own


def _files(base: Resume) -> list[Path]:
    p = base.path
    if base.format == "hf":
        return [p / "config.json", *sorted(p.glob("*.safetensors.index.json"))]
    return [p / ".metadata", p / "model_args.json", *sorted(p.glob("integrity_*.json"))]


def base_record(base: Resume) -> dict:
    """The base's path and checksum (sha256 of its index and config files; for a Hugging Face
    folder without an index, of its safetensors headers)."""
    h = hashlib.sha256()
    for f in _files(base):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    if base.format == "hf" and not any(base.path.glob("*.safetensors.index.json")):
        for f in sorted(base.path.glob("*.safetensors")):
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                h.update(f.name.encode() + b"\0" + fh.read(n))
    return {"path": str(base.path.resolve()), "format": base.format, "sha256": h.hexdigest()}


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
