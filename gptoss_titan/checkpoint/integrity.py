"""Checkpoint integrity: every file a save writes gets its size and a fast checksum recorded in the
step folder; loading verifies them, so a truncated, zero-filled or bit-flipped file is caught
before any rank reads it.

Each rank records the files it wrote (`integrity__<rank>_.json`, written inside DCP's write
phase, so before rank 0 writes `.metadata` and renames the folder) and rank 0 records `.metadata`
and the step's metadata files (`integrity_metadata.json`). The checksum is xxHash's XXH3-64: ~10 GB/s on one core, measured
(2026-11-30, 2-core CI machine: 10.8 GB/s), so recording costs a re-read of each rank's own files
from the page cache and verifying costs one read of the checkpoint, split across the ranks.
Folders written before integrity records existed verify by their DCP metadata only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist
import xxhash
from torch.distributed.checkpoint import FileSystemWriter

PREFIX = "integrity_"
CHUNK = 8 << 20


def file_record(path: Path) -> dict:
    """{"size": bytes, "xxh3": hex digest} of a file."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return {"size": path.stat().st_size, "xxh3": h.hexdigest()}


def _write_record(folder: Path, name: str, files: list[str]) -> None:
    record = {f: file_record(folder / f) for f in files}
    (folder / f"{PREFIX}{name}.json").write_text(json.dumps(record, indent=1) + "\n")


class IntegrityWriter(FileSystemWriter):
    """DCP's file writer that also records the size and checksum of every file it writes."""

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        results = future.wait()  # this rank's files are written (sync save, or the async writer thread)
        files = sorted({r.storage_data.relative_path for r in results})
        _write_record(Path(self.path), plan.storage_data.prefix, files)
        return future

    def finish(self, metadata, results) -> None:
        super().finish(metadata, results)  # rank 0 writes .metadata after every rank's data
        folder = Path(self.path)  # and records it with the step's own files (config.json, model_args.json)
        own = sorted(p.name for p in folder.glob("*.json") if not p.name.startswith(PREFIX))
        _write_record(folder, "metadata", [".metadata", *own])


def expected_files(step: Path) -> dict[str, dict]:
    """file name -> its record, from every integrity file of the step folder."""
    out: dict[str, dict] = {}
    for record in sorted(step.glob(f"{PREFIX}*.json")):
        try:
            out.update(json.loads(record.read_text()))
        except (OSError, ValueError):
            out[record.name] = {"size": -1, "xxh3": "unreadable integrity record"}
    return out


def find_damage(step: Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """The first problem of a step folder, or None: a missing .metadata, or (of the files this rank
    checks: every `share[1]`-th from `share[0]`) a missing file, a size or checksum mismatch."""
    if not (step / ".metadata").is_file():
        return "its .metadata is missing"
    index, count = share
    for i, (name, want) in enumerate(sorted(expected_files(step).items())):
        if i % count != index:
            continue
        path = step / name
        if not path.is_file():
            return f"file {name} is missing"
        size = path.stat().st_size
        if size != want.get("size"):
            return f"file {name} has {size} bytes, {want.get('size')} were written"
        got = file_record(path)["xxh3"]
        if got != want.get("xxh3"):
            return f"file {name} does not match its checksum (xxh3 {got}, written {want.get('xxh3')})"
    return None


def _safely(step: Path, share: tuple[int, int]) -> str | None:
    """find_damage, with a read error reported as damage (a rank that raised would leave the others
    waiting in the collective)."""
    try:
        return find_damage(step, share)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        return f"it cannot be read ({type(e).__name__}: {e})"


def verify(step: Path) -> str | None:
    """`find_damage` split across the ranks of the default process group (each checks 1/world of
    the files); every rank gets the same answer. Without a process group: every file here."""
    if not (dist.is_available() and dist.is_initialized()):
        return _safely(step, (0, 1))
    problem = [_safely(step, (dist.get_rank(), dist.get_world_size()))]
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, problem[0])
    return next((p for p in found if p is not None), None)
