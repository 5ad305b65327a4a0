"""A LoRA run's record of its frozen base, saved beside the adapters in every step folder.

`lora_base.json`: the base's path, format and a checksum of its index and config (DCP: `.metadata`,
`model_args.json` and the integrity records, which hold every file's checksum; Hugging Face:
`config.json`, the safetensors index, and each safetensors file's header, size and samples of its
data). A resume onto another base
is refused in one line; the exporter merges onto the recorded base.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from .files import CheckpointError, resolve_step_dir
from .integrity import verify

BASE_FILE = "lora_base.json"


def _files(path: Path, fmt: str) -> list[Path]:
    p = path
    if fmt == "hf":
        return [p / "config.json", *sorted(p.glob("*.safetensors.index.json"))]
    return [p / ".metadata", p / "model_args.json", *sorted(p.glob("integrity_*.json"))]


SAMPLE = 1 << 20  # bytes of each safetensors file's data fingerprinted at its start, middle and end


def base_record(path: Path, fmt: str) -> dict:
    """The base's path and checksum: sha256 of its index and config files, and for a Hugging Face
    folder of every safetensors file's header (names, shapes, offsets), size and 3 x 1 MiB of its
    data (start, middle, end: another fine-tune or revision of the same shape differs there;
    reading whole 20b shards at every start would cost minutes). A DCP base's integrity records
    already hold every file's full checksum."""
    h = hashlib.sha256()
    for f in _files(path, fmt):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    if fmt == "hf":
        for f in sorted(path.glob("*.safetensors")):
            size = f.stat().st_size
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                h.update(f.name.encode() + b"\0" + str(size).encode() + fh.read(n))
                for at in (8 + n, max(8 + n, size // 2 - SAMPLE // 2), max(8 + n, size - SAMPLE)):
                    fh.seek(at)
                    h.update(fh.read(SAMPLE))
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


def check_record(path: Path, fmt: str, record: dict, what: str) -> None:
    """The base at `path` is the one `record` names (CheckpointError in one line if not)."""
    found = base_record(path, fmt)["sha256"]
    if found != record["sha256"]:
        raise CheckpointError(
            f"{what}: the base {str(path)!r} is not the one the adapters were trained on (checksum {found[:12]} vs "
            f"{record['sha256'][:12]}); restore that base, or export --lora adapter and apply it to the base you have"
        )


def recorded_base(step: Path, what: str) -> tuple[Path, str]:
    """(path, format) of the base the LoRA checkpoint `step` was trained on, checked to be that
    base (and, a DCP base, undamaged); `what` names the command in the one-line errors."""
    record = read_base_record(step)
    assert record is not None
    if record["format"] == "hf":
        path = Path(record["path"])
        check_record(path, "hf", record, what)
        return path, "hf"
    path = resolve_step_dir(record["path"])
    check_record(path, "dcp", record, what)
    damage = verify(path)
    if damage:
        raise CheckpointError(f"{what}: the base checkpoint {str(path)!r} is damaged ({damage})")
    return path, "dcp"
