"""LoRA adapters for sampling, unmerged beside the weights: a LoRA run's checkpoint (its recorded
base, then its adapters) or a PEFT adapter folder (`sample --adapter`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import resolve_step_dir
from ..checkpoint.integrity import verify as verify_integrity
from ..checkpoint.lora_base import check_record, read_base_record
from ..interop.lora_export import read_adapters, read_peft_adapter
from ..model import ModelArgs
from ..model.lora import LoRASpec, sites_of
from ..runtime.errors import UserError


def lora_checkpoint(step: Path) -> tuple[LoRASpec, dict]:
    """(where the adapters sit and their scale, the adapter tensors) of a LoRA run's checkpoint."""
    section = json.loads((step / "config.json").read_text())["lora"]
    adapters, _ = read_adapters(step)
    return LoRASpec(section["rank"], section["alpha"], 0.0, (), sites=sites_of(adapters)), adapters


def base_location(step: Path) -> tuple[str | None, Path]:
    """(an HF folder, or None and the DCP step folder) of the base a LoRA checkpoint records,
    checked to be that base."""
    record = read_base_record(step)
    where = f"sampling {str(step)!r}"
    if record["format"] == "hf":
        check_record(Path(record["path"]), "hf", record, where)
        return record["path"], step
    base = resolve_step_dir(record["path"])
    check_record(base, "dcp", record, where)
    damage = verify_integrity(base)
    if damage:
        raise UserError(f"the base checkpoint {str(base)!r} of {str(step)!r} is damaged ({damage})")
    return None, base


def peft_adapter(folder: str, args: ModelArgs) -> tuple[LoRASpec, dict]:
    """(where the adapters sit and their scale, the adapter tensors) of a PEFT adapter folder."""
    settings, adapters = read_peft_adapter(folder, args)
    return LoRASpec(settings["rank"], settings["alpha"], 0.0, (), sites=sites_of(adapters)), adapters
