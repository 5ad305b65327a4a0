"""LoRA adapters for sampling, unmerged beside the weights: a LoRA run's checkpoint (its recorded
base, then its adapters) or a PEFT adapter folder (`sample --adapter`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint.lora_base import recorded_base
from ..interop.lora_export import read_adapters, read_peft_adapter
from ..model import ModelArgs
from ..model.lora import LoRASpec, sites_of


def lora_checkpoint(step: Path) -> tuple[LoRASpec, dict]:
    """(where the adapters sit and their scale, the adapter tensors) of a LoRA run's checkpoint."""
    section = json.loads((step / "config.json").read_text())["lora"]
    adapters, _ = read_adapters(step)
    return LoRASpec(section["rank"], section["alpha"], 0.0, (), sites=sites_of(adapters)), adapters


def base_location(step: Path) -> tuple[str | None, Path]:
    """(an HF folder, or None and the DCP step folder) of the base a LoRA checkpoint records,
    checked to be that base."""
    path, fmt = recorded_base(step, f"sampling {str(step)!r}")
    return (str(path), step) if fmt == "hf" else (None, path)


def peft_adapter(folder: str, args: ModelArgs) -> tuple[LoRASpec, dict]:
    """(where the adapters sit and their scale, the adapter tensors) of a PEFT adapter folder."""
    settings, adapters = read_peft_adapter(folder, args)
    return LoRASpec(settings["rank"], settings["alpha"], 0.0, (), sites=sites_of(adapters)), adapters
