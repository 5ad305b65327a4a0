"""The true global gradient norm over plain, FSDP-sharded and expert-sharded gradients, and clipping."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float) -> float:
    """Clip gradients in place to a global L2 norm of max_norm (0 or inf = no clipping); return the norm.

    Gradients are grouped by device mesh (dense and expert parameters live on different meshes);
    each group's norm is a DTensor reduction over its shards (replicas counted once), and the
    groups combine as a root sum of squares, so the result equals the one-process norm.
    """
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.grad is not None:
            g = p.grad
            groups[(g.device_mesh, g.placements) if isinstance(g, DTensor) else None].append(g)
    total_sq = 0.0
    for grads in groups.values():
        n = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        total_sq += float(n) ** 2
    total = math.sqrt(total_sq)
    if max_norm and math.isfinite(max_norm) and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return total
