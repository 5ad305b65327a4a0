"""Parameter initialization that gives the same values however the model is sharded, drawing only
the part this process holds, on its own device.

Each parameter is cut along its first dimension into fixed blocks of rows (about 4M elements
each, independent of any sharding); block b of parameter `name` is drawn from its own generator
seeded by (base seed, name, b), on the parameter's device. A process draws the blocks that
overlap its shard and keeps the rows and columns it holds, so one process and any sharding (FSDP,
expert parallel, both, uneven) hold the same numbers, and the cost per process falls with the
number of processes. (CPU DTensor random ops cannot be used for this: every rank would draw the
same values.) Values depend on the device type's generator: a CPU and a CUDA run differ, two
CUDA runs at any sharding agree.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from ..runtime.compat import CHECKPOINT_WRAPPED_MODULE
from .local import local as local_part
from .lora import init_spec as adapter_init_spec
from .lora import is_adapter

BLOCK_ELEMS = 1 << 22  # elements per generator block (rows are never split)


def param_seed(base_seed: int, name: str, block: int = 0) -> int:
    digest = hashlib.sha256(f"{base_seed}:{name}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def global_indices(param: torch.Tensor) -> dict[int, torch.Tensor]:
    """For a DTensor: sharded dim -> the global indices [n] of the local positions along it (the
    same chunking DTensor and FSDP use, also for several mesh dimensions on one tensor dim, such
    as FSDP's strided split of a tensor-parallel shard; each rank's part of a dim is one run)."""
    from torch.distributed.tensor import DTensor, Replicate

    from ..runtime.compat import local_shape_and_offset

    if not isinstance(param, DTensor):
        return {}
    out = {}
    device = param.to_local().device
    split = [getattr(p, "dim", None) for p in param.placements]  # Shard and FSDP's _StridedShard have a dim
    for d in sorted({s for s in split if s is not None}):
        along = [p if s == d else Replicate() for p, s in zip(param.placements, split)]
        shape, offset = local_shape_and_offset(param.shape, param.device_mesh, along)
        out[d] = torch.arange(offset[d], offset[d] + shape[d], device=device)
    return out


@torch.no_grad()
def init_param(param: torch.Tensor, name: str, kind: str, std: float, base_seed: int) -> None:
    """Fill `param` (plain or DTensor) with its part of the parameter named `name`: zeros, ones, or
    N(0, std) drawn block by block (see the module docstring)."""
    local = local_part(param)
    if kind in ("zeros", "ones"):
        local.fill_(0.0 if kind == "zeros" else 1.0)
        return
    if local.numel() == 0:
        return
    shape = tuple(param.shape)
    idx = global_indices(param)
    rows = idx.get(0, torch.arange(shape[0], device=local.device))  # [n] global rows held here
    row_elems = math.prod(shape[1:])
    per_block = max(1, BLOCK_ELEMS // max(row_elems, 1))
    r0, r1 = int(rows.min()), int(rows.max()) + 1
    if set(idx) <= {0} and r1 - r0 == rows.numel():  # one contiguous run of whole rows: draw in place
        for b in range(r0 // per_block, (r1 - 1) // per_block + 1):
            b0, b1 = b * per_block, min((b + 1) * per_block, shape[0])
            lo, hi = max(b0, r0), min(b1, r1)
            gen = torch.Generator(device=local.device).manual_seed(param_seed(base_seed, name, b))
            if (lo, hi) == (b0, b1):  # the whole block is here: the same numbers as a block drawn alone
                local[lo - r0 : hi - r0].normal_(0.0, std, generator=gen)
            else:
                block = torch.empty((b1 - b0, *shape[1:]), device=local.device).normal_(
                    0.0, std, generator=gen
                )
                local[lo - r0 : hi - r0].copy_(block[lo - b0 : hi - b0])
        return
    first, last = r0 // per_block, (r1 - 1) // per_block
    parts = []
    for b in range(first, last + 1):  # every block overlapping the rows held here
        b0, b1 = b * per_block, min((b + 1) * per_block, shape[0])
        gen = torch.Generator(device=local.device).manual_seed(param_seed(base_seed, name, b))
        parts.append(torch.empty((b1 - b0, *shape[1:]), device=local.device).normal_(0.0, std, generator=gen))
    value = torch.cat(parts) if len(parts) > 1 else parts[0]
    value = value.index_select(0, rows - first * per_block)
    for d, index in idx.items():  # the columns held here of the other sharded dims
        if d > 0:
            value = value.index_select(d, index)
    local.copy_(value)


def init_spec(name: str, param: nn.Parameter, std: float) -> tuple[str, float]:
    """How HF initializes gpt-oss: ones for norms, zeros for biases (router bias and sinks: normal);
    LoRA adapters as lora.py says."""
    if is_adapter(name):
        return adapter_init_spec(name, param)
    if name.endswith("norm.weight"):
        return "ones", 0.0
    if name.endswith("router.gate.bias") or name.endswith("sinks"):
        return "normal", std
    if name.endswith(".bias") or name.endswith("b_gate_up") or name.endswith("b_down"):
        return "zeros", 0.0
    return "normal", std


def init_params(model: nn.Module, seed: int, std: float, only=None) -> None:
    """Draw every parameter (or those whose name passes `only`) as init_spec says, by its name
    without the activation-checkpoint wrapper's part (stable under AC)."""
    for name, p in model.named_parameters():
        name = name.replace(f"{CHECKPOINT_WRAPPED_MODULE}.", "")
        if only is None or only(name):
            kind, std_p = init_spec(name, p, std)
            init_param(p, name, kind, std_p, seed)


def init_adapters(model: nn.Module, seed: int) -> None:
    """Draw the LoRA adapters alone (the base came from a checkpoint): the values init_weights
    would give them."""
    init_params(model, seed, model.args.init_std, only=is_adapter)
