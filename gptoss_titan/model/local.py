"""The part of a parameter this process holds.

A parallel pass may turn parameters into DTensors (split by expert, by head, by vocabulary row);
the model's math runs on the local part, whose shape the code reads from the tensor itself."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """t itself, or this process's shard of a DTensor (gradients flow back to the DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t
