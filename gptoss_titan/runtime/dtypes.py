"""Dtype names as they appear in configs and on command lines, defined once."""

from __future__ import annotations

import contextlib

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_NAMES = tuple(DTYPES)


def dtype_of(name: str) -> torch.dtype:
    """torch dtype for a config name ("float32" or "bfloat16"); names are validated at load time."""
    return DTYPES[name]


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype ops on t compute in: autocast's where it is on for t's device, else t's own (a
    device without autocast, such as meta, counts as off)."""
    dev = t.device.type
    on = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)
    return torch.get_autocast_dtype(dev) if on else t.dtype


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast turned off for a region on this device type (nothing to turn off on meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
