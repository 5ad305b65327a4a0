"""Parameter initialization that gives the same values however the model is sharded.

Each parameter is drawn whole from its own generator, seeded by (base seed, parameter name), then
the part this process holds is copied in. For a plain tensor that is everything; for a DTensor
(a shard made by the parallel passes) it is the local slice of the full tensor. So a model
initialized on 1 process, or sharded over 64, holds the same numbers, and the result does not
depend on parameter order. (CPU DTensor random ops cannot be used for this: every rank would
draw the same values.) Peak extra memory is one full parameter on the CPU.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def param_seed(base_seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{base_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _full_value(shape: torch.Size, kind: str, std: float, seed: int) -> torch.Tensor:
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "ones":
        return torch.ones(shape)
    gen = torch.Generator().manual_seed(seed)
    return torch.empty(shape).normal_(0.0, std, generator=gen)


@torch.no_grad()
def init_param(param: torch.Tensor, name: str, kind: str, std: float, base_seed: int) -> None:
    """Fill `param` (plain or DTensor) with its slice of the full tensor named `name`."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = _full_value(param.shape, kind, std, param_seed(base_seed, name))
    if isinstance(param, DTensor):
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


def init_spec(name: str, param: nn.Parameter, std: float) -> tuple[str, float]:
    """How HF initializes gpt-oss: ones for norms, zeros for biases (router bias and sinks: normal)."""
    if name.endswith("norm.weight"):
        return "ones", 0.0
    if name.endswith("router.gate.bias") or name.endswith("sinks"):
        return "normal", std
    if name.endswith(".bias") or name.endswith("b_gate_up") or name.endswith("b_down"):
        return "zeros", 0.0
    return "normal", std
