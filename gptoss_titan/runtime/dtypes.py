"""Dtype names as they appear in configs and on command lines, defined once."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_NAMES = tuple(DTYPES)


def dtype_of(name: str) -> torch.dtype:
    """torch dtype for a config name ("float32" or "bfloat16"); names are validated at load time."""
    return DTYPES[name]
