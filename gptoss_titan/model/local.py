"""The part of a parameter this process holds, and host data moved to the device.

A parallel pass may turn parameters into DTensors (split by expert, by head, by vocabulary row);
the model's math runs on the local part, whose shape the code reads from the tensor itself."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """t itself, or this process's shard of a DTensor (gradients flow back to the DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def to_device(t: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """A host tensor on `device` (None: where it is): on CUDA through pinned memory, asynchronously
    (a copy from pageable memory makes the host wait for the GPU's queue); elsewhere as is."""
    if device is None:
        return t
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
